"""One trust domain over two hosts: two meshes with their own state directories on
one machine, both on the suite's real Consul agent, stand in for two hosts (the
network-namespace run of three hosts is tests/e2e/test_multihost*.py).

A root is made once in a directory of its own (the root holder); each host
joins with `citadel join` (its intermediate key stays in its state directory,
its CSR goes to Consul KV), the root holder approves it with `citadel approve`,
and each host's Citadel signs its sidecars' certificates with its own
intermediate. Checked: a host not approved is refused by `up`, saying what it
waits for; a request from host A's sidecar reaches host B's over mTLS; B's
sidecar accepts a certificate from A's Citadel and refuses one from a foreign
CA in the same trust domain; no state directory holds the root key or the
other host's key; `citadel rotate-root` across both hosts under steady load
fails no request, and afterwards every certificate chains to the new root only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr

from .helpers import LoadGenerator, http_get, mesh_ports

pytestmark = [pytest.mark.e2e, pytest.mark.consul]

CERT_TTL = "6s"  # sidecars renew every ~3 s: a rotation reaches them within the test
# a meshId of this run's own: the CA and the shared rules (Consul KV, meshctl/<meshId>/) of
# other test modules on the suite's Consul agent stay apart
MESH = f"shared-ca-{os.getpid()}"
WRAPPER = f"""import os, runpy, sys
sys.argv = [{str(Path(__file__).with_name('hello_app.py'))!r}, os.environ["PORT"], sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy", "CONSUL_HTTP_TOKEN")}
    env["MESHCTL_CERT_TTL"] = CERT_TTL
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def write_host(work: Path, service: str, registry: str) -> None:
    work.mkdir()
    (work / "hello.py").write_text(WRAPPER)
    (work / "mesh.yaml").write_text(
        f"settings: {{portRange: {mesh_ports()[0]}, outboundTrafficPolicy: REGISTRY_ONLY, registry: '{registry}', "
        f"meshId: {MESH}}}\n"
        "services:\n"
        f"- name: {service}\n"
        "  port: 9080\n"
        "  healthCheck: {http: /health, interval: 1s}\n"
        "  versions:\n"
        f"  - {{name: v1, command: [python3, hello.py, {service}]}}\n"
    )


# Istio's mesh-wide PeerAuthentication from its mtls-migration task (istio.io, "Lock down
# mutual TLS for the entire mesh"): b's sidecar answers mTLS callers only
STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def workload(work: Path, name: str) -> dict:
    st = json.loads(meshctl("status", "--json", cwd=work).stdout)
    return next(w for w in st["workloads"] if w["name"] == name)


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def served_chain(addr: str, tmp: Path) -> list[str]:
    """The certificates a sidecar's inbound listener presents (openssl s_client)."""
    shown = subprocess.run(["openssl", "s_client", "-connect", addr, "-showcerts"], input="", capture_output=True,
                           text=True, timeout=20).stdout
    return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", shown, re.S)


def verifies(chain: list[str], root_pem: bytes, tmp: Path) -> bool:
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "rest.pem").write_text("".join(chain[1:]))
    (tmp / "root.pem").write_bytes(root_pem)
    v = subprocess.run(["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "rest.pem"),
                        str(tmp / "leaf.pem")], capture_output=True, text=True)
    return v.returncode == 0


def mtls_get(addr: str, chain_pem: bytes, key_pem: bytes, tmp: Path, path: str = "/") -> str:
    """GET through a sidecar's inbound listener with the given client certificate:
    the status line, or how the handshake or request failed."""
    (tmp / "c.pem").write_bytes(chain_pem)
    (tmp / "k.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    ctx.set_alpn_protocols(["http/1.1"])
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: world:9080\r\nconnection: close\r\n\r\n".encode())
            data = s.recv(65536)
    except (ssl.SSLError, OSError) as e:
        return f"refused: {type(e).__name__}: {e}"
    if not data:
        return "refused: closed without an answer"
    return data.split(b"\r\n", 1)[0].decode()


@pytest.fixture(scope="module")
def hosts(consul_agent, tmp_path_factory):
    base = tmp_path_factory.mktemp("shared-ca")
    root = base / "root"
    meshctl("citadel", "init", "--root-dir", str(root), "--mesh-id", MESH, cwd=base)
    a, b = base / "host-a", base / "host-b"
    write_host(a, "front", consul_agent)
    write_host(b, "world", consul_agent)
    m = {"root": root, "a": a, "b": b, "registry": str(consul_agent), "base": base, "consul": consul_agent.http,
         "consul_agent": consul_agent}
    for work, name in ((a, "a"), (b, "b")):
        r = meshctl("citadel", "join", "--registry", consul_agent, "--host", name, "--mesh-id", MESH, cwd=work,
                    check=False)
        assert r.returncode == 3, r.stdout + r.stderr
    meshctl("citadel", "approve", "--root-dir", str(root), "--registry", consul_agent, "a", cwd=base)
    try:
        meshctl("up", "-d", "-f", "mesh.yaml", cwd=a)
        # b is not approved: `up` refuses before starting anything, and says what b waits for
        m["unapproved"] = meshctl("up", "-d", "-f", "mesh.yaml", cwd=b, check=False)
        m["listing"] = meshctl("citadel", "approve", "--root-dir", str(root), "--registry", consul_agent, cwd=base).stdout
        meshctl("citadel", "approve", "--root-dir", str(root), "--registry", consul_agent, "--all", cwd=base)
        meshctl("up", "-d", "-f", "mesh.yaml", cwd=b)
        (b / "strict.yaml").write_text(STRICT)
        meshctl("route", "apply", "--wait", "-f", "strict.yaml", cwd=b)
        m["outbound"] = port_of(workload(a, "front-v1-0")["outbound_address"])
        m["b_inbound"] = workload(b, "world-v1-0")["inbound_address"]
        wait_until(lambda: http_get(m["outbound"], "http://world:9080/")[0] == 200, 40, "front → world")
        yield m
    finally:
        meshctl("down", cwd=a, check=False)
        meshctl("down", cwd=b, check=False)
        with httpx.Client(trust_env=False) as c:
            c.delete(f"{consul_agent.http}/v1/kv/meshctl/{MESH}/", params={"recurse": "true"})


def test_a_host_not_approved_gets_no_certificate_and_says_what_it_waits_for(hosts):
    r = hosts["unapproved"]
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    assert "host b waits for its intermediate CA" in err, err
    assert f"meshctl/{MESH}/ca/csr/b" in err and "meshctl citadel approve" in err and " b`" in err, err
    assert "Traceback" not in r.stderr
    listing = " ".join(hosts["listing"].split())
    assert re.search(r"a approved \w+ \d{4}-\d\d-\d\d", listing) and re.search(r"b pending \w+ -", listing), listing


def test_a_host_that_did_not_join_is_refused_rather_than_making_a_root_of_its_own(hosts):
    c = hosts["base"] / "host-c"
    write_host(c, "third", hosts["registry"])
    r = meshctl("up", "-d", "-f", "mesh.yaml", cwd=c, check=False)
    err = " ".join(r.stderr.split())
    assert r.returncode != 0 and f"mesh {MESH} has a shared root in Consul KV" in err, err
    assert f"meshctl citadel join --registry {hosts['registry']} --host NAME" in err, err
    assert not (c / ".meshctl" / "ca" / "ca-key.pem").exists()


def test_sidecars_of_two_hosts_talk_mtls_with_different_intermediates(hosts, tmp_path):
    code, body = http_get(hosts["outbound"], "http://world:9080/")
    assert code == 200 and json.loads(body)["version"] == "world"
    # the hosts share their rules (one meshId): the STRICT PeerAuthentication applied from b
    # holds on every sidecar, so plaintext to b's is refused, so the request above went over mTLS
    with socket.create_connection(("127.0.0.1", port_of(hosts["b_inbound"])), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: world\r\nconnection: close\r\n\r\n")
        try:
            plain = s.recv(100)
        except OSError:
            plain = b""
    assert not plain.startswith(b"HTTP/1.1"), plain

    a_ca = (hosts["a"] / ".meshctl" / "ca" / "ca-cert.pem").read_bytes()
    b_ca = (hosts["b"] / ".meshctl" / "ca" / "ca-cert.pem").read_bytes()
    assert a_ca != b_ca
    root_pem = (hosts["root"] / "root-cert.pem").read_bytes()
    a_chain = served_chain(workload(hosts["a"], "front-v1-0")["inbound_address"], tmp_path)
    b_chain = served_chain(hosts["b_inbound"], tmp_path)
    assert a_chain[1] == a_ca.decode() and b_chain[1] == b_ca.decode()  # each host signs with its own
    assert verifies(a_chain, root_pem, tmp_path) and verifies(b_chain, root_pem, tmp_path)


def test_no_state_directory_holds_the_root_key_or_the_other_hosts_key(hosts):
    root_key = (hosts["root"] / "ca-key.pem").read_bytes()
    keys = {h: (hosts[h] / ".meshctl" / "ca" / "ca-key.pem").read_bytes() for h in ("a", "b")}
    for h, other in (("a", "b"), ("b", "a")):
        files = [p for p in (hosts[h] / ".meshctl").rglob("*") if p.is_file()]
        assert len(files) > 10
        for p in files:
            data = p.read_bytes()
            assert root_key not in data, f"the root key is in {p}"
            assert keys[other] not in data, f"host {other}'s key is in {p}"
        assert oct((hosts[h] / ".meshctl" / "ca" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    with httpx.Client(trust_env=False) as c:
        kv = c.get(f"{hosts['consul']}/v1/kv/meshctl/{MESH}/ca", params={"recurse": "true"}).json()
    import base64
    everything = b"".join(base64.b64decode(e["Value"] or "") for e in kv)
    assert b"PRIVATE KEY" not in everything and b"CERTIFICATE REQUEST" in everything


def test_b_accepts_a_certificate_from_host_a_and_refuses_a_foreign_ca(hosts, tmp_path):
    a = hosts["a"]
    token = meshctl("citadel", "token", "default/front", cwd=a).stdout.strip()
    citadel = json.loads((a / ".meshctl" / "control.json").read_text())["citadel"]
    key = generate_key()
    with httpx.Client(trust_env=False) as c:
        issued = c.post(f"{citadel}/v1/sign", json={"token": token, "csr": make_csr(key).decode()}).json()
    assert mtls_get(hosts["b_inbound"], issued["cert_chain"].encode(), key_to_pem(key), tmp_path) == "HTTP/1.1 200 OK"

    # the same identity from a CA b's root never signed: refused in the handshake
    foreign = create_root("cluster.local", datetime.now(timezone.utc))
    fkey = generate_key()
    leaf = foreign.sign_csr(make_csr(fkey), "spiffe://cluster.local/ns/default/sa/front", 3600, datetime.now(timezone.utc))
    got = mtls_get(hosts["b_inbound"], leaf, key_to_pem(fkey), tmp_path)
    assert got.startswith("refused"), got
    log = hosts["b"] / ".meshctl" / "logs" / "world-v1-0.proxy.log"
    wait_until(lambda: "peer certificate not trusted: unable to get local issuer certificate" in log.read_text(), 10,
               "b's sidecar to log why it refused the foreign certificate")


def test_root_rotation_across_hosts_under_load_fails_no_request(hosts, tmp_path):
    old_root = (hosts["root"] / "root-cert.pem").read_bytes()
    logs = [hosts[h] / ".meshctl" / "logs" / f"{n}.proxy.log" for h, n in (("a", "front-v1-0"), ("b", "world-v1-0"))]
    refusals_before = [p.read_text().count("handshake failed") for p in logs]
    with LoadGenerator(hosts["outbound"], "http://world:9080/", rps=20, connections=4) as load:
        time.sleep(2)
        load.mark()
        r = meshctl("citadel", "rotate-root", "--root-dir", str(hosts["root"]), "--registry", hosts["registry"],
                    "--overlap", "10m", "--wait", "90s", cwd=hosts["base"], timeout=150)
        load.mark()
        time.sleep(8)  # certificates renewed after the old root left the bundle
    out = " ".join(r.stdout.split())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "new root" in out and "waiting for:" in out and "rotation done" in out, out
    res = load.result
    assert load.ran_in_every_phase(), load.marks  # before, during and after the rotation
    assert res.failed == 0, (res.statuses, res.errors[:5])
    assert set(res.statuses) == {200}, res.statuses
    # no sidecar refused a peer during the rotation (the earlier tests' refusals were counted before)
    assert [p.read_text().count("handshake failed") for p in logs] == refusals_before

    new_root = (hosts["root"] / "root-cert.pem").read_bytes()
    assert new_root != old_root
    for h, name in (("a", "front-v1-0"), ("b", "world-v1-0")):
        ca = hosts[h] / ".meshctl" / "ca"
        assert ca.joinpath("trust-bundle.pem").read_bytes() == new_root  # the old root left every host
        chain = served_chain(workload(hosts[h], name)["inbound_address"], tmp_path)
        assert verifies(chain, new_root, tmp_path) and not verifies(chain, old_root, tmp_path)
    code, _ = http_get(hosts["outbound"], "http://world:9080/")
    assert code == 200


def test_with_consul_down_each_hosts_citadel_keeps_signing_and_no_request_fails(hosts):
    logs = [hosts[h] / ".meshctl" / "logs" / "citadel.log" for h in ("a", "b")]
    renewals_before = [p.read_text().count("(renewal)") for p in logs]
    consul = hosts["consul_agent"]
    consul.stop()
    try:
        with LoadGenerator(hosts["outbound"], "http://world:9080/", rps=20, connections=4) as load:
            # 6 s certificates: each host's Citadel signs renewals meanwhile. Waited for (two each,
            # at least 10 s), not counted after a fixed 10 s, which a loaded machine can stretch.
            started, deadline = time.monotonic(), time.monotonic() + 60
            while True:
                time.sleep(2)
                load.mark()
                renewed = [p.read_text().count("(renewal)") - n for p, n in zip(logs, renewals_before)]
                if all(n >= 2 for n in renewed) and time.monotonic() - started >= 10:
                    break
                assert time.monotonic() < deadline, renewed
            time.sleep(2)
    finally:
        # (the suite's agent is a dev agent: it comes back with an empty catalog, and the
        # meshes register again; that window is the registry's business, not measured here)
        consul.start()
    res = load.result
    assert load.ran_in_every_phase() and res.failed == 0, (load.marks, res.statuses, res.errors[:5])
    renewed = [p.read_text().count("(renewal)") - n for p, n in zip(logs, renewals_before)]
    assert all(n >= 2 for n in renewed), renewed
    # the dev agent came back with an empty KV store: no host drops the CA it has for that
    files = {h: [(hosts[h] / ".meshctl" / "ca" / f).read_bytes() for f in ("ca-cert.pem", "trust-bundle.pem")]
             for h in ("a", "b")}
    time.sleep(3)
    for h in ("a", "b"):
        assert [(hosts[h] / ".meshctl" / "ca" / f).read_bytes() for f in ("ca-cert.pem", "trust-bundle.pem")] == files[h]
        citadel = json.loads((hosts[h] / ".meshctl" / "control.json").read_text())["citadel"]
        with httpx.Client(trust_env=False) as c:
            assert c.get(f"{citadel}/healthz").status_code == 200
