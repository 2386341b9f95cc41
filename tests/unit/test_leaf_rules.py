"""The peer-certificate rules a sidecar applies without `cryptography` (citadel/leaf.py):
each one refused in a real mutual-TLS handshake on sockets (proxy/tls.py, the
sidecar's TLSSocketStream path), with certificates signed by the project's CA; the
DER reader agrees with `cryptography` on every certificate here, and refuses what it
cannot read."""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.citadel.errors import PeerRejected, TLSError
from meshctl.citadel.identity import check_leaf, facts_of, load_certificates
from meshctl.citadel.leaf import check_peer_der, pem_to_der, read_der
from meshctl.proxy.stream import FastSocketStream
from meshctl.proxy.tls import CertificateHolder, client_handshake, server_handshake

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"
BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", _now() - timedelta(days=1))


def build(root, *, uris=(PRODUCTPAGE,), ca=False, digital_signature=True, eku=BOTH, key=None,
          not_before=None, not_after=None, cn=None):
    """A leaf signed by ``root`` the way a misbehaving CA might sign it: (PEM, key PEM)."""
    key = key or generate_key()
    now = _now()
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)] if cn else []))
         .issuer_name(root.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or now - timedelta(minutes=5))
         .not_valid_after(not_after or now + timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if digital_signature is not None:
        b = b.add_extension(x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                                          key_encipherment=not digital_signature, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=ca, crl_sign=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=True)
    cert = b.sign(root.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key_to_pem(key)


def holder(root, pem_key) -> CertificateHolder:
    h = CertificateHolder()
    h.update(pem_key[0], pem_key[1], root.root_pem, verify=False)  # as a peer that skipped its own checks
    return h


def good(root, ident=REVIEWS) -> CertificateHolder:
    key = generate_key()
    h = CertificateHolder()
    h.update(root.sign_csr(make_csr(key), ident, timedelta(hours=1), _now()), key_to_pem(key), root.root_pem)
    return h


async def handshake(server, client, *, server_expect=None, client_expect=None, now=_now):
    """Both ends over a socket pair: {"server": TLSConnection or error, "client": ...}."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    got: dict[str, object] = {}

    async def side(name, fn, sock, ctx, expect):
        try:
            conn = await fn(FastSocketStream(sock), ctx, expect, timeout=5, now=now)
            got[name] = conn
            await conn.stream.send_all(b"x")  # TLS 1.3: a client's refusal reaches the server with data
            await conn.stream.receive_some(10)
        except (TLSError, PeerRejected, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            got.setdefault(name, exc)

    async with trio.open_nursery() as n:
        n.start_soon(side, "server", server_handshake, a, server, server_expect)
        n.start_soon(side, "client", client_handshake, b, client, client_expect)
    return got


def refused_as(result, reason: str) -> bool:
    return isinstance(result, PeerRejected) and result.reason == reason


async def test_a_well_formed_peer_passes_both_ways(root):
    got = await handshake(good(root, REVIEWS), good(root, PRODUCTPAGE), server_expect={PRODUCTPAGE},
                          client_expect={REVIEWS})
    assert got["server"].peer_id == PRODUCTPAGE and got["client"].peer_id == REVIEWS


async def test_a_ca_certificate_presented_as_a_leaf_is_refused(root):
    # OpenSSL accepts a CA:true leaf for TLS; only meshctl's rule refuses it
    got = await handshake(good(root), holder(root, build(root, ca=True)))
    assert refused_as(got["server"], "ca-leaf")


async def test_two_uri_sans_are_refused(root):
    got = await handshake(good(root), holder(root, build(root, uris=(PRODUCTPAGE, REVIEWS))))
    assert refused_as(got["server"], "multiple-uri-sans")


@pytest.mark.parametrize("uris", [(), ("https://productpage.example/",)])
async def test_a_certificate_without_a_spiffe_id_is_refused(root, uris):
    got = await handshake(good(root), holder(root, build(root, uris=uris, cn="productpage")))
    assert refused_as(got["server"], "no-spiffe-id")


async def test_a_server_key_usage_without_digital_signature_is_refused_by_meshctl(root):
    # keyEncipherment alone passes OpenSSL's "ssl_server" purpose; meshctl's rule refuses it
    got = await handshake(holder(root, build(root, uris=(REVIEWS,), digital_signature=False)), good(root, PRODUCTPAGE))
    assert refused_as(got["client"], "bad-key-usage") and "digitalSignature" in str(got["client"])


async def test_a_client_key_usage_without_digital_signature_is_refused_by_openssl(root):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    got = await handshake(good(root), holder(root, build(root, digital_signature=False, key=rsa_key)))
    assert isinstance(got["server"], TLSError) and "unsuitable certificate purpose" in str(got["server"])


async def test_a_client_certificate_for_server_auth_only_is_refused_by_the_server(root):
    got = await handshake(good(root), holder(root, build(root, eku=[ExtendedKeyUsageOID.SERVER_AUTH])))
    # libssl verifies the client's chain for the "ssl_client" purpose: the handshake fails there
    assert isinstance(got["server"], TLSError) and "unsuitable certificate purpose" in str(got["server"])


async def test_a_server_certificate_for_client_auth_only_is_refused_by_the_client(root):
    got = await handshake(holder(root, build(root, uris=(REVIEWS,), eku=[ExtendedKeyUsageOID.CLIENT_AUTH])),
                          good(root, PRODUCTPAGE))
    assert isinstance(got["client"], TLSError) and "unsuitable certificate purpose" in str(got["client"])


def test_the_extended_key_usage_rule_itself_names_the_role():
    # the same rule in meshctl's own check (libssl refuses first in a handshake, above)
    facts = read_der(pem_to_der(build(create_root("cluster.local", _now()), eku=[ExtendedKeyUsageOID.SERVER_AUTH]
                                      )[0])[0])
    assert check_peer_der(pem_to_der(build(create_root("cluster.local", _now()))[0])[0], None, _now(),
                          usage="client") == PRODUCTPAGE
    from meshctl.citadel.leaf import check_facts

    with pytest.raises(PeerRejected, match="no extended key usage for TLS client auth") as info:
        check_facts(facts, None, "client")
    assert info.value.reason == "bad-key-usage"
    assert check_facts(facts, None, "server") == PRODUCTPAGE


async def test_a_key_on_a_curve_outside_p256_and_p384_is_refused(root):
    # P-521 passes OpenSSL's security level; meshctl accepts P-256 and P-384 only
    got = await handshake(good(root), holder(root, build(root, key=ec.generate_private_key(ec.SECP521R1()))))
    assert refused_as(got["server"], "weak-key") and "secp521r1" in str(got["server"])


async def test_ed25519_peers_pass(root):
    got = await handshake(good(root), holder(root, build(root, key=ed25519.Ed25519PrivateKey.generate())))
    assert got["server"].peer_id == PRODUCTPAGE


async def test_a_peer_of_another_trust_domain_is_refused(root):
    got = await handshake(good(root), holder(root, build(root, uris=("spiffe://other.example/ns/default/sa/x",))))
    assert refused_as(got["server"], "wrong-trust-domain")


async def test_an_unexpected_identity_is_refused_by_the_client(root):
    got = await handshake(good(root, "spiffe://cluster.local/ns/default/sa/ratings"), good(root, PRODUCTPAGE),
                          client_expect={REVIEWS})
    assert refused_as(got["client"], "wrong-identity") and "ratings" in str(got["client"])


async def test_validity_is_checked_against_the_callers_clock(root):
    # OpenSSL checks validity against the system clock; meshctl's own check uses the
    # injected one: the peer's certificate (1 h) has expired by then, or is not valid yet
    later = lambda: _now() + timedelta(hours=2)  # noqa: E731
    got = await handshake(good(root), good(root, PRODUCTPAGE), now=later)
    assert refused_as(got["server"], "expired") and refused_as(got["client"], "expired")
    earlier = lambda: _now() - timedelta(hours=2)  # noqa: E731
    got = await handshake(good(root), good(root, PRODUCTPAGE), now=earlier)
    assert refused_as(got["server"], "not-yet-valid")


async def test_an_expired_peer_fails_in_openssl_already(root):
    t = _now() - timedelta(hours=3)
    got = await handshake(good(root), holder(root, build(root, not_before=t, not_after=t + timedelta(hours=1))))
    assert isinstance(got["server"], TLSError) and "expired" in str(got["server"])


# ---------------------------------------------------------------- the DER reader


def _variants(root):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    yield build(root)[0]
    yield build(root, ca=True)[0]
    yield build(root, uris=(PRODUCTPAGE, REVIEWS))[0]
    yield build(root, uris=(), cn="productpage")[0]
    yield build(root, digital_signature=False, key=rsa_key)[0]
    yield build(root, digital_signature=None, eku=None)[0]
    yield build(root, eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, ExtendedKeyUsageOID.CODE_SIGNING])[0]
    yield build(root, key=ec.generate_private_key(ec.SECP384R1()))[0]
    yield build(root, key=ec.generate_private_key(ec.SECP521R1()))[0]
    yield build(root, key=ed25519.Ed25519PrivateKey.generate())[0]
    yield build(root, not_after=datetime(2051, 1, 2, 3, 4, 5, tzinfo=timezone.utc))[0]  # GeneralizedTime
    yield root.root_pem


def test_the_der_reader_agrees_with_cryptography(root):
    for pem in _variants(root):
        cert = load_certificates(pem)[0]
        (der,) = pem_to_der(pem)
        mine, theirs = read_der(der), facts_of(cert)
        # a certificate without a URI SAN is named by its CN alone in messages (cryptography: the whole subject)
        assert replace(mine, name="") == replace(theirs, name="") and (mine.name == theirs.name or not mine.uris)
        for usage in ("server", "client", None):
            try:
                want = check_leaf(cert, None, _now(), usage=usage, trust_domain="cluster.local")
            except PeerRejected as exc:
                with pytest.raises(PeerRejected) as info:
                    check_peer_der(der, None, _now(), usage=usage, trust_domain="cluster.local")
                assert info.value.reason == exc.reason
                assert str(info.value) == str(exc) or not mine.uris
            else:
                assert check_peer_der(der, None, _now(), usage=usage, trust_domain="cluster.local") == want


def test_what_the_reader_cannot_read_is_refused_not_guessed(root):
    (der,) = pem_to_der(build(root)[0])
    for bad in (b"", der[:-1], der + b"\x00", der[:40], b"\x30\x03\x02\x01\x01", bytes([0x30, 0x84]) + der[2:]):
        with pytest.raises(PeerRejected) as info:
            read_der(bad)
        assert info.value.reason == "bad-certificate"


def test_a_sidecar_reads_its_own_certificate_without_cryptography(root):
    h = good(root, REVIEWS)
    assert h.identity == REVIEWS and h.not_after - h.not_before == timedelta(hours=1, seconds=60)
    with pytest.raises(TLSError, match="cannot read the workload certificate") as info:
        CertificateHolder().update(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"", root.root_pem)
    assert info.value.reason == "bad-certificate"
