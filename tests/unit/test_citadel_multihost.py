"""The rules of a trust domain over several hosts (meshctl/citadel/multihost.py), one test each."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from meshctl.citadel.ca import CA, create_root, cross_sign, generate_key, make_csr, sign_intermediate
from meshctl.citadel.errors import CAError
from meshctl.citadel.multihost import (
    Bundle,
    HostReport,
    accept_bundle,
    check_intermediate,
    fingerprint,
    make_host_csr,
    rotation_waits,
    sign_host_intermediate,
)

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
TD = "cluster.local"


@pytest.fixture(scope="module")
def root() -> CA:
    return create_root(TD, NOW - timedelta(days=1))


def host_ca(root: CA, host: str = "vm1") -> tuple[CA, x509.Certificate]:
    key = generate_key()
    cert = sign_host_intermediate(root, make_host_csr(key, host, TD), host, NOW)
    return CA(cert=cert, key=key, chain=(root.cert,), trust_domain=TD), cert


def test_a_host_intermediate_signs_workloads_only_and_only_in_the_trust_domain(root):
    _, cert = host_ca(root)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0  # can never certify another host's intermediate
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and list(nc.value.permitted_subtrees) == [x509.UniformResourceIdentifier(TD)]
    assert "meshctl intermediate vm1" in cert.subject.rfc4514_string()
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_a_csr_published_under_another_hosts_name_is_not_signed(root):
    key = generate_key()
    with pytest.raises(CAError, match="published for host vm2 names host vm1"):
        sign_host_intermediate(root, make_host_csr(key, "vm1", TD), "vm2", NOW)


def test_an_issuer_with_pathlen_0_cannot_make_host_intermediates(root):
    plugged = sign_intermediate(root, NOW)  # pathlen:0, as Istio's sample intermediate
    with pytest.raises(CAError, match="pathlen:0, so it cannot issue the hosts' intermediate CAs"):
        sign_host_intermediate(plugged, make_host_csr(generate_key(), "vm1", TD), "vm1", NOW)


def test_first_contact_takes_the_offered_bundle(root):
    got = accept_bundle([], Bundle((root.cert,)), NOW)
    assert got.roots == (root.cert,) and not got.refused


def test_a_new_root_without_a_cross_certificate_from_a_trusted_root_is_refused(root):
    intruder = create_root(TD, NOW)
    got = accept_bundle([root.cert], Bundle((intruder.cert, root.cert)), NOW)
    assert got.roots == (root.cert,)
    assert "not cross-signed by a root this host trusts" in got.refused[0]
    # vouching for itself does not count
    self_cross = cross_sign(intruder, intruder, NOW, NOW + timedelta(hours=1))
    got = accept_bundle([root.cert], Bundle((intruder.cert,), (self_cross,)), NOW)
    assert got.roots == () and got.refused


def test_a_new_root_cross_signed_by_the_trusted_root_is_taken(root):
    new = create_root(TD, NOW)
    cross = cross_sign(root, new, NOW, NOW + timedelta(hours=1))
    got = accept_bundle([root.cert], Bundle((new.cert, root.cert), (cross,)), NOW)
    assert got.roots == (new.cert, root.cert) and got.cross == (cross,)
    # after the rotation the old root leaves: the host keeps the new one, already trusted
    got = accept_bundle([new.cert, root.cert], Bundle((new.cert,)), NOW)
    assert got.roots == (new.cert,)
    # an expired cross-certificate vouches for nothing
    got = accept_bundle([root.cert], Bundle((new.cert,), (cross,)), NOW + timedelta(hours=2))
    assert got.roots == ()


def test_a_host_takes_only_an_intermediate_for_its_own_key_under_a_trusted_root(root):
    mine, cert = host_ca(root)
    ca = check_intermediate(mine.key, [cert, root.cert], [root.cert], TD, NOW)
    assert ca.cert == cert and ca.root == root.cert
    other, other_cert = host_ca(root, "vm2")
    with pytest.raises(CAError, match="is for another key"):
        check_intermediate(mine.key, [other_cert, root.cert], [root.cert], TD, NOW)
    foreign = create_root(TD, NOW)
    with pytest.raises(CAError, match="does not chain to a root this host trusts"):
        check_intermediate(mine.key, [cert, root.cert], [foreign.cert], TD, NOW)


def test_rotation_ends_only_when_every_host_signs_under_the_new_root_and_old_certificates_expired(root):
    new_fp = fingerprint(root.cert)
    expected = {"vm1": "aa", "vm2": "bb", "vm3": "cc"}
    since = NOW - timedelta(seconds=10)
    reports = {
        "vm1": HostReport("aa", (new_fp,), since.isoformat(), 6.0, None),
        "vm2": HostReport("b0", (new_fp,), since.isoformat(), 6.0, None),
    }
    waits = rotation_waits(expected, reports, new_fp, NOW)
    assert waits == ["vm2: still signs with intermediate b0, not the new bb",
                     "vm3: has not reported yet (is its Citadel running?)"]
    later = (NOW + timedelta(seconds=30)).isoformat()
    reports["vm2"] = HostReport("bb", (new_fp,), since.isoformat(), 6.0, later)
    reports["vm3"] = HostReport("cc", (new_fp,), NOW.isoformat(), 6.0, None)
    waits = rotation_waits(expected, reports, new_fp, NOW)
    assert waits[0].startswith("vm2: certificates from the old intermediate live until")
    assert waits[1].startswith("vm3: certificates from the old intermediate live until")  # issued in the switch
    assert rotation_waits(expected, reports, new_fp, NOW + timedelta(seconds=31)) == []


def test_openssl_refuses_a_certificate_a_host_intermediate_made_for_another_trust_domain(root, tmp_path):
    import subprocess

    from meshctl.citadel.ca import cert_to_pem

    host, cert = host_ca(root)
    (tmp_path / "root.pem").write_bytes(root.root_pem)
    (tmp_path / "inter.pem").write_bytes(cert_to_pem(cert))
    results = {}
    for td in ("cluster.local", "other.example"):
        (tmp_path / "leaf.pem").write_bytes(host.sign_csr(make_csr(generate_key()), f"spiffe://{td}/ns/x/sa/y", 3600, NOW))
        v = subprocess.run(["openssl", "verify", "-attime", str(int(NOW.timestamp()) + 60), "-CAfile",
                            str(tmp_path / "root.pem"), "-untrusted", str(tmp_path / "inter.pem"),
                            str(tmp_path / "leaf.pem")], capture_output=True, text=True)
        results[td] = (v.returncode, v.stdout + v.stderr)
    assert results["cluster.local"][0] == 0, results
    assert results["other.example"][0] != 0 and "permitted subtree violation" in results["other.example"][1], results
