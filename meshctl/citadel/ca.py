"""The certificate authority: a root (or the user's intermediate) that signs workload CSRs.

Pure functions on ``cryptography`` objects; no file I/O (that is store.py)
and no clock reads (``now`` is passed in).

What a workload certificate looks like (checked by tests/unit/test_citadel_ca.py):
- exactly one SAN, a critical URI SAN holding the SPIFFE ID that *Citadel*
  chose from the verified bootstrap identity; SANs in the CSR are ignored;
- empty subject (as SPIFFE X.509-SVIDs recommend), CA:false, keyUsage
  digitalSignature, extendedKeyUsage serverAuth + clientAuth;
- 24 h lifetime by default, notBefore backdated 60 s for clock skew (at most
  a quarter of the lifetime, so renewal at half-life stays ahead), never
  past the CA's own notAfter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CAError, CSRError, WeakKey
from .identity import (
    as_datetime,
    as_timedelta,
    check_key_strength,
    describe,
    is_ca,
    is_spiffe_id,
    issued_by,
    uri_sans,
)

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

DEFAULT_LEAF_TTL = timedelta(hours=24)
MAX_LEAF_TTL = timedelta(days=90)
ROOT_LIFETIME = timedelta(days=3650)
BACKDATE = timedelta(seconds=60)
DEFAULT_TRUST_DOMAIN = "cluster.local"


# ---------------------------------------------------------------- keys and PEM helpers


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key (the key type of every key meshctl creates)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(key_pem: bytes | str, what: str = "private key") -> PrivateKey:
    data = key_pem.encode() if isinstance(key_pem, str) else key_pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{what} is encrypted; give meshctl an unencrypted PEM key (file mode 0600)") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError / UnsupportedAlgorithm
        raise CAError(f"cannot read {what}: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CAError(f"{what} has unsupported type {type(key).__name__}")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _hash_for(key: PrivateKey):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_csr(key: PrivateKey, spiffe_id: str | None = None) -> bytes:
    """A PEM CSR for ``key``. The SPIFFE ID is informative only: Citadel ignores it."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
    return builder.sign(key, _hash_for(key)).public_bytes(serialization.Encoding.PEM)


def is_self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


# ---------------------------------------------------------------- the CA


@dataclass(frozen=True)
class CA:
    """A signing CA. ``chain`` holds the certificates above ``cert``, up to and
    including the self-signed root; it is empty when ``cert`` is the root."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __repr__(self) -> str:  # never print key material
        return f"CA({describe(self.cert)!r}, trust_domain={self.trust_domain!r}, chain={len(self.chain)})"

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

    @property
    def root_pem(self) -> bytes:
        return cert_to_pem(self.root)

    @property
    def cert_chain_pem(self) -> bytes:
        """Signing cert, intermediates, root (Istio's cert-chain.pem)."""
        return certs_to_pem((self.cert, *self.chain))

    @property
    def issuer_chain_pem(self) -> bytes:
        """What follows a leaf on the wire: the signing cert and intermediates, not the root."""
        return certs_to_pem(c for c in (self.cert, *self.chain) if not is_self_signed(c))

    def sign_csr(
        self,
        csr_pem: bytes | str,
        spiffe_id: str,
        ttl: timedelta | float | None,
        now: datetime | float,
    ) -> bytes:
        """Sign a workload CSR; returns the leaf certificate as PEM.

        ``spiffe_id`` is the identity Citadel verified (from the bootstrap
        token or the current certificate), never anything the CSR claims.
        """
        when = as_datetime(now)
        if not is_spiffe_id(spiffe_id):
            raise CSRError(f"refusing to sign: {spiffe_id!r} is not a SPIFFE ID")
        lifetime = DEFAULT_LEAF_TTL if ttl is None else as_timedelta(ttl)
        if lifetime <= timedelta(0):
            raise CSRError(f"refusing to sign: certificate lifetime must be positive, got {lifetime}")
        if lifetime > MAX_LEAF_TTL:
            raise CSRError(f"refusing to sign: lifetime {lifetime} exceeds the maximum {MAX_LEAF_TTL}")
        if when >= self.cert.not_valid_after_utc:
            raise CAError(
                f"CA certificate {describe(self.cert)} expired at {self.cert.not_valid_after_utc.isoformat()}; "
                "rotate the root (meshctl citadel rotate-root) or plug in a new CA"
            )
        if when < self.cert.not_valid_before_utc:
            raise CAError(
                f"CA certificate {describe(self.cert)} is not valid until "
                f"{self.cert.not_valid_before_utc.isoformat()} (clock skew?)"
            )
        csr = validate_csr(csr_pem)
        # backdated for clock skew, but by at most a quarter of the lifetime: sidecars renew
        # at half of notBefore..notAfter, which a 60 s backdate puts in the past for short
        # lifetimes (a 6 s certificate was renewed again at once, dozens of times a second)
        not_before = max(when - min(BACKDATE, lifetime / 4), self.cert.not_valid_before_utc)
        not_after = min(when + lifetime, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(csr.public_key(), rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        leaf = builder.sign(self.key, _hash_for(self.key))
        return cert_to_pem(leaf)


def validate_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its signature and key strength, without signing it
    (so a bad CSR is refused before a one-time token is spent on it)."""
    csr = _load_csr(csr_pem)
    try:
        check_key_strength(csr.public_key(), "CSR key")
    except WeakKey as exc:
        raise WeakKey(f"refusing to sign: {exc}") from None
    return csr


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRError(f"cannot parse CSR (expected PEM 'CERTIFICATE REQUEST'): {exc}") from None
    if not csr.is_signature_valid:
        raise CSRError("CSR signature is invalid: the requester does not hold the key in the CSR")
    return csr


def create_root(
    trust_domain: str,
    now: datetime | float,
    *,
    lifetime: timedelta = ROOT_LIFETIME,
    key: PrivateKey | None = None,
) -> CA:
    """A new self-signed EC P-256 root: CA:true, keyCertSign + cRLSign, 10 years."""
    when = as_datetime(now)
    key = key or generate_key()
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            # a distinct name per root, so an old and a new root never share a subject
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl root CA {serial:x}"[:32]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(when - BACKDATE)
        .not_valid_after(when + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash_for(key))
    )
    return CA(cert=cert, key=key, chain=(), trust_domain=trust_domain)


def load_ca(
    cert_pem: bytes | str,
    key_pem: bytes | str,
    chain_pem: bytes | str | None = None,
    *,
    trust_domain: str | None = None,
    root_pem: bytes | str | None = None,
) -> CA:
    """Load a user-supplied root or intermediate CA and check it can sign.

    ``root_pem`` (Istio's root-cert.pem), when given, is the organisation's
    root: the chain must end at it (it is appended when the chain stops just
    below it), so workload certificates chain to it and sidecars trust it.

    ``chain_pem`` (Istio's cert-chain.pem) carries the certificates above an
    intermediate up to its self-signed root; it may start with the CA cert
    itself. Raises CAError naming what is wrong.
    """
    raw = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise CAError(f"cannot read the CA certificate (expected PEM): {exc}") from None
    cert, extra = certs[0], list(certs[1:])
    key = load_key(key_pem, "CA private key")
    if not is_ca(cert):
        raise CAError(
            f"certificate {describe(cert)} is not a CA (basicConstraints CA:true is missing); "
            "give a root or intermediate CA certificate"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CAError(f"CA certificate {describe(cert)} lacks the keyCertSign key usage")
    except x509.ExtensionNotFound:
        pass
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise CAError(f"the private key does not match the CA certificate {describe(cert)}")
    try:
        check_key_strength(cert.public_key(), "CA key")
    except WeakKey as exc:
        raise CAError(str(exc)) from None
    if chain_pem:
        raw_chain = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
        try:
            extra += x509.load_pem_x509_certificates(raw_chain)
        except ValueError as exc:
            raise CAError(f"cannot read the certificate chain (expected PEM): {exc}") from None
    chain: list[x509.Certificate] = []
    for c in extra:
        if c != cert and c not in chain:
            chain.append(c)
    if root_pem:
        raw_root = root_pem.encode() if isinstance(root_pem, str) else root_pem
        try:
            roots = x509.load_pem_x509_certificates(raw_root)
        except ValueError as exc:
            raise CAError(f"cannot read the root certificate (expected PEM): {exc}") from None
        if len(roots) != 1 or not is_self_signed(roots[0]):
            raise CAError("the root certificate (root-cert.pem) must be one self-signed certificate")
        top = chain[-1] if chain else cert
        if not is_self_signed(top) and roots[0] not in chain:
            chain.append(roots[0])
    # the chain must link cert → ... → self-signed root
    below = cert
    for c in chain:
        if not issued_by(below, c):
            raise CAError(
                f"certificate chain is broken: {describe(below)} was not issued by {describe(c)} "
                "(order the chain from the CA upwards to the root)"
            )
        if not is_ca(c):
            raise CAError(f"certificate {describe(c)} in the chain is not a CA")
        below = c
    if not is_self_signed(below):
        raise CAError(
            f"{describe(below)} is not a self-signed root and no issuer follows it: "
            "pass the chain up to the root (cert-chain.pem)"
        )
    if root_pem and below != roots[0]:
        raise CAError(
            f"the chain ends at {describe(below)}, not at the root certificate given ({describe(roots[0])}): "
            "cert-chain.pem and root-cert.pem must be from the same PKI"
        )
    td = trust_domain or _trust_domain_of(cert) or DEFAULT_TRUST_DOMAIN
    return CA(cert=cert, key=key, chain=tuple(chain), trust_domain=td)


def _trust_domain_of(cert: x509.Certificate) -> str | None:
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://"):].split("/", 1)[0]
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if orgs and isinstance(orgs[0].value, str) and "." in orgs[0].value:
        return orgs[0].value
    return None


def sign_intermediate(
    parent: CA, now: datetime | float, *, lifetime: timedelta = timedelta(days=365), key: PrivateKey | None = None
) -> CA:
    """An intermediate CA under ``parent`` (for tests and for plugging a two-level PKI)."""
    when = as_datetime(now)
    key = key or generate_key()
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, parent.trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl intermediate CA {serial:x}"[:40]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(when - BACKDATE)
        .not_valid_after(min(when + lifetime, parent.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
        )
        .sign(parent.key, _hash_for(parent.key))
    )
    return CA(cert=cert, key=key, chain=(parent.cert, *parent.chain), trust_domain=parent.trust_domain)


def cross_sign(old: CA, new: CA, now: datetime | float, until: datetime) -> x509.Certificate:
    """The new root's name and key, certified by the old root (a cross-certificate).

    Sent after workload certificates during a root rotation, it lets a peer
    that still trusts only the old root verify a certificate signed by the
    new one: leaf → cross-certificate → old root."""
    when = as_datetime(now)
    return (
        x509.CertificateBuilder()
        .subject_name(new.root.subject)
        .issuer_name(old.root.subject)
        .public_key(new.root.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - BACKDATE)
        .not_valid_after(min(until, old.root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(new.root.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(old.key.public_key()), critical=False
        )
        .sign(old.key, _hash_for(old.key))
    )
