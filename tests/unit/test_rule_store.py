"""The rules store: kubectl-apply semantics, history, rollback, crash-safe files."""

from pathlib import Path

import pytest

from meshctl.loader.resources import load_resources
from meshctl.pilot.store import RuleStore, StoreError

RULES = Path(__file__).parents[2] / "examples" / "bookinfo" / "rules"


def rules(*names):
    return load_resources([RULES / n for n in names])


def test_apply_creates_then_reports_unchanged_without_a_new_revision(tmp_path):
    store = RuleStore(tmp_path)
    rev, changes = store.apply(rules("virtual-service-all-v1.yaml"))
    assert rev.number == 1
    assert {c.action for c in changes} == {"created"}
    rev2, changes2 = store.apply(rules("virtual-service-all-v1.yaml"))
    assert rev2.number == 1
    assert {c.action for c in changes2} == {"unchanged"}


def test_apply_replaces_by_kind_namespace_and_name(tmp_path):
    store = RuleStore(tmp_path)
    store.apply(rules("virtual-service-all-v1.yaml"))
    rev, changes = store.apply(rules("virtual-service-reviews-test-v2.yaml"))
    assert [(c.name, c.action) for c in changes] == [("reviews", "configured")]
    reviews = [r for r in store.current().resources if r.name == "reviews" and r.kind == "VirtualService"]
    assert len(reviews) == 1 and len(reviews[0].spec.http) == 2
    assert len(store.current().resources) == 4  # productpage, reviews, ratings, details


def test_store_survives_a_new_process(tmp_path):
    RuleStore(tmp_path).apply(rules("destination-rule-all.yaml"))
    again = RuleStore(tmp_path).current()
    assert again.number == 1
    assert {r.name for r in again.resources} == {"productpage", "reviews", "ratings", "details"}


def test_history_and_rollback_restore_the_earlier_rule_set(tmp_path):
    store = RuleStore(tmp_path)
    store.apply(rules("virtual-service-all-v1.yaml"))
    store.apply(rules("virtual-service-reviews-v3.yaml"))
    rev = store.rollback()
    assert rev.number == 3 and rev.change == "rollback to revision 1"
    reviews = next(r for r in store.current().resources if r.name == "reviews")
    assert reviews.spec.http[0].route[0].destination.subset == "v1"
    assert [h.number for h in store.history()] == [1, 2, 3]


def test_rollback_to_a_revision_that_does_not_exist_is_an_error(tmp_path):
    store = RuleStore(tmp_path)
    store.apply(rules("virtual-service-all-v1.yaml"))
    with pytest.raises(StoreError, match="no revision 9"):
        store.rollback(9)


def test_delete_by_kind_is_case_insensitive_and_reports_missing(tmp_path):
    store = RuleStore(tmp_path)
    store.apply(rules("virtual-service-all-v1.yaml"))
    rev, changes = store.delete([("virtualservice", "default", "reviews"), ("VirtualService", "default", "nope")])
    assert [c.action for c in changes] == ["deleted", "not found"]
    assert "reviews" not in {r.name for r in store.current().resources}


def test_no_temporary_files_are_left_behind(tmp_path):
    store = RuleStore(tmp_path)
    store.apply(rules("virtual-service-all-v1.yaml"))
    assert not [p for p in (tmp_path / "rules").rglob("*") if ".tmp" in p.name]
