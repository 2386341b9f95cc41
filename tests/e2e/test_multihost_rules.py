"""One set of rules for every host: two meshes with their own state directories and ports,
on one real Consul agent with one meshId, stand in for two hosts (the three-host test in
network namespaces builds on this). A rule applied through one reaches the other's
proxies; proxy-status lists both hosts' proxies and the revision each ACKed; a fault
injected on one host ends at its TTL on the other, with the first host gone; Consul away
keeps the rules in force, and the watch picks up the next rule once it is back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from .helpers import HELLO_APP, http_get, mesh_ports

pytestmark = [pytest.mark.e2e, pytest.mark.consul]

RULES = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hello}}
spec:
  host: hello
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: [hello]
  http:
  - route:
    - destination: {{host: hello, subset: {subset}}}
"""


def meshctl(*args: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 120):
    e = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy", "CONSUL_HTTP_TOKEN")}
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:g}s")
        time.sleep(0.2)


def write_mesh(work: Path, mesh_id: str, services: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "mesh.yaml").write_text(
        f"settings: {{portRange: {mesh_ports()[0]}, outboundTrafficPolicy: REGISTRY_ONLY, meshId: {mesh_id}}}\n"
        f"services:\n{services}"
    )


def answers(outbound: int, n: int = 10) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        try:
            code, body = http_get(outbound, "http://hello:9080/")
        except OSError as e:
            out[("error", type(e).__name__)] += 1
            continue
        out[(code, json.loads(body)["version"] if code == 200 else body[:60].decode(errors="replace"))] += 1
    return out


def only(outbound: int, *expected) -> bool:
    return set(answers(outbound)) == set(expected)


@pytest.fixture
def two_hosts(consul_agent, tmp_path):
    mesh_id = f"multi-{uuid.uuid4().hex[:8]}"
    hello = f"[python3, {HELLO_APP}]"
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    write_mesh(a, mesh_id, f"- name: front\n  port: 9080\n  versions:\n  - {{name: v1, command: {hello}}}\n")
    write_mesh(b, mesh_id, "- name: hello\n  port: 9080\n  healthCheck: {http: /health, interval: 1s}\n  versions:\n"
                           f"  - {{name: v1, command: {hello}}}\n  - {{name: v2, command: {hello}}}\n")
    hosts = {}
    try:
        for name, work in (("host-a", a), ("host-b", b)):
            env = {"MESHCTL_HOST_NAME": name}
            meshctl("up", "-d", "-f", "mesh.yaml", "--registry", str(consul_agent), cwd=work, env=env)
            st = json.loads(meshctl("status", "--json", cwd=work).stdout)
            outbound = {w["name"]: int(w["outbound_address"].rsplit(":", 1)[1]) for w in st["workloads"]}
            hosts[name] = {"dir": work, "env": env, "outbound": outbound, "status": st}
        yield {"consul": consul_agent, "mesh_id": mesh_id, **hosts}
    finally:
        consul_agent.start()  # in case the test stopped it
        for work in (a, b):
            meshctl("down", cwd=work, check=False)


def proxy_status(work: Path, env: dict) -> dict:
    return json.loads(meshctl("pilot", "proxy-status", "-o", "json", cwd=work, env=env).stdout)


def test_a_rule_applied_on_one_host_reaches_the_other_and_proxy_status_lists_both(two_hosts, tmp_path):
    a, b = two_hosts["host-a"], two_hosts["host-b"]
    mesh_id = two_hosts["mesh_id"]
    b_out = b["outbound"]["hello-v1-0"]
    # where the rules live is said by `status`, on both hosts
    for h in (a, b):
        assert h["status"]["rules"].endswith(f"meshctl/{mesh_id}/rules/") and "Consul KV" in h["status"]["rules"]
    assert f"rules: Consul KV {two_hosts['consul']} meshctl/{mesh_id}/rules/" in meshctl("status", cwd=b["dir"]).stdout
    wait_for(lambda: only(b_out, (200, "v1"), (200, "v2")), what="both versions before any rule")

    rules = tmp_path / "hello-v2.yaml"
    rules.write_text(RULES.format(subset="v2"))
    out = meshctl("route", "apply", "--wait", "-f", str(rules), cwd=a["dir"], env=a["env"]).stdout
    assert "revision 1" in out
    # --wait waited for every host's proxies: host B's route by it at once, though it was applied on host A
    assert "all proxies of 2 host(s) (host-a, host-b) at revision 1" in out, out
    assert only(b_out, (200, "v2"))
    assert "hello" in meshctl("route", "get", cwd=b["dir"]).stdout

    # proxy-status on either host: every host's proxies, each at revision 1
    def all_synced_at(rev: int):
        st = proxy_status(a["dir"], a["env"])
        rows = {(h["host"], p["proxy"]): (p["status"], p["acked_revision"]) for h in st.get("hosts", []) for p in h["proxies"]}
        want = {("host-a", "front-v1-0"), ("host-b", "hello-v1-0"), ("host-b", "hello-v2-0")}
        return want <= set(rows) and all(rows[k] == ("SYNCED", rev) for k in want)

    wait_for(lambda: all_synced_at(1), timeout=20, what="proxy-status on host A shows both hosts synced at revision 1")
    table = meshctl("pilot", "proxy-status", cwd=b["dir"], env=b["env"]).stdout
    assert "HOST" in table and "host-a" in table and "host-b" in table and "front-v1-0" in table

    # a fault injected on host A, host A then gone: host B's Pilot ends it at its TTL
    started = time.monotonic()
    meshctl("inject-fault", "hello", "--abort", "503", "--ttl", "10s", "--no-wait", cwd=a["dir"], env=a["env"])
    wait_for(lambda: {k[0] for k in answers(b_out)} == {503}, timeout=8, what="the fault injected on host A on host B")
    meshctl("down", cwd=a["dir"])
    wait_for(lambda: only(b_out, (200, "v2")), timeout=25, what="the fault ends at its TTL on host B")
    assert time.monotonic() - started > 9.0
    # host A's Pilot stopped: its proxies left every proxy-status
    wait_for(lambda: "host-a" not in meshctl("pilot", "proxy-status", cwd=b["dir"], env=b["env"]).stdout,
             timeout=10, what="host A gone from proxy-status")


def test_consul_away_keeps_the_rules_and_the_watch_resumes(two_hosts, tmp_path):
    a, b = two_hosts["host-a"], two_hosts["host-b"]
    b_out = b["outbound"]["hello-v1-0"]
    rules = tmp_path / "hello.yaml"
    rules.write_text(RULES.format(subset="v2"))
    meshctl("route", "apply", "-f", str(rules), cwd=a["dir"])
    wait_for(lambda: only(b_out, (200, "v2")), timeout=15, what="host B follows the rule")
    consul = two_hosts["consul"]
    consul.stop()
    try:
        time.sleep(2.0)
        assert only(b_out, (200, "v2"))  # the rules in force stay, requests flow
        r = meshctl("route", "apply", "-f", str(rules), cwd=b["dir"], check=False)
        assert r.returncode != 0 and "cannot connect" in r.stderr and "Traceback" not in r.stderr
        # host B's Pilot dies while Consul is away; the supervisor starts it again, from the
        # copy of the last revision it kept (Consul cannot give it the rules now)
        old = json.loads(meshctl("status", "--json", cwd=b["dir"]).stdout)["control_plane"]["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: json.loads(meshctl("status", "--json", cwd=b["dir"]).stdout)["control_plane"]["pid"] not in (None, old),
                 timeout=30, what="host B's Pilot restarted")
    finally:
        consul.start()
    # a dev agent comes back empty: still the last rules, until new ones are applied; the
    # restarted Pilot reads the registry again and serves its proxies (SYNCED) with those rules
    wait_for(lambda: (st := proxy_status(b["dir"], b["env"]))["proxies"] and all(p["status"] == "SYNCED" for p in st["proxies"]),
             timeout=30, what="host B's proxies synced with the restarted Pilot")
    assert proxy_status(b["dir"], b["env"])["revision"] == 1
    # the agent came back empty and the restarted Pilot never knew the instances: until the
    # supervisors' keep-alives register them again (seconds), hello is not in the mesh (502).
    # Then only v2: the kept rules, never a v1/v2 mix of no rules.
    wait_for(lambda: only(b_out, (200, "v2")), timeout=30, what="hello registered again, routed by the kept rule")
    rules.write_text(RULES.format(subset="v1"))
    wait_for(lambda: meshctl("route", "apply", "-f", str(rules), cwd=a["dir"], check=False).returncode == 0,
             timeout=20, what="route apply once Consul is back")
    try:
        wait_for(lambda: only(b_out, (200, "v1")), timeout=30, what="host B's watch resumed after Consul came back")
    except AssertionError as e:
        log = (b["dir"] / ".meshctl" / "logs" / "pilot.log").read_text()[-3000:]
        raise AssertionError(f"{e}; host B answers {answers(b_out)}; its Pilot's log:\n{log}") from None
