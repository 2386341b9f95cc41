"""After Consul was away, a Pilot keeps the instances it knew for one check TTL
(registry/consul.py keep_held): a restarted agent reports its restored TTL checks
critical until the hosts renew them, and those instances must not blink out."""

from meshctl.model.base import FrozenDict
from meshctl.registry import make_snapshot
from meshctl.registry.base import Instance
from meshctl.registry.consul import keep_held


def inst(id: str, address: str, port: int = 21000, service: str = "details") -> Instance:
    return Instance(id=id, service=service, address=address, port=port, labels=FrozenDict(), meta=FrozenDict())


def test_instances_known_before_stay_new_ones_come_at_once():
    held = make_snapshot({"details": [inst("details-v1-0", "10.0.0.11")],
                          "reviews": [inst("reviews-v1-0", "10.0.0.12", service="reviews")]})
    # Consul, just back: details (its check restored critical) is missing, a new reviews has come
    now = make_snapshot({"details": [], "reviews": [inst("reviews-v1-0", "10.0.0.12", service="reviews"),
                                                    inst("reviews-v3-0", "10.0.0.13", service="reviews")]})
    out = keep_held(held, now)
    assert [i.id for i in out["details"]] == ["details-v1-0"]
    assert [i.id for i in out["reviews"]] == ["reviews-v1-0", "reviews-v3-0"]  # no duplicate


def test_a_service_gone_from_the_catalog_is_kept_and_a_moved_instance_is_both():
    held = make_snapshot({"ratings": [inst("ratings-v1-0", "10.0.0.12", 21001, "ratings")]})
    now = make_snapshot({"ratings": [inst("ratings-v1-0", "10.0.0.12", 21009, "ratings")]})
    assert {i.port for i in keep_held(held, now)["ratings"]} == {21001, 21009}
    assert keep_held(held, make_snapshot({}))["ratings"] == held["ratings"]
