"""Bookinfo over three hosts (conftest.py): traffic between hosts over mTLS.

Real processes in real network namespaces, a real three-server Consul cluster."""

from __future__ import annotations

import importlib.util
import re
import socket

import pytest

from .conftest import GATEWAY_PORT
from .hosts import http_get
from .netlab import wait_for

pytestmark = pytest.mark.multihost


def page(mesh, path: str = "/productpage", headers: dict | None = None) -> tuple[int, str]:
    return mesh.lab.in_host(1, lambda: http_get("127.0.0.1", GATEWAY_PORT, path, 20.0, headers), 30)


def test_the_gateway_on_host_1_reaches_reviews_on_hosts_2_and_3_over_mtls(mesh):
    h1, h2, h3 = mesh.hosts[1], mesh.hosts[2], mesh.hosts[3]
    # every host registered its instances at its own address, not 127.0.0.1
    for h in (h1, h2, h3):
        st = h.status()
        assert st["advertise"] == h.address
        assert {w["inbound_address"].rsplit(":", 1)[0] for w in st["workloads"]} == {h.address}, st["workloads"]

    seen: set[str] = set()

    def all_versions() -> bool:
        status, body = page(mesh)
        assert status == 200 and "Book Details" in body, body[-300:]
        m = re.search(r"reviews-v\d-\d", body)
        if m:
            seen.add(m.group(0))
        return {"reviews-v1-0", "reviews-v2-0", "reviews-v3-0"} <= seen

    # round robin over three endpoints on two other hosts: a few pages show all three
    wait_for("pages answered by reviews v1 and v2 (host 2) and v3 (host 3)", all_versions, 60, 0.05)
    status, body = page(mesh)
    assert "Reviewer1" in body
    # the gateway listens on every address of host 1 (gateways[].address: 0.0.0.0): host 2 reaches it
    status, body = mesh.lab.in_host(2, lambda: http_get(h1.address, GATEWAY_PORT, "/productpage", 20.0), 30)
    assert status == 200 and "Book Details" in body

    # The inbound listeners on the hosts' addresses take mutual TLS only: a plaintext
    # request from another host (host 1 to reviews-v1 on host 2) is refused, so
    # what crossed hosts above went over mTLS.
    inbound = h2.workload("reviews-v1-0")["inbound_address"]
    addr, port = inbound.rsplit(":", 1)
    assert addr == h2.address

    def plaintext() -> str:
        with socket.create_connection((addr, int(port)), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n")
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            return data.decode(errors="replace")

    answer = mesh.lab.in_host(1, plaintext, 15)
    assert "200 OK" not in answer and "reviews" not in answer.lower(), answer[:300]

    # and the reviews sidecars counted those requests as mutual TLS from productpage's identity
    def stats(host, name: str) -> str:
        admin = int(host.workload(name)["admin_address"].rsplit(":", 1)[1])
        return mesh.lab.in_host(host.index, lambda: http_get("127.0.0.1", admin, "/stats", 5.0), 10)[1]

    for host, name in ((h2, "reviews-v1-0"), (h3, "reviews-v3-0")):
        text = stats(host, name)
        lines = [l for l in text.splitlines() if l.startswith("istio_requests_total{") and 'reporter="destination"' in l]
        assert any('connection_security_policy="mutual_tls"' in l and "bookinfo-productpage" in l for l in lines), lines



def _ratings_upstreams(host, workload: str) -> list[str]:
    """The hosts (addresses) that ``workload``'s sidecar sent its ratings calls to (its access log)."""
    import json

    log = host.state_dir / "logs" / f"{workload}.access.log"
    out = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("reporter") == "source" and rec.get("authority") == "ratings:9080" and rec.get("upstream_host"):
            out.append(rec["upstream_host"].rsplit(":", 1)[0])
    return out


def test_each_host_is_its_own_zone_and_ratings_calls_stay_in_it(mesh):
    """--locality region1/zoneN per host, outlierDetection on ratings (cross-host.yaml): reviews v2
    (host 2) and v3 (host 3) call the ratings of their own host, though both hosts serve ratings."""
    h2, h3 = mesh.hosts[2], mesh.hosts[3]
    assert h2.status_file()["locality"] == "region1/zone2"
    mesh.wait_routable(2, "ratings", {h2.address, h3.address})
    before = {2: len(_ratings_upstreams(h2, "reviews-v2-0")), 3: len(_ratings_upstreams(h3, "reviews-v3-0"))}

    def enough() -> bool:
        page(mesh)
        return (len(_ratings_upstreams(h2, "reviews-v2-0")) - before[2] >= 10
                and len(_ratings_upstreams(h3, "reviews-v3-0")) - before[3] >= 10)

    wait_for("ten ratings calls from reviews v2 and from v3", enough, 90, 0.02)
    assert set(_ratings_upstreams(h2, "reviews-v2-0")[before[2]:]) == {h2.address}
    assert set(_ratings_upstreams(h3, "reviews-v3-0")[before[3]:]) == {h3.address}


KV_RULES = importlib.util.find_spec("meshctl.pilot.kvstore") is not None


@pytest.mark.skipif(not KV_RULES, reason="rules shared through Consul KV (meshctl/pilot/kvstore.py, the `kvstore` "
                    "part of issue 20) are not in this tree: each host's Pilot keeps its own rules")
def test_a_rule_applied_on_host_3_changes_routing_on_host_1(mesh):
    h1, h2, h3 = mesh.hosts[1], mesh.hosts[2], mesh.hosts[3]
    # Istio's traffic-management task, unchanged, applied on host 3 (its subsets come from
    # examples/multi-host/rules/cross-host.yaml, applied before)
    h3.apply("../bookinfo/rules/virtual-service-all-v1.yaml")
    streak: list[str] = []

    def only_v1() -> bool:
        status, body = page(mesh)
        m = re.search(r"reviews-v\d-\d", body)
        streak.append(m.group(0) if status == 200 and m else f"{status}")
        return streak[-12:] == ["reviews-v1-0"] * 12

    wait_for("pages through host 1's gateway all from reviews-v1 (12 in a row)", only_v1, 60, 0.05)
    assert "reviews" in h1.meshctl("route", "get", "--state-dir", str(h1.state_dir)).stdout

    # deleted on host 2: host 1 routes to every version again
    h2.meshctl("route", "delete", "-f", "../bookinfo/rules/virtual-service-all-v1.yaml", "--state-dir", str(h2.state_dir))
    seen: set[str] = set()

    def all_versions() -> bool:
        status, body = page(mesh)
        m = re.search(r"reviews-v\d-\d", body)
        if status == 200 and m:
            seen.add(m.group(0))
        return {"reviews-v2-0", "reviews-v3-0"} <= seen

    wait_for("pages from reviews v2 and v3 again after the delete on host 2", all_versions, 60, 0.05)


def _served_chain(mesh, host, workload: str) -> list[str]:
    """The certificates ``workload``'s inbound listener presents, fetched from another host (openssl s_client)."""
    addr = host.workload(workload)["inbound_address"]
    other = 1 if host.index != 1 else 2
    shown = mesh.lab.run(other, ["openssl", "s_client", "-connect", addr, "-showcerts"], input="", check=False,
                         timeout=30).stdout
    return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", shown, re.S)


def test_each_host_signs_with_its_own_intermediate_from_consul_kv_and_holds_no_other_key(mesh, tmp_path):
    """docs/multi-host-ca.md over the three hosts: the root key stays with the root holder, each
    host's intermediate key on its host; each host's sidecars present a chain through a different
    intermediate, issued through Consul KV, that openssl verifies against the one root."""
    import base64
    import subprocess

    root_dir = mesh.root.root_dir
    root_key = (root_dir / "ca-key.pem").read_bytes()
    root_pem = root_dir / "root-cert.pem"
    hosts = mesh.hosts
    assert all(root_dir not in h.root.parents and root_dir != h.root for h in hosts.values())
    keys = {i: (h.state_dir / "ca" / "ca-key.pem").read_bytes() for i, h in hosts.items()}
    assert b"PRIVATE KEY" in root_key and all(b"PRIVATE KEY" in k for k in keys.values())
    assert len(set(keys.values()) | {root_key}) == 4
    for i, h in hosts.items():
        files = [p for p in h.state_dir.rglob("*") if p.is_file()]
        assert len(files) > 10, files
        for p in files:
            data = p.read_bytes()
            assert root_key not in data, f"the root key is in {p}"
            for j, other in keys.items():
                assert j == i or other not in data, f"host {j}'s intermediate key is in {p}"

    # what travelled through Consul KV: CSRs, intermediates, the bundle; never a private key
    kv = mesh.consul.api(1, "/v1/kv/meshctl/cluster.local/ca/?recurse=true")
    stored = {e["Key"]: base64.b64decode(e["Value"] or "") for e in kv}  # type: ignore[union-attr]
    for h in hosts.values():
        assert f"meshctl/cluster.local/ca/csr/{h.name}" in stored and f"meshctl/cluster.local/ca/intermediate/{h.name}" in stored
    assert not any(b"PRIVATE KEY" in v for v in stored.values())

    intermediates = set()
    for h, workload in ((hosts[1], "productpage-v1-0"), (hosts[2], "reviews-v1-0"), (hosts[3], "reviews-v3-0")):
        chain = _served_chain(mesh, h, workload)
        assert len(chain) >= 2, chain
        own = (h.state_dir / "ca" / "ca-cert.pem").read_text()
        assert chain[1] == own, f"{workload} on {h.name} is not signed by {h.name}'s intermediate"
        subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=chain[1], capture_output=True,
                                 text=True, check=True).stdout
        assert f"meshctl intermediate {h.name}" in subject, subject
        intermediates.add(chain[1])
        (tmp_path / "leaf.pem").write_text(chain[0])
        (tmp_path / "rest.pem").write_text("".join(chain[1:]))
        v = subprocess.run(["openssl", "verify", "-CAfile", str(root_pem), "-untrusted", str(tmp_path / "rest.pem"),
                            str(tmp_path / "leaf.pem")], capture_output=True, text=True)
        assert v.returncode == 0, f"{h.name}: {v.stdout}{v.stderr}"
        # and the leaf alone does not verify against the root: the intermediate is needed
        v = subprocess.run(["openssl", "verify", "-CAfile", str(root_pem), str(tmp_path / "leaf.pem")],
                           capture_output=True, text=True)
        assert v.returncode != 0
    assert len(intermediates) == 3
