"""One trust domain over several hosts: the decisions, without I/O.

A root (made once with ``citadel init --root-dir``, or the user's own) stays
with its holder. Each host's Citadel makes its own intermediate key and
publishes a CSR; the root holder signs it into an intermediate certificate
for that host; the certificates and the root bundle travel through Consul's
KV store (kv.py), never a private key. The rules:

1. A host intermediate is CA:true, pathlen 0 (it can sign workloads, never
   another CA), keyCertSign + cRLSign, named after its host, and name-constrained
   to URIs of the trust domain: a host's key can issue workload certificates
   of this mesh and nothing else, and no intermediate for another host.
2. The root holder re-signs only the key a host already published: the CSR
   in KV must carry the same key as the host's current intermediate, else the
   host must be approved again by name (``intermediate_for``).
3. A host takes a root into its trust bundle only if it already trusts it, or
   a root it trusts cross-signed it (the cross-certificate made at rotation),
   or nothing is trusted yet (first contact; ``citadel join --root-cert``
   pins the root instead). Write access to KV alone cannot add a root.
4. A host takes an intermediate only if it carries the host's own key and
   chains to a root it trusts (``check_intermediate``).
5. A rotation ends (the old root leaves the bundle) only when every approved
   host reported the new intermediate and every certificate it issued from
   an older one has expired (``rotation_waits``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from .ca import BACKDATE, CA, PrivateKey, _hash_for, cert_to_pem, certs_to_pem, is_self_signed, validate_csr
from .errors import CAError
from .identity import as_datetime, describe, is_ca, issued_by

HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_INTERMEDIATE_TTL = timedelta(days=365)


def check_host_name(host: str) -> str:
    if not HOST_RE.match(host or ""):
        raise CAError(f"host name {host!r}: use 1-63 letters, digits, '.', '-' or '_' (it names a KV key)")
    return host


def spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def key_id(public_key: Any) -> str:
    """A short printable id of a public key (for `approve`'s list)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki(public_key))
    return digest.finalize().hex()[:16]


# ---------------------------------------------------------------- the host's CSR


def make_host_csr(key: PrivateKey, host: str, trust_domain: str) -> bytes:
    """A CSR naming the host; the root holder decides everything else in the certificate."""
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl host {host}"[:64]),
    ])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, _hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_host(csr: x509.CertificateSigningRequest) -> str | None:
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and isinstance(cns[0].value, str) and cns[0].value.startswith("meshctl host "):
        return cns[0].value[len("meshctl host "):]
    return None


# ---------------------------------------------------------------- the root holder signs


def check_can_sign_intermediates(issuer: CA) -> None:
    try:
        bc = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.path_length == 0:
        raise CAError(
            f"CA certificate {describe(issuer.cert)} has pathlen:0, so it cannot issue the hosts' intermediate CAs: "
            "give the root (or an intermediate without pathlen:0) as --ca-cert/--ca-key"
        )


def sign_host_intermediate(
    issuer: CA,
    csr_pem: bytes | str,
    host: str,
    now: datetime | float,
    *,
    lifetime: timedelta = DEFAULT_INTERMEDIATE_TTL,
) -> x509.Certificate:
    """The intermediate CA of ``host`` for the key in its CSR (rule 1)."""
    check_host_name(host)
    check_can_sign_intermediates(issuer)
    csr = validate_csr(csr_pem)
    claimed = csr_host(csr)
    if claimed is not None and claimed != host:
        raise CAError(f"the CSR published for host {host} names host {claimed}: refusing to sign it")
    when = as_datetime(now)
    if when >= issuer.cert.not_valid_after_utc:
        raise CAError(f"the root {describe(issuer.cert)} expired at {issuer.cert.not_valid_after_utc.isoformat()}")
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, issuer.trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl intermediate {host}"[:64]),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(when - BACKDATE, issuer.cert.not_valid_before_utc))
        .not_valid_after(min(when + lifetime, issuer.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(issuer.trust_domain)],
                                 excluded_subtrees=None),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        .sign(issuer.key, _hash_for(issuer.key))
    )


def intermediate_host(cert: x509.Certificate) -> str | None:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and isinstance(cns[0].value, str) and cns[0].value.startswith("meshctl intermediate "):
        return cns[0].value[len("meshctl intermediate "):]
    return None


# ---------------------------------------------------------------- what travels through KV


@dataclass(frozen=True)
class Bundle:
    """The roots every host trusts, and cross-certificates during a rotation."""

    roots: tuple[x509.Certificate, ...]
    cross: tuple[x509.Certificate, ...] = ()
    generation: int = 0

    def to_json(self) -> bytes:
        return json.dumps({
            "roots": [cert_to_pem(c).decode() for c in self.roots],
            "cross": [cert_to_pem(c).decode() for c in self.cross],
            "generation": self.generation,
        }, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes) -> "Bundle":
        try:
            doc = json.loads(raw)
            roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in doc["roots"])
            cross = tuple(x509.load_pem_x509_certificate(p.encode()) for p in doc.get("cross", ()))
            gen = int(doc.get("generation", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CAError(f"the root bundle in KV cannot be read: {exc}") from None
        return Bundle(roots, cross, gen)


def intermediate_doc(chain: Iterable[x509.Certificate], now: datetime | float) -> bytes:
    return json.dumps({"chain": certs_to_pem(chain).decode(), "issued": as_datetime(now).isoformat()}).encode()


def read_intermediate_doc(raw: bytes) -> list[x509.Certificate]:
    try:
        return list(x509.load_pem_x509_certificates(json.loads(raw)["chain"].encode()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CAError(f"the intermediate certificate in KV cannot be read: {exc}") from None


# ---------------------------------------------------------------- the host decides what to take


@dataclass(frozen=True)
class Accepted:
    roots: tuple[x509.Certificate, ...]
    cross: tuple[x509.Certificate, ...]
    refused: tuple[str, ...] = ()  # why each refused root was refused


def accept_bundle(trusted: Iterable[x509.Certificate], offered: Bundle, now: datetime | float) -> Accepted:
    """Rule 3: the roots of ``offered`` this host may trust, given those it trusts now."""
    have = list(trusted)
    when = as_datetime(now)
    if not have:  # first contact: take what is offered
        return Accepted(tuple(offered.roots), tuple(offered.cross))
    keep: list[x509.Certificate] = []
    refused: list[str] = []
    for root in offered.roots:
        if not is_self_signed(root) or not is_ca(root):
            refused.append(f"{describe(root)} is not a self-signed CA certificate")
            continue
        if root in have:
            keep.append(root)
            continue
        vouched = any(
            x.subject == root.subject and spki(x.public_key()) == spki(root.public_key())
            and x.not_valid_before_utc <= when <= x.not_valid_after_utc
            and any(issued_by(x, t) for t in have)
            for x in offered.cross
        )
        if vouched:
            keep.append(root)
        else:
            refused.append(
                f"new root {describe(root)} is not cross-signed by a root this host trusts "
                "(a root changes only through `meshctl citadel rotate-root` on the root holder)"
            )
    cross = tuple(x for x in offered.cross if any(issued_by(x, t) for t in keep))
    return Accepted(tuple(keep), cross, tuple(refused))


def check_intermediate(key: PrivateKey, chain: list[x509.Certificate], roots: Iterable[x509.Certificate],
                       trust_domain: str, now: datetime | float) -> CA:
    """Rule 4: the CA this host signs with, from the chain the root holder published."""
    if not chain:
        raise CAError("the intermediate published for this host is empty")
    cert = chain[0]
    if spki(cert.public_key()) != spki(key.public_key()):
        raise CAError(
            f"the intermediate {describe(cert)} published for this host is for another key "
            "(was the host joined again? approve its new CSR on the root holder)"
        )
    if not is_ca(cert):
        raise CAError(f"the certificate published for this host ({describe(cert)}) is not a CA")
    when = as_datetime(now)
    if not cert.not_valid_before_utc - BACKDATE <= when <= cert.not_valid_after_utc:
        raise CAError(f"the intermediate {describe(cert)} is outside its validity "
                      f"({cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})")
    roots = list(roots)
    links: list[x509.Certificate] = []
    below = cert
    for c in chain[1:]:
        if below in roots:
            break
        if not issued_by(below, c):
            raise CAError(f"the intermediate chain is broken: {describe(below)} was not issued by {describe(c)}")
        links.append(c)
        below = c
    top = next((r for r in roots if issued_by(below, r)), None)
    if top is None:
        raise CAError(f"the intermediate {describe(cert)} does not chain to a root this host trusts")
    if top not in links:
        links.append(top)
    return CA(cert=cert, key=key, chain=tuple(links), trust_domain=trust_domain)


# ---------------------------------------------------------------- rotation


@dataclass(frozen=True)
class HostReport:
    """What a host's Citadel publishes under hosts/<host>."""

    intermediate: str  # serial (hex) of the intermediate it signs with
    roots: tuple[str, ...] = ()  # fingerprints of the roots it trusts
    since: str = ""  # iso time it started signing with this intermediate
    leaf_ttl: float = 0.0  # lifetime of the certificates it issues, seconds
    old_leaves_until: str | None = None  # last expiry of certificates from older intermediates
    updated: str = ""

    def to_json(self) -> bytes:
        return json.dumps({
            "intermediate": self.intermediate, "roots": list(self.roots), "since": self.since,
            "leaf_ttl": self.leaf_ttl, "old_leaves_until": self.old_leaves_until, "updated": self.updated,
        }, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes) -> "HostReport":
        try:
            d = json.loads(raw)
            return HostReport(str(d["intermediate"]), tuple(d.get("roots") or ()), str(d.get("since") or ""),
                              float(d.get("leaf_ttl") or 0), d.get("old_leaves_until"), str(d.get("updated") or ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise CAError(f"a host report in KV cannot be read: {exc}") from None


def rotation_waits(expected: Mapping[str, str], reports: Mapping[str, HostReport], new_root_fp: str,
                   now: datetime | float) -> list[str]:
    """Rule 5: what the end of a rotation still waits for, one line per host
    (empty: the old root can leave the bundle). ``expected``: host → serial of
    the intermediate the root holder issued it from the new root."""
    when = as_datetime(now)
    waits: list[str] = []
    for host, serial in sorted(expected.items()):
        rep = reports.get(host)
        if rep is None:
            waits.append(f"{host}: has not reported yet (is its Citadel running?)")
            continue
        if rep.intermediate != serial:
            waits.append(f"{host}: still signs with intermediate {rep.intermediate[:16]}, not the new {serial[:16]}")
            continue
        if new_root_fp not in rep.roots:
            waits.append(f"{host}: does not trust the new root yet")
            continue
        until = _later(rep.old_leaves_until, _plus(rep.since, rep.leaf_ttl))
        if until is not None and until > when:
            waits.append(f"{host}: certificates from the old intermediate live until {until.isoformat(timespec='seconds')}")
    return waits


def _plus(iso: str, seconds: float) -> datetime | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso) + timedelta(seconds=seconds)


def _later(a: str | None, b: datetime | None) -> datetime | None:
    first = datetime.fromisoformat(a) if a else None
    if first is None:
        return b
    if b is None:
        return first
    return max(first, b)
