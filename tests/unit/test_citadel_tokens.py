"""One-time bootstrap tokens: redeemed once, refused when reused, expired or foreign."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from meshctl.citadel.errors import TokenExpired, TokenReused, TokenUnknown
from meshctl.citadel.identity import InvalidSpiffeId
from meshctl.citadel.tokens import TokenStore

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
ID = "spiffe://cluster.local/ns/default/sa/reviews"


def test_token_redeems_once_for_its_identity():
    store = TokenStore()
    tok = store.issue_token(ID, timedelta(minutes=10), NOW)
    assert store.redeem(tok, NOW + timedelta(minutes=1)) == ID
    with pytest.raises(TokenReused, match="already redeemed at 2026-11-26T14:01:00"):
        store.redeem(tok, NOW + timedelta(minutes=2))


def test_expired_token_is_refused():
    store = TokenStore()
    tok = store.issue_token(ID, 60, NOW)
    with pytest.raises(TokenExpired, match="expired at 2026-11-26T14:01:00"):
        store.redeem(tok, NOW + timedelta(seconds=61))


def test_foreign_token_is_refused():
    ours, theirs = TokenStore(), TokenStore()
    theirs_tok = theirs.issue_token(ID, 600, NOW)
    ours.issue_token(ID, 600, NOW)
    with pytest.raises(TokenUnknown, match="not issued by this Citadel"):
        ours.redeem(theirs_tok, NOW)
    with pytest.raises(TokenUnknown):
        ours.redeem("mct_guess", NOW)


def test_errors_have_distinct_reason_codes():
    assert {TokenExpired("").reason, TokenReused("").reason, TokenUnknown("").reason} == {
        "token-expired",
        "token-reused",
        "token-unknown",
    }


def test_tokens_are_unique_and_only_their_hash_is_persisted():
    store = TokenStore()
    toks = {store.issue_token(ID, 600, NOW) for _ in range(20)}
    assert len(toks) == 20
    text = json.dumps(store.to_json())
    assert not any(t in text for t in toks)
    # a reloaded store (another process, a restart) still knows them, once
    again = TokenStore.from_json(json.loads(text))
    tok = sorted(toks)[0]
    assert again.redeem(tok, NOW) == ID
    with pytest.raises(TokenReused):
        TokenStore.from_json(again.to_json()).redeem(tok, NOW)


def test_issue_refuses_a_non_spiffe_identity():
    with pytest.raises(InvalidSpiffeId):
        TokenStore().issue_token("reviews", 600, NOW)


def test_prune_forgets_long_expired_records_only():
    store = TokenStore()
    store.issue_token(ID, 60, NOW - timedelta(days=30))
    live = store.issue_token(ID, 600, NOW)
    assert store.prune(NOW) == 1
    assert store.redeem(live, NOW) == ID
    assert len(store.outstanding(NOW)) == 0
