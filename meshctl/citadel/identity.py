"""SPIFFE identities and the peer checks meshctl runs after a TLS handshake.

An Istio workload identity is ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``;
Istio's AuthorizationPolicy writes the same thing without the scheme
(``cluster.local/ns/default/sa/productpage``) and calls it a *principal*.

Python's ``ssl`` verifies the chain to the trust bundle but ignores URI SANs,
so the identity rules are meshctl's own and live here:

1. the leaf is inside its validity window (``expired`` / ``not-yet-valid``);
2. it chains to a root of the trust bundle through CA certificates (``untrusted``);
3. it is not itself a CA (``ca-leaf``);
4. it carries exactly one URI SAN (``multiple-uri-sans``) and that URI is a
   SPIFFE ID (``no-spiffe-id``);
5. key usage / extended key usage allow the role it plays (``bad-key-usage``);
6. its key is strong enough (``weak-key``);
7. its SPIFFE ID is in the trust domain (``wrong-trust-domain``) and one the
   caller expects (``wrong-identity``).

Rules 1 and 3-7 are written once, in citadel/leaf.py, on plain facts
(``LeafFacts``); this module reads those facts from `cryptography` objects
(``facts_of``) and adds the chain walk (rule 2) for Citadel, the gateway and
the CA. A sidecar reads them from DER with leaf.py alone and never imports
this module or `cryptography` (about 12 MB of RSS).

Everything here is pure: the clock ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import CitadelError, PeerRejected, WeakKey
from .leaf import (
    ALLOWED_CURVES,
    MIN_RSA_BITS,
    SCHEME,
    LeafFacts,
    check_facts,
    check_window,
    is_path_segment,
    is_spiffe_id,
    is_trust_domain,
)

MAX_CHAIN_DEPTH = 6


class InvalidSpiffeId(CitadelError, ValueError):
    reason = "bad-spiffe-id"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.principal}"

    @property
    def principal(self) -> str:
        """Istio's principal form: the ID without ``spiffe://``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://td/ns/<namespace>/sa/<service_account>``; each part is validated."""
    if not is_trust_domain(trust_domain):
        raise InvalidSpiffeId(
            f"invalid trust domain {trust_domain!r}: use lower-case letters, digits, '.', '-' and '_'"
        )
    for what, value in (("namespace", namespace), ("service account", service_account)):
        if not is_path_segment(value):
            raise InvalidSpiffeId(
                f"invalid {what} {value!r} for a SPIFFE ID: use letters, digits, '.', '-' and '_'"
            )
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse an Istio workload ID; accepts the principal form (no scheme) too."""
    text = s[len(SCHEME):] if s.startswith(SCHEME) else s
    parts = text.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise InvalidSpiffeId(
            f"{s!r} is not an Istio workload identity: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
        )
    spiffe_id(parts[0], parts[2], parts[4])  # validates each part
    return SpiffeId(parts[0], parts[2], parts[4])


# ---------------------------------------------------------------- keys


def check_key_strength(public_key: object, what: str = "key") -> None:
    """Raise WeakKey unless the key is RSA ≥ 2048 bits, EC P-256/P-384, or Ed25519."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise WeakKey(f"{what} is RSA {public_key.key_size} bits; at least {MIN_RSA_BITS} required")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise WeakKey(
                f"{what} uses EC curve {public_key.curve.name}; only P-256 (secp256r1) and P-384 (secp384r1) are accepted"
            )
        return
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    raise WeakKey(f"{what} has unsupported type {type(public_key).__name__}; use EC P-256, P-384 or RSA ≥ 2048")


# ---------------------------------------------------------------- time and input helpers


def as_datetime(now: datetime | float) -> datetime:
    """``now`` as an aware UTC datetime (accepts epoch seconds or naive UTC)."""
    if isinstance(now, datetime):
        return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(float(now), tz=timezone.utc)


def as_timedelta(ttl: timedelta | float) -> timedelta:
    return ttl if isinstance(ttl, timedelta) else timedelta(seconds=float(ttl))


def load_certificates(data: bytes | str | x509.Certificate | Iterable[object]) -> list[x509.Certificate]:
    """Certificates from PEM text, one DER blob, an x509 object, or a sequence of those."""
    if isinstance(data, x509.Certificate):
        return [data]
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        try:
            if b"-----BEGIN" in raw:
                return list(x509.load_pem_x509_certificates(raw))
            return [x509.load_der_x509_certificate(raw)]
        except ValueError as exc:
            raise PeerRejected(f"cannot parse certificate: {exc}", "bad-certificate") from None
    out: list[x509.Certificate] = []
    for item in data:
        out.extend(load_certificates(item))  # type: ignore[arg-type]
    return out


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    bc = _basic_constraints(cert)
    return bc is not None and bc.ca


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s name and key signed ``cert``."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its SPIFFE ID or subject."""
    uris = uri_sans(cert)
    if uris:
        return uris[0]
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# ---------------------------------------------------------------- checks


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    check_window(describe(cert), cert.not_valid_before_utc, cert.not_valid_after_utc, now, what)


def _verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> None:
    if not roots:
        raise PeerRejected("no trust bundle: cannot verify any peer", "untrusted")
    current = leaf
    used: set[bytes] = set()
    for _ in range(MAX_CHAIN_DEPTH):
        for root in roots:
            if issued_by(current, root):
                if not (now <= root.not_valid_after_utc and now >= root.not_valid_before_utc):
                    raise PeerRejected(
                        f"root {describe(root)} of the trust bundle is outside its validity window "
                        f"({root.not_valid_before_utc.isoformat()} .. {root.not_valid_after_utc.isoformat()})",
                        "untrusted",
                    )
                return
        nxt = None
        for cand in intermediates:
            fp = cand.fingerprint(hashes.SHA256())
            if fp in used or not issued_by(current, cand):
                continue
            if not is_ca(cand):
                raise PeerRejected(
                    f"intermediate {describe(cand)} in the peer's chain is not a CA", "untrusted"
                )
            _check_validity(cand, now, "intermediate certificate")
            used.add(fp)
            nxt = cand
            break
        if nxt is None:
            raise PeerRejected(
                f"certificate {describe(leaf)} is not signed by a trusted root "
                f"(issuer {current.issuer.rfc4514_string() or '<empty>'} is not in the trust bundle)",
                "untrusted",
            )
        current = nxt
    raise PeerRejected(f"chain of {describe(leaf)} is longer than {MAX_CHAIN_DEPTH}", "untrusted")


def check_leaf(
    cert: x509.Certificate | bytes,
    expected_ids: set[str] | frozenset[str] | None,
    now: datetime | float,
    *,
    usage: str | None = None,
    trust_domain: str | None = None,
) -> str:
    """Checks 1 and 3-7 on a leaf whose chain was already verified (by ``ssl``).

    ``usage`` is "server" when the peer acted as a TLS server, "client" when
    it was a client, None to accept either. ``trust_domain``: the SPIFFE ID
    must be in it (a certificate of another trust domain signed by a CA we
    trust is still a stranger, as in Istio). Returns the peer's SPIFFE ID.
    """
    leaf = load_certificates(cert)[0] if not isinstance(cert, x509.Certificate) else cert
    when = as_datetime(now)
    _check_validity(leaf, when, "peer certificate")
    return _check_leaf_rest(leaf, expected_ids, usage, trust_domain)


def facts_of(cert: x509.Certificate) -> LeafFacts:
    """The facts leaf.check_facts reads, from a `cryptography` certificate."""
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        digital_signature: bool | None = ku.digital_signature
    except x509.ExtensionNotFound:
        digital_signature = None
    try:
        eku: frozenset[str] | None = frozenset(
            o.dotted_string for o in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = None
    key: tuple[str, object]
    try:
        public_key = cert.public_key()
    except Exception as exc:  # unsupported algorithms in cryptography
        key = ("other", f"unreadable ({exc})")
    else:
        if isinstance(public_key, rsa.RSAPublicKey):
            key = ("rsa", public_key.key_size)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            key = ("ec", public_key.curve.name)
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            key = ("ed25519", None)
        else:
            key = ("other", type(public_key).__name__)
    return LeafFacts(describe(cert), cert.not_valid_before_utc, cert.not_valid_after_utc, is_ca(cert),
                     tuple(uri_sans(cert)), digital_signature, eku, key)


def _check_leaf_rest(leaf: x509.Certificate, expected_ids, usage: str | None, trust_domain: str | None = None) -> str:
    return check_facts(facts_of(leaf), expected_ids, usage, trust_domain)


def verify_peer(
    cert_chain: bytes | str | x509.Certificate | Sequence[bytes | x509.Certificate],
    trust_bundle: bytes | str | Sequence[x509.Certificate],
    expected_ids: set[str] | frozenset[str] | None,
    now: datetime | float,
    *,
    usage: str | None = None,
    trust_domain: str | None = None,
) -> str:
    """All the checks, chain included. ``cert_chain`` is leaf first (DER, PEM or
    x509 objects). Returns the peer's SPIFFE ID or raises PeerRejected(reason)."""
    chain = load_certificates(cert_chain)
    if not chain:
        raise PeerRejected("peer presented no certificate", "no-certificate")
    roots = load_certificates(trust_bundle)
    when = as_datetime(now)
    leaf = chain[0]
    _check_validity(leaf, when, "peer certificate")
    _verify_chain(leaf, chain[1:], roots, when)
    return _check_leaf_rest(leaf, expected_ids, usage, trust_domain)


def remaining_lifetime(cert: x509.Certificate, now: datetime | float) -> timedelta:
    return cert.not_valid_after_utc - as_datetime(now)
