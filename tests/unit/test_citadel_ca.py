"""What Citadel puts in a workload certificate, and which CAs and CSRs it refuses."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshctl.citadel.ca import (
    CA,
    cert_to_pem,
    create_root,
    generate_key,
    key_to_pem,
    load_ca,
    make_csr,
    sign_intermediate,
)
from meshctl.citadel.errors import CAError, CSRError, WeakKey
from meshctl.citadel.identity import verify_peer

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
ID = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.fixture(scope="module")
def root() -> CA:
    return create_root("cluster.local", NOW)


def _leaf(root: CA, csr: bytes, spiffe: str = ID, ttl=None) -> x509.Certificate:
    return x509.load_pem_x509_certificate(root.sign_csr(csr, spiffe, ttl, NOW))


def test_root_is_a_ten_year_ec_p256_ca(root):
    c = root.cert
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp256r1"
    bc = c.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert c.issuer == c.subject
    assert c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"
    life = c.not_valid_after_utc - c.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)


def test_leaf_has_exactly_one_uri_san_chosen_by_citadel_not_the_csr(root):
    key = generate_key()
    # the CSR claims to be the admin service account; Citadel writes what it verified
    csr = make_csr(key, "spiffe://cluster.local/ns/istio-system/sa/admin")
    leaf = _leaf(root, csr)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ID)]
    assert leaf.subject == x509.Name([])


def test_leaf_is_not_a_ca_and_has_tls_usages(root):
    leaf = _leaf(root, make_csr(generate_key()))
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    eku = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_lifetime_is_24h_by_default_and_backdated_for_skew(root):
    leaf = _leaf(root, make_csr(generate_key()))
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)
    short = _leaf(root, make_csr(generate_key()), ttl=3600)
    assert short.not_valid_after_utc == NOW + timedelta(hours=1)


def test_a_short_lived_leaf_is_backdated_by_a_quarter_of_its_life_so_half_life_renewal_is_ahead():
    # 60 s of backdating on a 6 s certificate put its half-life 27 s in the past: the
    # sidecar renewed again as soon as it loaded it, dozens of times a second
    ca = create_root("cluster.local", NOW - timedelta(days=1))
    leaf = x509.load_pem_x509_certificate(ca.sign_csr(make_csr(generate_key()), ID, 6, NOW))
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=2)  # 1.5 s, in whole seconds
    half = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
    assert half > NOW


def test_leaf_never_outlives_its_ca():
    ca = create_root("cluster.local", NOW, lifetime=timedelta(hours=2))
    leaf = x509.load_pem_x509_certificate(ca.sign_csr(make_csr(generate_key()), ID, timedelta(hours=24), NOW))
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_leaf_verifies_against_the_root(root):
    leaf_pem = root.sign_csr(make_csr(generate_key()), ID, None, NOW)
    assert verify_peer(leaf_pem, root.root_pem, {ID}, NOW + timedelta(minutes=1)) == ID


def test_rsa_1024_csr_is_refused(root):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(WeakKey, match="RSA 1024 bits; at least 2048"):
        root.sign_csr(make_csr(weak), ID, None, NOW)


def test_p521_and_secp256k1_csrs_are_refused(root):
    for curve in (ec.SECP521R1(), ec.SECP256K1()):
        with pytest.raises(WeakKey, match=f"EC curve {curve.name}"):
            root.sign_csr(make_csr(ec.generate_private_key(curve)), ID, None, NOW)


def test_rsa_2048_and_p384_csrs_are_signed(root):
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(ec.SECP384R1())):
        leaf = _leaf(root, make_csr(key))
        assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def test_csr_with_a_bad_signature_is_refused(root):
    # splice key B's public key under key A's signature: a requester without the key
    a, b = generate_key(), generate_key()
    good = x509.load_pem_x509_csr(make_csr(a))
    forged_der = bytearray(good.public_bytes(serialization.Encoding.DER))
    spki_a = a.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_b = b.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    i = bytes(forged_der).index(spki_a)
    forged_der[i : i + len(spki_a)] = spki_b
    forged = x509.load_der_x509_csr(bytes(forged_der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CSRError, match="signature is invalid"):
        root.sign_csr(forged, ID, None, NOW)


def test_garbage_csr_and_non_spiffe_identity_are_refused(root):
    with pytest.raises(CSRError, match="cannot parse CSR"):
        root.sign_csr(b"hello", ID, None, NOW)
    with pytest.raises(CSRError, match="not a SPIFFE ID"):
        root.sign_csr(make_csr(generate_key()), "https://reviews", None, NOW)
    with pytest.raises(CSRError, match="exceeds the maximum"):
        root.sign_csr(make_csr(generate_key()), ID, timedelta(days=365), NOW)


def test_expired_ca_refuses_to_sign():
    ca = create_root("cluster.local", NOW, lifetime=timedelta(hours=1))
    with pytest.raises(CAError, match="expired"):
        ca.sign_csr(make_csr(generate_key()), ID, None, NOW + timedelta(hours=2))


def test_ca_refuses_to_sign_before_it_is_valid():
    ca = create_root("cluster.local", NOW)
    with pytest.raises(CAError, match="not valid until"):
        ca.sign_csr(make_csr(generate_key()), ID, None, NOW - timedelta(hours=1))


def test_load_ca_round_trips_a_root(root):
    ca = load_ca(cert_to_pem(root.cert), key_to_pem(root.key))
    assert ca.root == root.cert and ca.chain == ()
    assert ca.trust_domain == "cluster.local"
    assert "PRIVATE" not in repr(ca)


def test_load_ca_with_intermediate_and_chain(root):
    inter = sign_intermediate(root, NOW)
    ca = load_ca(cert_to_pem(inter.cert), key_to_pem(inter.key), cert_to_pem(root.cert))
    assert ca.root == root.cert
    leaf_pem = ca.sign_csr(make_csr(generate_key()), ID, None, NOW)
    # a peer presents leaf + intermediate; the trust bundle holds only the root
    assert verify_peer(leaf_pem + ca.issuer_chain_pem, root.root_pem, {ID}, NOW) == ID


def test_load_ca_refuses_a_leaf_certificate(root):
    key = generate_key()
    leaf_pem = root.sign_csr(make_csr(key), ID, None, NOW)
    with pytest.raises(CAError, match="is not a CA"):
        load_ca(leaf_pem, key_to_pem(key))


def test_load_ca_refuses_a_mismatched_key(root):
    with pytest.raises(CAError, match="does not match"):
        load_ca(cert_to_pem(root.cert), key_to_pem(generate_key()))


def test_load_ca_intermediate_without_chain_is_refused(root):
    inter = sign_intermediate(root, NOW)
    with pytest.raises(CAError, match="not a self-signed root"):
        load_ca(cert_to_pem(inter.cert), key_to_pem(inter.key))
    other = create_root("cluster.local", NOW)
    with pytest.raises(CAError, match="chain is broken"):
        load_ca(cert_to_pem(inter.cert), key_to_pem(inter.key), cert_to_pem(other.cert))


def test_load_ca_refuses_encrypted_keys(root):
    enc = root.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(CAError, match="encrypted"):
        load_ca(cert_to_pem(root.cert), enc)
