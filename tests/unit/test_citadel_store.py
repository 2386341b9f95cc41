"""The CA on disk: init, plug-in, permissions, root rotation with overlap, tokens shared between processes."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone

import pytest

from meshctl.citadel.ca import cert_to_pem, create_root, generate_key, key_to_pem, make_csr, sign_intermediate
from meshctl.citadel.errors import CAError, PeerRejected, TokenReused
from meshctl.citadel.identity import verify_peer
from meshctl.citadel.store import (
    TokenFile,
    ca_dir,
    ca_info,
    ensure_ca,
    init_ca,
    latest_by_identity,
    load_ca_from,
    read_issued,
    record_issued,
    rotate_root,
    trust_bundle_pem,
)

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
ID = "spiffe://example.org/ns/default/sa/reviews"


def test_init_writes_the_ca_with_a_private_key_file(tmp_path):
    ca = init_ca(tmp_path, "example.org", now=NOW)
    d = ca_dir(tmp_path)
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "root-cert.pem").read_bytes() == ca.root_pem
    assert (d / "trust-bundle.pem").read_bytes() == ca.root_pem
    again = load_ca_from(tmp_path)
    assert again.cert == ca.cert and again.trust_domain == "example.org"
    assert not list(d.glob(".*.tmp"))


def test_init_refuses_to_overwrite_and_ensure_reuses(tmp_path):
    first = init_ca(tmp_path, "example.org", now=NOW)
    with pytest.raises(CAError, match="already exists"):
        init_ca(tmp_path, "example.org", now=NOW)
    assert ensure_ca(tmp_path, "example.org", now=NOW).cert == first.cert


def test_missing_ca_names_the_command_to_run(tmp_path):
    with pytest.raises(CAError, match="meshctl citadel init"):
        load_ca_from(tmp_path)


def test_plugged_in_intermediate(tmp_path):
    root = create_root("example.org", NOW)
    inter = sign_intermediate(root, NOW)
    init_ca(tmp_path, "example.org", cert_to_pem(inter.cert), key_to_pem(inter.key), cert_to_pem(root.cert), now=NOW)
    ca = load_ca_from(tmp_path)
    assert ca.cert == inter.cert and ca.root == root.cert
    assert trust_bundle_pem(tmp_path, NOW) == root.root_pem
    with pytest.raises(CAError, match="plugged-in CA"):
        rotate_root(tmp_path, NOW)


def test_istio_cacerts_root_cert_completes_or_checks_the_chain(tmp_path):
    root = create_root("example.org", NOW)
    inter = sign_intermediate(root, NOW)
    # cert-chain.pem without the root, root-cert.pem separately: the root is appended
    init_ca(tmp_path / "a", None, cert_to_pem(inter.cert), key_to_pem(inter.key), None, now=NOW, root=root.root_pem)
    ca = load_ca_from(tmp_path / "a")
    assert ca.root == root.cert and trust_bundle_pem(tmp_path / "a", NOW) == root.root_pem
    chain = ca_info(tmp_path / "a", NOW)["chain"]
    assert [c["root"] for c in chain] == [False, True]
    # a root from another PKI is refused, and nothing is written
    other = create_root("example.org", NOW)
    with pytest.raises(CAError, match="not at the root certificate given"):
        init_ca(tmp_path / "b", None, cert_to_pem(inter.cert), key_to_pem(inter.key), cert_to_pem(root.cert),
                now=NOW, root=other.root_pem)
    assert not (tmp_path / "b" / "ca").exists()


def test_plugging_a_bad_ca_writes_nothing(tmp_path):
    root = create_root("example.org", NOW)
    with pytest.raises(CAError, match="does not match"):
        init_ca(tmp_path, "example.org", cert_to_pem(root.cert), key_to_pem(generate_key()), now=NOW)
    with pytest.raises(CAError, match="both --cert and --key"):
        init_ca(tmp_path, "example.org", cert_to_pem(root.cert), None, now=NOW)
    assert not (ca_dir(tmp_path) / "ca-key.pem").exists()


def test_rotate_root_keeps_old_root_trusted_for_the_overlap(tmp_path):
    old = init_ca(tmp_path, "example.org", now=NOW)
    old_leaf = old.sign_csr(make_csr(generate_key()), ID, None, NOW)
    t1 = NOW + timedelta(hours=1)
    new = rotate_root(tmp_path, t1, overlap=timedelta(hours=48))
    assert new.root != old.root and load_ca_from(tmp_path).root == new.root
    new_leaf = new.sign_csr(make_csr(generate_key()), ID, None, t1)
    bundle = trust_bundle_pem(tmp_path, t1)
    assert verify_peer(old_leaf, bundle, {ID}, t1) == ID
    assert verify_peer(new_leaf, bundle, {ID}, t1) == ID
    # after the overlap only the new root is trusted
    later = t1 + timedelta(hours=49)
    assert trust_bundle_pem(tmp_path, later) == new.root_pem
    with pytest.raises(PeerRejected) as info:
        verify_peer(old_leaf, trust_bundle_pem(tmp_path, later), None, NOW + timedelta(hours=2))
    assert info.value.reason == "untrusted"


def test_token_file_is_shared_between_instances(tmp_path):
    issuer, server = TokenFile(tmp_path), TokenFile(tmp_path)  # e.g. the CLI and `citadel serve`
    tok = issuer.issue_token(ID, 600, NOW)
    assert server.redeem(tok, NOW) == ID
    with pytest.raises(TokenReused):
        issuer.redeem(tok, NOW)
    path = ca_dir(tmp_path) / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tok not in path.read_text()


def test_issued_log_gives_the_latest_per_identity(tmp_path):
    ca = init_ca(tmp_path, "example.org", now=NOW)
    from cryptography import x509

    for i in range(2):
        pem = ca.sign_csr(make_csr(generate_key()), ID, None, NOW + timedelta(hours=i))
        record_issued(tmp_path, ID, x509.load_pem_x509_certificate(pem), "token" if i == 0 else "renewal")
    assert len(read_issued(tmp_path)) == 2
    latest = latest_by_identity(tmp_path)[ID]
    assert latest["how"] == "renewal"
    assert latest["not_after"] == (NOW + timedelta(hours=25)).isoformat()


def test_rotation_cross_certificate_lets_old_bundles_accept_new_leaves(tmp_path):
    from meshctl.citadel.store import rotation_chain_pem

    old = init_ca(tmp_path, "example.org", now=NOW)
    assert rotation_chain_pem(tmp_path, NOW) == b""
    t1 = NOW + timedelta(hours=1)
    new = rotate_root(tmp_path, t1, overlap=timedelta(hours=48))
    new_leaf = new.sign_csr(make_csr(generate_key()), ID, None, t1)
    # a peer that never fetched the new bundle
    with pytest.raises(PeerRejected):
        verify_peer(new_leaf, old.root_pem, {ID}, t1)
    assert verify_peer(new_leaf + rotation_chain_pem(tmp_path, t1), old.root_pem, {ID}, t1) == ID
    # a second rotation inside the overlap chains through both cross-certificates
    t2 = t1 + timedelta(hours=1)
    newer = rotate_root(tmp_path, t2, overlap=timedelta(hours=48))
    newest_leaf = newer.sign_csr(make_csr(generate_key()), ID, None, t2)
    assert verify_peer(newest_leaf + rotation_chain_pem(tmp_path, t2), old.root_pem, {ID}, t2) == ID
    # once the overlap is over, nothing extra is sent
    assert rotation_chain_pem(tmp_path, t2 + timedelta(hours=49)) == b""
