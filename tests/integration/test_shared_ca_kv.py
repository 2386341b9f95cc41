"""The shared CA against a real Consul agent: what a host takes from KV, and what
it refuses when someone with KV write access (but not the root key) tries to
slip in a root, an intermediate or a CSR. Each test uses a mesh name of its own."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from meshctl.citadel.ca import create_root, generate_key
from meshctl.citadel.errors import CAError
from meshctl.citadel.hostca import join, sync
from meshctl.citadel.kv import open_kv
from meshctl.citadel.multihost import Bundle, intermediate_doc, make_host_csr, sign_host_intermediate
from meshctl.citadel.rootca import approve, finish_rotation, hosts, init_root, remove_host, rotation_state, start_rotation

pytestmark = pytest.mark.consul

_mesh = itertools.count()


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def setup(consul_agent, tmp_path):
    mesh = f"kvtest{next(_mesh)}"
    kv = open_kv(consul_agent)
    root = tmp_path / "root"
    init_root(root, "cluster.local", mesh=mesh, now=now())
    prefix = f"meshctl/{mesh}/ca/"
    yield {"kv": kv, "root": root, "mesh": mesh, "prefix": prefix, "tmp": tmp_path}
    kv._kv.delete_prefix(prefix)


def joined(s, name: str):
    sd = s["tmp"] / name / ".meshctl"
    join(sd, s["kv"], name, mesh=s["mesh"], now=now())
    return sd


def test_a_root_put_into_kv_without_the_old_roots_cross_certificate_is_not_trusted(setup):
    s = setup
    a = joined(s, "a")
    approve(s["root"], s["kv"], ["a"], now=now())
    assert sync(a, s["kv"], now()).ready
    before = (a / "ca" / "trust-bundle.pem").read_bytes()
    intruder = create_root("cluster.local", now())
    s["kv"].put(s["prefix"] + "bundle", Bundle((intruder.cert, *x509.load_pem_x509_certificates(before))).to_json())
    res = sync(a, s["kv"], now())
    assert res.ready and any("not cross-signed by a root this host trusts" in r for r in res.refused), res
    assert (a / "ca" / "trust-bundle.pem").read_bytes() == before


def test_an_intermediate_for_another_key_is_not_taken(setup):
    s = setup
    a = joined(s, "a")
    approve(s["root"], s["kv"], ["a"], now=now())
    sync(a, s["kv"], now())
    mine = (a / "ca" / "ca-cert.pem").read_bytes()
    # whoever can write KV but has no root key cannot make a valid one; even a valid
    # intermediate of the mesh for another key is refused
    other = generate_key()
    from meshctl.citadel.rootca import load_root

    ca, _ = load_root(s["root"])
    forged = sign_host_intermediate(ca, make_host_csr(other, "a", "cluster.local"), "a", now())
    s["kv"].put(s["prefix"] + "intermediate/a", intermediate_doc((forged, ca.cert), now()))
    res = sync(a, s["kv"], now())
    assert not res.ready and "is for another key" in res.message
    assert (a / "ca" / "ca-cert.pem").read_bytes() == mine


def test_a_host_name_taken_by_another_key_is_refused_and_approve_all_skips_a_changed_key(setup):
    s = setup
    joined(s, "a")
    approve(s["root"], s["kv"], None, now=now())  # --all: a is pending
    with pytest.raises(CAError, match="host name a is taken in mesh"):
        join(s["tmp"] / "other" / ".meshctl", s["kv"], "a", mesh=s["mesh"], now=now())
    # someone replaces a's CSR in KV with another key
    s["kv"].put(s["prefix"] + "csr/a", make_host_csr(generate_key(), "a", "cluster.local"))
    assert [(r.host, r.state) for r in hosts(s["kv"], s["prefix"])] == [("a", "new key")]
    assert approve(s["root"], s["kv"], None, now=now()) == []  # --all signs pending hosts only
    with pytest.raises(CAError, match="published a CSR with another key than their intermediate's"):
        start_rotation(s["root"], s["kv"], now=now())


def test_a_rotation_ends_only_after_each_host_switched_and_its_old_certificates_expired(setup):
    s = setup
    a, b = joined(s, "a"), joined(s, "b")
    approve(s["root"], s["kv"], None, now=now())
    for h in (a, b):
        sync(h, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    new = start_rotation(s["root"], s["kv"], now=now(), overlap=timedelta(minutes=10))
    _, waits = rotation_state(s["root"], s["kv"], now=now())
    assert len(waits) == 2 and all("still signs with intermediate" in w for w in waits), waits
    res = sync(a, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    assert res.changed and new.root.subject.rfc4514_string() in res.message
    bundle = x509.load_pem_x509_certificates((a / "ca" / "trust-bundle.pem").read_bytes())
    assert new.root in bundle and len(bundle) == 2  # both roots while the rotation runs
    assert (a / "ca" / "cross.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 1
    _, waits = rotation_state(s["root"], s["kv"], now=now())
    assert waits[0].startswith("a: certificates from the old intermediate live until"), waits
    assert waits[1].startswith("b: still signs"), waits
    sync(b, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    _, waits = rotation_state(s["root"], s["kv"], now=now() + timedelta(seconds=7))
    assert waits == []


def test_a_removed_host_is_not_waited_for_and_loses_the_trust_of_the_others_after_a_rotation(setup):
    s = setup
    a, b = joined(s, "a"), joined(s, "b")
    approve(s["root"], s["kv"], None, now=now())
    for h in (a, b):
        sync(h, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    start_rotation(s["root"], s["kv"], now=now(), overlap=timedelta(minutes=10))
    sync(a, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    _, waits = rotation_state(s["root"], s["kv"], now=now() + timedelta(seconds=7))
    assert waits and waits[0].startswith("b: still signs"), waits
    remove_host(s["root"], s["kv"], "b")  # b is gone (or compromised)
    _, waits = rotation_state(s["root"], s["kv"], now=now() + timedelta(seconds=7))
    assert waits == []
    finish_rotation(s["root"], s["kv"], now=now())
    sync(a, s["kv"], now(), leaf_ttl=timedelta(seconds=6))
    roots = x509.load_pem_x509_certificates((a / "ca" / "trust-bundle.pem").read_bytes())
    b_inter = x509.load_pem_x509_certificate((b / "ca" / "ca-cert.pem").read_bytes())
    assert len(roots) == 1 and b_inter.issuer != roots[0].subject  # a no longer trusts what b can sign
    assert [r.host for r in hosts(s["kv"], s["prefix"])] == ["a"]
    res = sync(b, s["kv"], now())
    assert not res.ready and "waits for its intermediate CA" in res.message


def test_a_running_citadel_of_an_unapproved_host_says_what_it_waits_for_then_signs_once_approved(setup, tmp_path):
    import subprocess
    import sys
    import time

    import httpx

    from meshctl.citadel.ca import make_csr
    from meshctl.citadel.store import TokenFile
    from tests.tools.servers import free_port

    s = setup
    a = joined(s, "a")
    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", "citadel", "serve", "--port", str(port), "--state-dir",
                             str(a)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "citadel.log", "w"), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=5) as c:
            deadline = time.monotonic() + 60  # a process start-up: generous for a loaded machine
            while True:
                try:
                    r = c.get(url + "/healthz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, (tmp_path / "citadel.log").read_text()
                    time.sleep(0.2)
            assert r.status_code == 503 and "host a has no intermediate CA yet" in r.json()["error"], r.text
            token = TokenFile(a).issue_token("spiffe://cluster.local/ns/default/sa/x", 600, now())
            r = c.post(url + "/v1/sign", json={"token": token, "csr": make_csr(generate_key()).decode()})
            assert r.status_code == 503 and "citadel approve" in r.json()["error"]

            approve(s["root"], s["kv"], ["a"], now=now())
            deadline = time.monotonic() + 20
            while c.get(url + "/healthz").status_code != 200:
                assert time.monotonic() < deadline, (tmp_path / "citadel.log").read_text()
                time.sleep(0.2)
            # the token tried before the approval was not spent on the refusal
            r = c.post(url + "/v1/sign", json={"token": token, "csr": make_csr(generate_key()).decode()})
            assert r.status_code == 200, r.text
            chain = x509.load_pem_x509_certificates(r.json()["cert_chain"].encode())
            assert "meshctl intermediate a" in chain[1].subject.rfc4514_string()
        log = (tmp_path / "citadel.log").read_text()
        assert "host a waits for its intermediate CA" in log and "host a signs with intermediate" in log
    finally:
        proc.terminate()
        proc.wait(10)
