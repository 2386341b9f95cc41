"""SPIFFE IDs, and every kind of bad peer certificate refused with its own reason."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshctl.citadel.ca import CA, create_root, generate_key, sign_intermediate
from meshctl.citadel.errors import PeerRejected
from meshctl.citadel.identity import (
    InvalidSpiffeId,
    SpiffeId,
    check_leaf,
    parse_spiffe_id,
    spiffe_id,
    verify_peer,
)

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


@pytest.fixture(scope="module")
def root() -> CA:
    return create_root("cluster.local", NOW - timedelta(days=1))


def forge(
    issuer: CA,
    *,
    uris=(REVIEWS,),
    ca=False,
    key=None,
    not_before=NOW - timedelta(hours=1),
    not_after=NOW + timedelta(hours=23),
    eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    digital_signature=True,
) -> x509.Certificate:
    """A certificate with exactly the defects a test asks for, signed by ``issuer``."""
    key = key or generate_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature, False, False, False, False, ca, ca, False, False), critical=True
        )
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uris:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
        )
    return b.sign(issuer.key, hashes.SHA256())


def reason_of(chain, bundle, expected, now=NOW, **kw) -> str:
    with pytest.raises(PeerRejected) as info:
        verify_peer(chain, bundle, expected, now, **kw)
    assert str(info.value)  # every rejection says why in words
    return info.value.reason


# ---------------------------------------------------------------- SPIFFE IDs


def test_spiffe_id_round_trip():
    s = spiffe_id("cluster.local", "default", "bookinfo-productpage")
    assert s == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    p = parse_spiffe_id(s)
    assert p == SpiffeId("cluster.local", "default", "bookinfo-productpage")
    assert str(p) == s
    assert p.principal == "cluster.local/ns/default/sa/bookinfo-productpage"
    assert parse_spiffe_id(p.principal) == p


@pytest.mark.parametrize(
    "bad",
    [
        "https://cluster.local/ns/default/sa/x",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/namespace/default/sa/x",
        "spiffe://Cluster.Local/ns/default/sa/x",
        "spiffe://cluster.local/ns/default/sa/x/extra",
        "spiffe://cluster.local/ns//sa/x",
    ],
)
def test_parse_spiffe_id_refuses_malformed_ids(bad):
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(bad)


def test_spiffe_id_refuses_slashes_in_parts():
    with pytest.raises(InvalidSpiffeId, match="namespace"):
        spiffe_id("cluster.local", "a/b", "x")


# ---------------------------------------------------------------- good peers


def test_good_peer_passes_and_returns_its_id(root):
    leaf = forge(root)
    assert verify_peer([leaf], root.root_pem, {REVIEWS, PRODUCTPAGE}, NOW) == REVIEWS
    assert verify_peer([leaf], [root.cert], None, NOW) == REVIEWS  # any identity accepted
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert verify_peer(der, root.root_pem, {REVIEWS}, NOW) == REVIEWS
    assert check_leaf(der, {REVIEWS}, NOW, usage="server") == REVIEWS


def test_peer_through_an_intermediate_passes(root):
    inter = sign_intermediate(root, NOW - timedelta(hours=2))
    leaf = forge(inter)
    assert verify_peer([leaf, inter.cert], root.root_pem, {REVIEWS}, NOW) == REVIEWS
    # without the intermediate the chain cannot be built
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "untrusted"


# ---------------------------------------------------------------- bad peers, one defect each


def test_wrong_spiffe_id_is_refused(root):
    with pytest.raises(PeerRejected, match="not the expected one") as info:
        verify_peer([forge(root)], root.root_pem, {PRODUCTPAGE}, NOW)
    assert info.value.reason == "wrong-identity"
    assert REVIEWS in str(info.value) and PRODUCTPAGE in str(info.value)


def test_expired_peer_is_refused(root):
    leaf = forge(root, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(days=1))
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "expired"


def test_not_yet_valid_peer_is_refused(root):
    leaf = forge(root, not_before=NOW + timedelta(hours=1), not_after=NOW + timedelta(days=1))
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "not-yet-valid"


def test_peer_from_a_foreign_root_is_refused(root):
    # same trust domain, same kind of name, different key: an impostor CA
    foreign = create_root("cluster.local", NOW - timedelta(days=1))
    leaf = forge(foreign)
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "untrusted"
    # presenting the foreign root in the chain does not help
    assert reason_of([leaf, foreign.cert], root.root_pem, {REVIEWS}) == "untrusted"


def test_same_subject_different_key_root_is_refused(root):
    impostor = CA(
        cert=root.cert, key=generate_key(), chain=(), trust_domain="cluster.local"
    )  # signs with the wrong key under the real root's name
    leaf = forge(impostor)
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "untrusted"


def test_two_uri_sans_are_refused(root):
    leaf = forge(root, uris=(REVIEWS, PRODUCTPAGE))
    assert reason_of([leaf], root.root_pem, None) == "multiple-uri-sans"


def test_no_uri_san_or_non_spiffe_uri_is_refused(root):
    assert reason_of([forge(root, uris=())], root.root_pem, None) == "no-spiffe-id"
    assert reason_of([forge(root, uris=("https://reviews.example",))], root.root_pem, None) == "no-spiffe-id"


def test_ca_true_leaf_is_refused(root):
    leaf = forge(root, ca=True)
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "ca-leaf"


def test_weak_key_leaf_is_refused(root):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    leaf = forge(root, key=weak)
    assert reason_of([leaf], root.root_pem, {REVIEWS}) == "weak-key"


def test_key_usage_must_allow_the_role(root):
    server_only = forge(root, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert verify_peer([server_only], root.root_pem, None, NOW, usage="server") == REVIEWS
    assert reason_of([server_only], root.root_pem, None, usage="client") == "bad-key-usage"
    no_sig = forge(root, digital_signature=False)
    assert reason_of([no_sig], root.root_pem, None) == "bad-key-usage"


def test_empty_chain_and_empty_bundle_are_refused(root):
    assert reason_of([], root.root_pem, None) == "no-certificate"
    assert reason_of([forge(root)], [], None) == "untrusted"
    assert reason_of(b"not a certificate", root.root_pem, None) == "bad-certificate"


def test_expired_root_in_bundle_does_not_vouch(root):
    old = create_root("cluster.local", NOW - timedelta(days=10), lifetime=timedelta(days=5))
    leaf = forge(old, not_before=NOW - timedelta(hours=1))
    assert reason_of([leaf], old.root_pem, None) == "untrusted"
