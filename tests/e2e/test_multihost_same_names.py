"""Two hosts whose mesh files declare the same instance (both run ratings v1, so both have
a `ratings-v1-0`), on one shared Consul (one agent for both, as two meshes on one machine
or two VMs pointed at one agent; two meshes with their own state directories stand in for
the hosts, as in test_multihost_rules.py). Each registers under an id that names its host
(`ratings-v1-0@<address>:<port>`), so both are in the registry, both serve, and one host's
`down` leaves the other's instance registered and serving. Before, the second registration
replaced the first (Consul service ids are per agent) and one host's `down` deregistered
the other's running instance."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .helpers import HELLO_APP, http_get, mesh_ports
from .test_multihost_rules import meshctl, proxy_status, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.consul]


def write_mesh(work: Path, mesh_id: str, registry: str, host: str, caller: bool) -> None:
    hello = f"[python3, {HELLO_APP}]"
    work.mkdir(parents=True, exist_ok=True)
    text = (f"settings: {{portRange: {mesh_ports()[0]}, meshId: {mesh_id}, registry: '{registry}'}}\n"
            "services:\n"
            # the same service, version and so instance name on both hosts; the app says which host
            f"- name: ratings\n  port: 9080\n  versions:\n  - {{name: v1, command: {hello}, env: {{SERVICE_VERSION: {host}}}}}\n")
    if caller:
        text += f"- name: front\n  port: 9081\n  versions:\n  - {{name: v1, command: {hello}}}\n"
    (work / "mesh.yaml").write_text(text)


def consul_ratings(consul) -> dict[str, tuple[str, str]]:
    """id → (address:port, check status) of the ratings instances the agent has."""
    with httpx.Client(trust_env=False, timeout=10) as c:
        entries = c.get(f"{consul.http}/v1/health/service/ratings").json()
    return {e["Service"]["ID"]: (f"{e['Service']['Address']}:{e['Service']['Port']}",
                                 ",".join(sorted({ch["Status"] for ch in e["Checks"] if ch.get("ServiceID")})))
            for e in entries}


def answers(outbound: int, n: int = 12) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        try:
            code, body = http_get(outbound, "http://ratings:9080/", host="ratings:9080")
        except OSError as e:
            out[type(e).__name__] += 1
            continue
        out[json.loads(body)["version"] if code == 200 else code] += 1
    return out


def test_the_same_instance_name_on_two_hosts_registers_twice_and_survives_the_other_hosts_down(consul_agent, tmp_path):
    mesh_id = f"dup-{uuid.uuid4().hex[:8]}"
    hosts = {"host-a": tmp_path / "host-a", "host-b": tmp_path / "host-b"}
    try:
        # one trust domain (docs/multi-host-ca.md): a root, an intermediate per host
        meshctl("citadel", "init", "--root-dir", str(tmp_path / "root"), "--mesh-id", mesh_id, cwd=tmp_path)
        for name, work in hosts.items():
            write_mesh(work, mesh_id, str(consul_agent), name, caller=name == "host-a")
            r = meshctl("citadel", "join", "--registry", str(consul_agent), "--host", name, "--mesh-id", mesh_id,
                        cwd=work, check=False)
            assert r.returncode == 3, r.stdout + r.stderr
        meshctl("citadel", "approve", "--root-dir", str(tmp_path / "root"), "--registry", str(consul_agent), "--all",
                cwd=tmp_path)
        st = {}
        for name, work in hosts.items():
            meshctl("up", "-d", "-f", "mesh.yaml", cwd=work, env={"MESHCTL_HOST_NAME": name})
            st[name] = json.loads(meshctl("status", "--json", cwd=work).stdout)
        ratings = {name: next(w for w in s["workloads"] if w["name"] == "ratings-v1-0") for name, s in st.items()}
        # each host's instance under its own id: the workload name and where it is registered
        for w in ratings.values():
            assert w["registry_id"] == f"ratings-v1-0@{w['inbound_address']}", w
        assert ratings["host-a"]["registry_id"] != ratings["host-b"]["registry_id"]
        # both in Consul, both passing
        want = {w["registry_id"]: (w["inbound_address"], "passing") for w in ratings.values()}
        wait_for(lambda: consul_ratings(consul_agent) == want, 20, "both ratings-v1-0 registered and passing")
        # a caller on host A reaches both hosts' ratings-v1-0
        front = int(next(w for w in st["host-a"]["workloads"] if w["name"] == "front-v1-0")["outbound_address"]
                    .rsplit(":", 1)[1])
        wait_for(lambda: set(answers(front)) == {"host-a", "host-b"}, 30, "host A's caller reaches both hosts' ratings")
        # proxy-status: each host's ratings-v1-0, on its own row
        def both_rows():
            rows = {(h["host"], p["proxy"]) for h in proxy_status(hosts["host-a"], {"MESHCTL_HOST_NAME": "host-a"})
                    .get("hosts", []) for p in h["proxies"]}
            return {("host-a", "ratings-v1-0"), ("host-b", "ratings-v1-0")} <= rows
        wait_for(both_rows, 20, "proxy-status lists ratings-v1-0 of both hosts")

        # host B leaves: host A's ratings-v1-0 stays registered and passing, and serves every request
        meshctl("down", cwd=hosts["host-b"])
        a_only = {ratings["host-a"]["registry_id"]: (ratings["host-a"]["inbound_address"], "passing")}
        wait_for(lambda: consul_ratings(consul_agent) == a_only, 20, "host A's ratings-v1-0 alone in Consul")
        wait_for(lambda: set(answers(front)) == {"host-a"}, 30, "host A's caller reaches host A's ratings only")
        assert answers(front, 30) == Counter({"host-a": 30})
        assert consul_ratings(consul_agent) == a_only  # still there: nothing of host B's took it away
    finally:
        for work in hosts.values():
            meshctl("down", cwd=work, check=False)
