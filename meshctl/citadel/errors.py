"""Citadel's own exceptions.

Every failure names its cause in words a user can act on; ``reason`` is a
short stable code (for metrics, logs and tests) next to the message.
"""

from __future__ import annotations


class CitadelError(Exception):
    """Base class of every Citadel failure."""

    reason: str = "citadel-error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CAError(CitadelError):
    """A CA certificate or key is unusable (not a CA, key mismatch, bad PEM...)."""

    reason = "bad-ca"


class WeakKey(CitadelError):
    """A key is too weak or of a kind meshctl does not accept."""

    reason = "weak-key"


class CSRError(CitadelError):
    """A certificate signing request is malformed or its signature is invalid."""

    reason = "bad-csr"


class PeerRejected(CitadelError):
    """A peer's certificate failed meshctl's identity checks.

    ``reason`` is one of: no-certificate, bad-certificate, expired,
    not-yet-valid, untrusted, no-spiffe-id, multiple-uri-sans, ca-leaf,
    bad-key-usage, weak-key, wrong-identity.
    """

    reason = "rejected"


class TokenError(CitadelError):
    """A bootstrap token could not be redeemed."""

    reason = "bad-token"


class TokenReused(TokenError):
    reason = "token-reused"


class TokenExpired(TokenError):
    reason = "token-expired"


class TokenUnknown(TokenError):
    """The token was never issued by this Citadel (foreign, forged or mistyped)."""

    reason = "token-unknown"


class TLSError(CitadelError):
    """A TLS handshake failed; the message names the cause from the TLS library."""

    reason = "tls-handshake"
