"""SPIFFE IDs and the peer-certificate rules, without `cryptography`.

A sidecar checks the certificate of every mTLS peer after ``ssl`` has verified
its chain to the trust bundle (CERT_REQUIRED). It does so here, on the DER
bytes ``getpeercert(binary_form=True)`` returns, read by a small DER reader
(``read_der``) that takes out only what the rules need. A sidecar never
imports `cryptography` for this (about 12 MB of RSS); citadel/identity.py
applies the very same rules (``check_facts``) to `cryptography` objects for
Citadel, the gateway and the CA.

``ssl``'s decoded ``getpeercert()`` dict would give the SANs and the validity,
but not basicConstraints, keyUsage, extendedKeyUsage or the key, so the DER
is read anyway, and all the facts come from that one source. The certificate
is one a CA of the trust bundle signed (OpenSSL checked the signature first),
and anything the reader does not understand is refused (``bad-certificate``).

The rules (reasons as in citadel/identity.py):

1. inside its validity window (``expired`` / ``not-yet-valid``);
3. not itself a CA (``ca-leaf``);
4. exactly one URI SAN (``multiple-uri-sans``), a SPIFFE ID (``no-spiffe-id``);
5. keyUsage, if present, has digitalSignature; extendedKeyUsage, if present,
   allows the role the peer played (serverAuth / clientAuth, or any) (``bad-key-usage``);
6. its key is RSA ≥ 2048 bits, EC P-256 / P-384 or Ed25519 (``weak-key``);
7. its SPIFFE ID is in the caller's trust domain (``wrong-trust-domain``) and
   one the caller expects (``wrong-identity``).

Rule 2 (the chain) is OpenSSL's in a handshake, identity.verify_peer's elsewhere.
Everything here is pure: the clock ``now`` is passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import PeerRejected

SCHEME = "spiffe://"
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")

# extendedKeyUsage purposes, dotted
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
ANY_EKU = "2.5.29.37.0"

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def is_path_segment(value: str) -> bool:
    """Can ``value`` be a namespace or service account in a SPIFFE ID?"""
    return bool(value) and bool(_SEGMENT_RE.match(value)) and value not in (".", "..")


def is_trust_domain(value: str) -> bool:
    return bool(value) and bool(_TRUST_DOMAIN_RE.match(value))


def is_spiffe_id(uri: str) -> bool:
    """True for any well-formed SPIFFE ID (``spiffe://td/path``), Istio-shaped or not."""
    if not uri.startswith(SCHEME):
        return False
    rest = uri[len(SCHEME):]
    td, sep, path = rest.partition("/")
    if not is_trust_domain(td):
        return False
    if not sep:
        return True  # the trust domain's own ID
    segments = path.split("/")
    return all(is_path_segment(s) for s in segments)


# ---------------------------------------------------------------- the facts the rules read


@dataclass(frozen=True, slots=True)
class LeafFacts:
    """What the rules need to know about a certificate."""

    name: str  # for messages: its SPIFFE ID, else its subject, else its serial
    not_before: datetime  # aware, UTC
    not_after: datetime
    is_ca: bool  # basicConstraints CA:true
    uris: tuple[str, ...]  # URI SANs, in order
    digital_signature: bool | None  # keyUsage digitalSignature; None: no keyUsage extension
    eku: frozenset[str] | None  # extendedKeyUsage purposes (dotted OIDs); None: no extension
    key: tuple[str, object]  # ("rsa", bits), ("ec", curve name), ("ed25519", None) or (kind, detail)


def key_problem(key: tuple[str, object], what: str) -> str | None:
    """Why a key (as in ``LeafFacts.key``) is too weak or of a refused kind; None if it is fine."""
    kind, detail = key
    if kind == "rsa":
        if not isinstance(detail, int) or detail < MIN_RSA_BITS:
            return f"{what} is RSA {detail} bits; at least {MIN_RSA_BITS} required"
        return None
    if kind == "ec":
        if detail not in ALLOWED_CURVES:
            return (f"{what} uses EC curve {detail}; only P-256 (secp256r1) and P-384 (secp384r1) "
                    "are accepted")
        return None
    if kind == "ed25519":
        return None
    return f"{what} has unsupported type {detail or kind}; use EC P-256, P-384 or RSA ≥ 2048"


# ---------------------------------------------------------------- the rules


def check_window(name: str, not_before: datetime, not_after: datetime, now: datetime, what: str) -> None:
    """Rule 1, for any certificate of a chain (``name`` for the message)."""
    if now < not_before:
        raise PeerRejected(
            f"{what} {name} is not valid yet: valid from {not_before.isoformat()}, "
            f"now is {now.isoformat()} (clock skew?)",
            "not-yet-valid",
        )
    if now > not_after:
        raise PeerRejected(f"{what} {name} expired at {not_after.isoformat()}, now is {now.isoformat()}", "expired")


def check_validity(facts: LeafFacts, now: datetime, what: str) -> None:
    check_window(facts.name, facts.not_before, facts.not_after, now, what)


def check_facts(
    facts: LeafFacts,
    expected_ids: set[str] | frozenset[str] | None,
    usage: str | None,
    trust_domain: str | None = None,
) -> str:
    """Rules 3-7 (validity is ``check_validity``); returns the peer's SPIFFE ID."""
    if facts.is_ca:
        raise PeerRejected(
            f"peer certificate {facts.name} is a CA certificate (basicConstraints CA:true); "
            "workload certificates must not be CAs",
            "ca-leaf",
        )
    uris = facts.uris
    if len(uris) > 1:
        raise PeerRejected(
            f"peer certificate has {len(uris)} URI SANs ({', '.join(uris)}); exactly one SPIFFE ID is required",
            "multiple-uri-sans",
        )
    if not uris or not is_spiffe_id(uris[0]):
        got = uris[0] if uris else "none"
        raise PeerRejected(f"peer certificate carries no SPIFFE ID (URI SAN: {got})", "no-spiffe-id")
    ident = uris[0]
    if facts.digital_signature is False:
        raise PeerRejected(f"peer certificate {ident} lacks the digitalSignature key usage", "bad-key-usage")
    if facts.eku is not None:
        need = {"server": {SERVER_AUTH}, "client": {CLIENT_AUTH}}.get(usage or "", {SERVER_AUTH, CLIENT_AUTH})
        if not (facts.eku & need) and ANY_EKU not in facts.eku:
            raise PeerRejected(
                f"peer certificate {ident} has no extended key usage for TLS {usage or 'server or client'} auth",
                "bad-key-usage",
            )
    problem = key_problem(facts.key, f"peer certificate {ident} key")
    if problem is not None:
        raise PeerRejected(problem, "weak-key")
    if trust_domain is not None and ident[len(SCHEME):].split("/", 1)[0] != trust_domain:
        raise PeerRejected(
            f"peer identity {ident} is outside this mesh's trust domain {trust_domain}", "wrong-trust-domain"
        )
    if expected_ids is not None and ident not in expected_ids:
        want = ", ".join(sorted(expected_ids)) or "<none>"
        raise PeerRejected(f"peer identity {ident} is not the expected one ({want})", "wrong-identity")
    return ident


_seen: dict[bytes, LeafFacts] = {}
_SEEN_MAX = 256


def check_peer_der(
    der: bytes,
    expected_ids: set[str] | frozenset[str] | None,
    now: datetime,
    *,
    usage: str | None = None,
    trust_domain: str | None = None,
) -> str:
    """All the leaf rules on a DER certificate whose chain ``ssl`` verified;
    the peer's SPIFFE ID, or PeerRejected(reason). The facts of the last
    certificates seen are kept (keyed by the whole DER): a peer presents the
    same certificate on every connection until it renews, so its DER is read
    once; the rules and the clock are applied every time."""
    facts = _seen.get(der)
    if facts is None:
        facts = read_der(der)
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen[bytes(der)] = facts
    check_validity(facts, now, "peer certificate")
    return check_facts(facts, expected_ids, usage, trust_domain)


# ---------------------------------------------------------------- a minimal DER reader


class _Bad(Exception):
    pass


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``pos``."""
    if pos + 2 > end:
        raise _Bad("truncated")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _Bad("high tag number")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > end:
            raise _Bad("bad length")
        n = int.from_bytes(buf[pos:pos + k], "big")
        pos += k
    if pos + n > end:
        raise _Bad("truncated")
    return tag, pos, pos + n


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(buf, pos, end)
        out.append((tag, s, e))
        pos = e
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise _Bad("empty OID")
    parts: list[int] = []
    value = 0
    for b in raw:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    if raw[-1] & 0x80:
        raise _Bad("truncated OID")
    first = parts[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(p) for p in head + parts[1:])


def _time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if not text.endswith("Z"):
        raise _Bad("time not in UTC")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSS[.f]Z
        raise _Bad("not a time")
    digits = text[:-1].split(".", 1)[0]
    if len(digits) != 14 or not digits.isdigit():
        raise _Bad("bad time")
    return datetime(int(digits[0:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10]),
                    int(digits[10:12]), int(digits[12:14]), tzinfo=timezone.utc)


def _der_oid(dotted: str) -> bytes:
    """The contents octets of an OID (the reader compares OIDs as bytes: no decoding per certificate)."""
    nums = [int(x) for x in dotted.split(".")]
    out = bytearray()
    for n in [nums[0] * 40 + nums[1], *nums[2:]]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_CURVES = {_der_oid(k): v for k, v in {"1.2.840.10045.3.1.7": "secp256r1", "1.3.132.0.34": "secp384r1",
                                       "1.3.132.0.35": "secp521r1", "1.3.132.0.10": "secp256k1"}.items()}
_RSA = _der_oid("1.2.840.113549.1.1.1")
_EC = _der_oid("1.2.840.10045.2.1")
_ED25519 = _der_oid("1.3.101.112")
_BASIC_CONSTRAINTS, _KEY_USAGE, _EKU, _SAN = (_der_oid(o) for o in ("2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17"))
_CN = _der_oid("2.5.4.3")
_PURPOSES = {_der_oid(o): o for o in (SERVER_AUTH, CLIENT_AUTH, ANY_EKU)}


def _purpose(raw: bytes) -> str:
    return _PURPOSES.get(raw) or _oid(raw)


def _key(buf: bytes, spki: tuple[int, int, int]) -> tuple[str, object]:
    fields = _children(buf, spki[1], spki[2])
    if len(fields) != 2 or fields[0][0] != 0x30 or fields[1][0] != 0x03:
        raise _Bad("bad subjectPublicKeyInfo")
    alg = _children(buf, fields[0][1], fields[0][2])
    if not alg or alg[0][0] != 0x06:
        raise _Bad("bad key algorithm")
    oid = buf[alg[0][1]:alg[0][2]]
    if oid == _RSA:
        bits = buf[fields[1][1]:fields[1][2]]
        if not bits or bits[0] != 0:
            raise _Bad("bad RSA key")
        key = bits[1:]
        seq = _tlv(key, 0, len(key))
        ints = _children(key, seq[1], seq[2])
        if seq[0] != 0x30 or len(ints) != 2 or ints[0][0] != 0x02:
            raise _Bad("bad RSA key")
        return ("rsa", int.from_bytes(key[ints[0][1]:ints[0][2]], "big").bit_length())
    if oid == _EC:
        if len(alg) != 2 or alg[1][0] != 0x06:
            raise _Bad("EC key without a named curve")
        curve = buf[alg[1][1]:alg[1][2]]
        return ("ec", _CURVES.get(curve) or _oid(curve))
    if oid == _ED25519:
        return ("ed25519", None)
    return ("other", f"key algorithm {_oid(oid)}")


def _cn(buf: bytes, name: tuple[int, int, int]) -> str:
    for rdn in _children(buf, name[1], name[2]):
        for atv in _children(buf, rdn[1], rdn[2]):
            parts = _children(buf, atv[1], atv[2])
            if len(parts) == 2 and parts[0][0] == 0x06 and buf[parts[0][1]:parts[0][2]] == _CN:
                return "CN=" + buf[parts[1][1]:parts[1][2]].decode("utf-8", "replace")
    return ""


def read_der(der: bytes) -> LeafFacts:
    """The facts of one DER certificate; PeerRejected("bad-certificate") if it cannot be read."""
    try:
        return _read(bytes(der))
    except (_Bad, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise PeerRejected(f"cannot parse certificate: {exc}", "bad-certificate") from None


def _read(buf: bytes) -> LeafFacts:
    tag, s, e = _tlv(buf, 0, len(buf))
    if tag != 0x30 or e != len(buf):
        raise _Bad("not one DER certificate")
    top = _children(buf, s, e)
    if len(top) != 3 or top[0][0] != 0x30:
        raise _Bad("not a certificate")
    tbs = _children(buf, top[0][1], top[0][2])
    i = 1 if tbs and tbs[0][0] == 0xA0 else 0  # [0] version
    if len(tbs) < i + 6:
        raise _Bad("short tbsCertificate")
    serial, _sig, _issuer, validity, subject, spki = tbs[i:i + 6]
    if serial[0] != 0x02 or validity[0] != 0x30 or subject[0] != 0x30 or spki[0] != 0x30:
        raise _Bad("bad tbsCertificate")
    times = _children(buf, validity[1], validity[2])
    if len(times) != 2:
        raise _Bad("bad validity")
    not_before = _time(times[0][0], buf[times[0][1]:times[0][2]])
    not_after = _time(times[1][0], buf[times[1][1]:times[1][2]])
    key = _key(buf, spki)
    is_ca = False
    digital_signature: bool | None = None
    eku: frozenset[str] | None = None
    uris: list[str] = []
    seen: set[bytes] = set()
    for tag, s, e in tbs[i + 6:]:
        if tag != 0xA3:  # [1] / [2] unique IDs: not used
            continue
        (seq,) = _children(buf, s, e)
        for ext in _children(buf, seq[1], seq[2]):
            parts = _children(buf, ext[1], ext[2])
            if not 2 <= len(parts) <= 3 or parts[0][0] != 0x06 or parts[-1][0] != 0x04:
                raise _Bad("bad extension")
            oid = buf[parts[0][1]:parts[0][2]]
            if oid in seen:
                raise _Bad(f"extension {_oid(oid)} appears twice")
            seen.add(oid)
            vs, ve = parts[-1][1], parts[-1][2]
            if oid == _BASIC_CONSTRAINTS:
                t, cs, ce = _tlv(buf, vs, ve)
                inner = _children(buf, cs, ce)
                is_ca = bool(inner) and inner[0][0] == 0x01 and buf[inner[0][1]:inner[0][2]] != b"\x00"
            elif oid == _KEY_USAGE:
                t, cs, ce = _tlv(buf, vs, ve)
                if t != 0x03 or ce <= cs:
                    raise _Bad("bad keyUsage")
                digital_signature = ce > cs + 1 and bool(buf[cs + 1] & 0x80)
            elif oid == _EKU:
                t, cs, ce = _tlv(buf, vs, ve)
                eku = frozenset(_purpose(buf[a:b]) for tg, a, b in _children(buf, cs, ce) if tg == 0x06)
            elif oid == _SAN:
                t, cs, ce = _tlv(buf, vs, ve)
                uris = [buf[a:b].decode("ascii") for tg, a, b in _children(buf, cs, ce) if tg == 0x86]
    name = uris[0] if uris else _cn(buf, subject) or f"serial {int.from_bytes(buf[serial[1]:serial[2]], 'big'):x}"
    return LeafFacts(name, not_before, not_after, is_ca, tuple(uris), digital_signature, eku, key)


def pem_to_der(pem: bytes | str) -> list[bytes]:
    """The DER blobs of the CERTIFICATE blocks of a PEM text, in order."""
    import base64

    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    out = []
    for block in text.split("-----BEGIN CERTIFICATE-----")[1:]:
        body, sep, _ = block.partition("-----END CERTIFICATE-----")
        if not sep:
            raise PeerRejected("cannot parse certificate: unterminated PEM block", "bad-certificate")
        try:
            out.append(base64.b64decode("".join(body.split()), validate=True))
        except ValueError as exc:
            raise PeerRejected(f"cannot parse certificate: {exc}", "bad-certificate") from None
    return out
