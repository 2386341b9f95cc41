"""One-time bootstrap tokens: how a new sidecar proves who it is to Citadel.

Whoever launches a workload (``meshctl up``, or an operator with
``meshctl citadel token``) asks Citadel for a token bound to the workload's
SPIFFE ID and hands it to the sidecar. The sidecar redeems it once, with a
CSR, for its first certificate; renewals are authenticated by the current
certificate instead.

Only a SHA-256 of each token is kept (in memory and, through store.py, on
disk), so a leaked state directory yields no usable token. ``redeem``
refuses, each with its own error: a token never issued here
(``TokenUnknown``), one already redeemed (``TokenReused``), one past its
expiry (``TokenExpired``). Pure: ``now`` is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from .errors import TokenExpired, TokenReused, TokenUnknown
from .identity import InvalidSpiffeId, as_datetime, as_timedelta, is_spiffe_id

TOKEN_PREFIX = "mct_"
DEFAULT_TOKEN_TTL = timedelta(hours=1)
FORGET_AFTER = timedelta(days=7)  # redeemed/expired records are kept this long to say "reused"/"expired"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(slots=True)
class TokenRecord:
    identity: str
    issued: float  # epoch seconds
    expires: float
    used: float | None = None


def _epoch(now: datetime | float) -> float:
    return as_datetime(now).timestamp()


def _fmt(ts: float) -> str:
    return as_datetime(ts).isoformat(timespec="seconds")


class TokenStore:
    """Token records by hash. ``to_json`` / ``from_json`` for persistence (store.py)."""

    def __init__(self, records: dict[str, TokenRecord] | None = None) -> None:
        self.records: dict[str, TokenRecord] = dict(records or {})

    def issue_token(self, workload_identity: str, ttl: timedelta | float | None, now: datetime | float) -> str:
        """A new one-time token for ``workload_identity`` (a SPIFFE ID)."""
        if not is_spiffe_id(workload_identity):
            raise InvalidSpiffeId(f"cannot issue a token for {workload_identity!r}: not a SPIFFE ID")
        life = DEFAULT_TOKEN_TTL if ttl is None else as_timedelta(ttl)
        if life <= timedelta(0):
            raise ValueError(f"token lifetime must be positive, got {life}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        t = _epoch(now)
        self.records[token_hash(token)] = TokenRecord(workload_identity, t, t + life.total_seconds())
        return token

    def redeem(self, token: str, now: datetime | float) -> str:
        """The identity the token was issued for; the token is spent."""
        h = token_hash(token)
        rec = None
        for k, r in self.records.items():  # constant-time comparison of hashes
            if hmac.compare_digest(k, h):
                rec = r
        if rec is None:
            raise TokenUnknown(
                "bootstrap token not recognised: it was not issued by this Citadel "
                "(another mesh's token, a typo, or a state directory that was reset)"
            )
        t = _epoch(now)
        if rec.used is not None:
            raise TokenReused(
                f"bootstrap token for {rec.identity} was already redeemed at {_fmt(rec.used)}; "
                "tokens are single-use: issue a new one"
            )
        if t > rec.expires:
            raise TokenExpired(
                f"bootstrap token for {rec.identity} expired at {_fmt(rec.expires)}; issue a new one"
            )
        rec.used = t
        return rec.identity

    def prune(self, now: datetime | float, keep: timedelta = FORGET_AFTER) -> int:
        """Forget records expired for longer than ``keep``; returns how many."""
        cutoff = _epoch(now) - keep.total_seconds()
        stale = [h for h, r in self.records.items() if r.expires < cutoff]
        for h in stale:
            del self.records[h]
        return len(stale)

    def outstanding(self, now: datetime | float) -> list[TokenRecord]:
        t = _epoch(now)
        return [r for r in self.records.values() if r.used is None and r.expires >= t]

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "tokens": {h: asdict(r) for h, r in self.records.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TokenStore":
        tokens = data.get("tokens", {}) if isinstance(data, dict) else {}
        return cls({h: TokenRecord(**r) for h, r in tokens.items()})
