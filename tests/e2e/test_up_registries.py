"""`meshctl up` on a real Consul agent and a real Eureka server, end to end.

Two versions of a tiny app behind their sidecars; requests go through a
sidecar's outbound listener (used as an HTTP proxy, as apps do with
HTTP_PROXY). Services registered straight through Consul's or Eureka's own
API stand for applications outside the mesh. The registry server is stopped
under load (no request may fail) and started again (registrations come back,
new instances are discovered).

The tests of each registry share one running mesh and run in file order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.tools.servers import ServerProcess, build_tool, free_ports

from .helpers import HELLO_APP, LoadGenerator, free_port, http_get, mesh_ports, start_hello, stop

pytestmark = pytest.mark.e2e

WRAPPER = f"""import os, runpy, sys
sys.argv = [{str(HELLO_APP)!r}, os.environ["PORT"], sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy", "CONSUL_HTTP_TOKEN")} | (env or {})
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def write_mesh(work: Path, registry: str | None = None) -> None:
    (work / "hello.py").write_text(WRAPPER)
    # REGISTRY_ONLY: a name the registry has not delivered yet is a quick 502 while the
    # tests poll, not a passthrough that waits on DNS for a name no resolver knows.
    settings = (f"portRange: {mesh_ports()[0]}, outboundTrafficPolicy: REGISTRY_ONLY"
                + (f", registry: '{registry}'" if registry else ""))
    (work / "mesh.yaml").write_text(
        f"settings: {{{settings}}}\n"
        "services:\n"
        "- name: hello\n"
        "  port: 9080\n"
        "  healthCheck: {http: /health, interval: 1s}\n"
        "  versions:\n"
        "  - {name: v1, command: [python3, hello.py, v1]}\n"
        "  - {name: v2, command: [python3, hello.py, v2]}\n"
    )


def status(work: Path) -> dict:
    return json.loads(meshctl("status", "--json", cwd=work).stdout)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:g}s")
        time.sleep(interval)


def ask(outbound: int, url: str) -> tuple[int, str]:
    """One request through the mesh; returns (status, the answering app's version or the body)."""
    code, body = http_get(outbound, url)
    if code != 200:
        return code, body.decode(errors="replace")
    return code, json.loads(body)["version"]


def versions(outbound: int, url: str, n: int = 12) -> Counter:
    return Counter(ask(outbound, url) for _ in range(n))


def answers_only(outbound: int, url: str, expected: set[str], n: int = 12) -> bool:
    return set(versions(outbound, url, n)) == {(200, v) for v in expected}


def local_http() -> httpx.Client:
    # Straight to the registry server, never through an HTTP proxy of the environment.
    return httpx.Client(trust_env=False, timeout=5.0)


def remove_v2_under_load(mesh: dict, v2_state) -> tuple:
    """`up` again with v2 gone from mesh.yaml while traffic flows; returns the load
    result and every registry state of hello-v2-0 seen meanwhile (``v2_state()``
    called in a loop: it may block until the next change; None once it is gone)."""
    work = mesh["dir"]
    text = (work / "mesh.yaml").read_text()
    (work / "mesh.yaml").write_text(text.replace("  - {name: v2, command: [python3, hello.py, v2]}\n", ""))
    seen: list = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            state = v2_state()
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with LoadGenerator(mesh["outbound"], "http://hello:9080/", rps=40, connections=4) as load:
            time.sleep(0.5)
            meshctl("up", "-f", "mesh.yaml", cwd=work)
            time.sleep(0.5)
    finally:
        done.set()
        watcher.join(5)
    assert [w["name"] for w in status(work)["workloads"]] == ["hello-v1-0"]
    assert answers_only(mesh["outbound"], "http://hello:9080/", {"v1"})
    return load.result, seen


def up_mesh(work: Path, registry: str) -> dict:
    write_mesh(work)
    started = time.monotonic()
    meshctl("up", "-d", "-f", "mesh.yaml", "--registry", registry, cwd=work)
    st = status(work)
    outbound = int(next(w for w in st["workloads"] if w["name"] == "hello-v1-0")["outbound_address"].rsplit(":", 1)[1])
    return {"dir": work, "outbound": outbound, "status": st, "up_seconds": time.monotonic() - started}


# ---------------------------------------------------------------- no registry there


def test_unreachable_or_malformed_registry_is_named_and_nothing_is_left_running(tmp_path):
    write_mesh(tmp_path)
    dead = f"consul://127.0.0.1:{free_port()}"
    r = meshctl("up", "-f", "mesh.yaml", "--registry", dead, cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert dead in r.stderr and "cannot connect" in r.stderr and "/v1/status/leader" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    allocated = json.loads((tmp_path / ".meshctl" / "ports.json").read_text())
    for port in allocated.values():  # neither Pilot nor an app nor a sidecar ever started
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} is bound"
    assert not (tmp_path / ".meshctl" / "logs" / "pilot.log").exists()
    assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()

    # The same from mesh.yaml, detached, with Eureka: the error reaches the user.
    dead = f"eureka://127.0.0.1:{free_port()}/eureka"
    write_mesh(tmp_path, registry=dead)
    r = meshctl("up", "-d", "-f", "mesh.yaml", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert dead in r.stderr and "cannot connect" in r.stderr and "fetch the registry" in r.stderr, r.stderr
    assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()
    st = json.loads(meshctl("status", "--json", cwd=tmp_path).stdout)
    assert dead in st["error"] and not st["workloads"] or all(w["app_pid"] is None for w in st["workloads"]), st

    r = meshctl("up", "-f", "mesh.yaml", "--registry", "consul://127.0.0.1:99999", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "consul://127.0.0.1:99999" in r.stderr and "port" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- Consul


@pytest.fixture(scope="module")
def consul_mesh(consul_agent, tmp_path_factory):
    mesh = up_mesh(tmp_path_factory.mktemp("consul-mesh"), consul_agent)
    apps: list = []
    mesh["apps"] = apps
    try:
        yield mesh
    finally:
        meshctl("down", cwd=mesh["dir"], check=False)
        for p in apps:
            stop(p)
        consul_agent.start()  # in case a test failed while it was stopped
        with local_http() as c:
            for sid in ("billing-a", "billing-b", "billing-late"):
                c.put(f"{consul_agent.http}/v1/agent/service/deregister/{sid}")


def consul_register(agent, sid: str, name: str, port: int, ttl_check: bool = False) -> None:
    """Register a service the way any non-meshctl program would: with an HTTP
    check, or a TTL check (``service:<id>``) that the test passes or fails itself."""
    check = {"TTL": "60s", "Status": "passing"} if ttl_check else {
        "HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s", "Timeout": "1s"}
    body = {"ID": sid, "Name": name, "Address": "127.0.0.1", "Port": port, "Tags": ["external"], "Check": check}
    with local_http() as c:
        r = c.put(f"{agent.http}/v1/agent/service/register", json=body)
        assert r.status_code == 200, r.text


def consul_services(agent) -> dict:
    with local_http() as c:
        return c.get(f"{agent.http}/v1/agent/services").json()


def workload_names(ids) -> set[str]:
    """The workloads of registry ids: in a shared registry meshctl registers
    ``<workload>@<address>:<port>`` (supervisor/registration.py), others as they like."""
    return {i.split("@", 1)[0] for i in ids}


@pytest.mark.consul
def test_consul_has_every_sidecar_with_labels_address_and_a_passing_check(consul_mesh, consul_agent):
    st = consul_mesh["status"]
    assert st["registry"]["url"] == str(consul_agent) and st["registry"]["reachable"] is True
    services = consul_services(consul_agent)
    with local_http() as c:
        checks = c.get(f"{consul_agent.http}/v1/agent/checks").json()
    for w in st["workloads"]:
        assert w["registry_id"] == f"{w['name']}@{w['inbound_address']}"
        svc = services[w["registry_id"]]
        assert svc["Service"] == "hello"
        assert f"{svc['Address']}:{svc['Port']}" == w["inbound_address"]
        assert svc["Meta"]["version"] == w["version"] and f"version={w['version']}" in svc["Tags"]
        mine = [ch for ch in checks.values() if ch["ServiceID"] == w["registry_id"]]
        assert [ch["Status"] for ch in mine] == ["passing"]


@pytest.mark.consul
def test_consul_endpoints_route_through_the_mesh(consul_mesh):
    # `up` returned once Pilot saw every instance: routable at once, no waiting.
    assert answers_only(consul_mesh["outbound"], "http://hello:9080/", {"v1", "v2"})


@pytest.mark.consul
def test_consul_runs_each_sidecars_check_so_a_stalled_supervisor_leaves_its_instances_routable(consul_mesh, consul_agent):
    """The local agent polls each sidecar's admin /ready itself: instances stay healthy while the
    supervisor (or the agent's own API, when its Raft leader is lost) cannot renew anything."""
    st = consul_mesh["status"]

    def polled_by_the_agent() -> bool:
        with local_http() as c:
            checks = c.get(f"{consul_agent.http}/v1/agent/checks").json()
        for w in st["workloads"]:
            (check,) = [ch for ch in checks.values() if ch["ServiceID"] == w["registry_id"]]
            assert check["Type"] == "http", check
            # (its Output stays empty until the agent's first poll, within one interval)
            if f"http://127.0.0.1:{w['admin_address'].rsplit(':', 1)[1]}/ready" not in check["Output"]:
                return False
        return True

    wait_for(polled_by_the_agent, timeout=15, what="the agent to poll each sidecar's /ready")

    def passing() -> int:
        with local_http() as c:
            return len(c.get(f"{consul_agent.http}/v1/health/service/hello", params={"passing": "1"}).json())

    assert passing() == 2
    supervisor = json.loads((consul_mesh["dir"] / ".meshctl" / "status.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGSTOP)
    try:
        time.sleep(13)  # longer than a TTL check's 10 s: nothing renews meanwhile
        assert passing() == 2
        assert answers_only(consul_mesh["outbound"], "http://hello:9080/", {"v1", "v2"})
    finally:
        os.kill(supervisor, signal.SIGCONT)


@pytest.mark.consul
def test_consul_foreign_service_is_reachable_and_a_failing_check_removes_its_instance(consul_mesh, consul_agent, tmp_path):
    out = consul_mesh["outbound"]
    pa, pb = free_port(), free_port()
    app_a = start_hello(pa, "billing-a", tmp_path / "a.log")
    app_b = start_hello(pb, "billing-b", tmp_path / "b.log")
    consul_mesh["apps"] += [app_a, app_b]
    # Two instances of one service, each on its own port: the client names the
    # service only, the mesh balances over both.
    consul_register(consul_agent, "billing-a", "billing", pa)
    consul_register(consul_agent, "billing-b", "billing", pb, ttl_check=True)
    wait_for(lambda: answers_only(out, "http://billing/", {"billing-a", "billing-b"}, 12), what="billing reachable by name")
    # billing-b's check fails (its app still runs and answers): Consul takes it
    # out of ?passing, Pilot out of the endpoints.
    with local_http() as c:
        assert c.put(f"{consul_agent.http}/v1/agent/check/fail/service:billing-b").status_code == 200
    wait_for(lambda: answers_only(out, "http://billing/", {"billing-a"}, 12), what="billing-b removed")
    assert ask(out, "http://billing/")[0] == 200 and http_get(pb, "/")[0] == 200
    with local_http() as c:
        checks = c.get(f"{consul_agent.http}/v1/health/checks/billing").json()
    assert {ch["ServiceID"]: ch["Status"] for ch in checks} == {"billing-a": "passing", "billing-b": "critical"}


@pytest.mark.consul
def test_consul_down_under_load_fails_no_request_and_status_says_unreachable(consul_mesh, consul_agent):
    out, work = consul_mesh["outbound"], consul_mesh["dir"]
    try:
        with LoadGenerator(out, "http://hello:9080/", rps=40, connections=4) as load:
            time.sleep(1.0)
            load.mark()
            consul_agent.stop()
            st = wait_for(lambda: (s := status(work)) and not s["registry"]["reachable"] and s, timeout=15,
                          what="status shows the registry unreachable")
            load.mark()
            time.sleep(3.0)  # Pilot's watch fails and retries; proxies keep their endpoints
        assert "cannot connect" in st["registry"]["error"] and str(consul_agent) in st["registry"]["error"]
        assert "unreachable" in meshctl("status", cwd=work).stdout
        result = load.result
        assert result.failed == 0 and set(result.statuses) == {200}, (result.statuses, result.errors[:5])
        assert load.ran_in_every_phase(), load.marks  # before, while Consul went away, after
        answered = b" ".join(result.bodies)
        assert b'"version": "v1"' in answered and b'"version": "v2"' in answered, result.bodies
    finally:
        consul_agent.start()


@pytest.mark.consul
def test_consul_restart_re_registers_the_mesh_and_new_instances_are_discovered(consul_mesh, consul_agent, tmp_path):
    out, work = consul_mesh["outbound"], consul_mesh["dir"]
    consul_agent.start()  # a dev agent comes back empty
    wait_for(lambda: status(work)["registry"]["reachable"], timeout=15, what="status shows the registry reachable")
    wait_for(lambda: {"hello-v1-0", "hello-v2-0"} <= workload_names(consul_services(consul_agent)), timeout=15,
             what="sidecars registered again")
    wait_for(lambda: answers_only(out, "http://hello:9080/", {"v1", "v2"}), timeout=20, what="routing again")
    port = free_port()
    consul_mesh["apps"].append(start_hello(port, "late", tmp_path / "late.log"))
    consul_register(consul_agent, "billing-late", "billing", port)
    wait_for(lambda: answers_only(out, "http://billing/", {"late"}, 3), timeout=20, what="new instance discovered")


@pytest.mark.consul
def test_consul_instance_removed_by_up_goes_into_maintenance_then_leaves_without_failed_requests(consul_mesh, consul_agent):
    index = "0"

    def v2_state():
        # A blocking query: it answers as soon as anything changes, so no state is missed.
        nonlocal index
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            r = c.get(f"{consul_agent.http}/v1/health/checks/hello", params={"index": index, "wait": "2s"})
        index = r.headers.get("X-Consul-Index", "0")
        mine = {ch["CheckID"]: ch["Status"] for ch in r.json() if ch["ServiceID"].startswith("hello-v2-0@")}
        return None if not mine else "maintenance" if any(c.startswith("_service_maintenance:hello-v2-0@") for c in mine) \
            else "registered"

    result, seen = remove_v2_under_load(consul_mesh, v2_state)
    assert result.failed == 0 and set(result.statuses) == {200}, (result.statuses, result.errors[:5])
    assert seen == ["registered", "maintenance", None], seen


@pytest.mark.consul
def test_consul_down_deregisters_every_instance(consul_mesh, consul_agent):
    meshctl("down", cwd=consul_mesh["dir"])
    wait_for(lambda: not [s for s in consul_services(consul_agent).values() if s["Service"] == "hello"], timeout=10,
             what="instances deregistered")


ACL_TOKEN = "meshctl-test-management-token"


@pytest.fixture
def consul_with_acls(tmp_path):
    """A second Consul dev agent whose ACLs deny everything without a token."""
    port, server_port, lan_port, wan_port = free_ports(4)
    argv = [
        build_tool("consul.sh"), "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-node=meshctl-acl",
        f"-http-port={port}", "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
        f"-server-port={server_port}", f"-serf-lan-port={lan_port}", f"-serf-wan-port={wan_port}", "-log-level=warn",
        "-hcl", 'acl { enabled = true, default_policy = "deny", tokens { initial_management = "%s" } }' % ACL_TOKEN,
    ]  # fmt: skip
    http = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with local_http() as c:
                r = c.get(f"{http}/v1/catalog/nodes", headers={"X-Consul-Token": ACL_TOKEN})
            return r.status_code == 200 and "meshctl-acl" in r.text
        except httpx.HTTPError:
            return False

    server = ServerProcess("consul agent with ACLs", argv, ready, tmp_path / "consul-acl.log", start_timeout=60)
    server.start()
    try:
        yield f"consul://127.0.0.1:{port}", http
    finally:
        server.stop()


@pytest.mark.consul
def test_consul_acl_token_comes_from_the_flag_or_the_environment(consul_with_acls, tmp_path):
    url, http = consul_with_acls
    write_mesh(tmp_path)
    started = time.monotonic()
    r = meshctl("up", "-d", "-f", "mesh.yaml", "--registry", url, cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "permission denied by Consul ACLs" in r.stderr and "CONSUL_HTTP_TOKEN" in r.stderr and url in r.stderr, r.stderr
    assert time.monotonic() - started < 30  # refused at once, not after the readiness timeout
    assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()

    for how in ({"args": ("--consul-token", ACL_TOKEN)}, {"env": {"CONSUL_HTTP_TOKEN": ACL_TOKEN}}):
        meshctl("up", "-d", "-f", "mesh.yaml", "--registry", url, *how.get("args", ()), cwd=tmp_path, env=how.get("env"))
        try:
            st = status(tmp_path)
            assert "token" not in json.dumps(st["registry"]).lower()
            with local_http() as c:
                services = c.get(f"{http}/v1/agent/services", headers={"X-Consul-Token": ACL_TOKEN}).json()
            assert {"hello-v1-0", "hello-v2-0"} <= workload_names(services), how
            # Pilot, a child process, watches with the token too: the endpoints reach the proxies.
            outbound = int(st["workloads"][0]["outbound_address"].rsplit(":", 1)[1])
            wait_for(lambda: answers_only(outbound, "http://hello:9080/", {"v1", "v2"}), what=f"routing with the token ({how})")
        finally:
            meshctl("down", cwd=tmp_path)


# ---------------------------------------------------------------- Eureka


@pytest.fixture(scope="module")
def eureka_mesh(eureka_server, tmp_path_factory):
    mesh = up_mesh(tmp_path_factory.mktemp("eureka-mesh"), eureka_server)
    apps: list = []
    mesh["apps"] = apps
    try:
        yield mesh
    finally:
        meshctl("down", cwd=mesh["dir"], check=False)
        for p in apps:
            stop(p)
        eureka_server.start()
        with local_http() as c:
            for iid in ("inventory-a", "inventory-b", "inventory-late"):
                c.delete(f"{eureka_server.http}/apps/INVENTORY/{iid}")


def eureka_register(server, iid: str, vip: str, port: int, status: str = "UP") -> None:
    """Register an instance as any Eureka client would (POST /apps/APP, JSON)."""
    doc = {"instance": {
        "instanceId": iid, "hostName": "127.0.0.1", "app": vip.upper(), "ipAddr": "127.0.0.1",
        "vipAddress": vip, "status": status, "port": {"$": port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
    }}  # fmt: skip
    with local_http() as c:
        r = c.post(f"{server.http}/apps/{vip.upper()}", json=doc)
        assert r.status_code == 204, r.text


def eureka_instances(server, app: str) -> dict[str, dict]:
    with local_http() as c:
        r = c.get(f"{server.http}/apps/{app}", headers={"Accept": "application/json"})
    if r.status_code == 404:
        return {}
    docs = r.json()["application"]["instance"]
    docs = docs if isinstance(docs, list) else [docs]
    return {d["instanceId"]: d for d in docs}


@pytest.mark.eureka
def test_eureka_has_every_sidecar_up_with_labels_address_and_lease(eureka_mesh, eureka_server):
    st = eureka_mesh["status"]
    assert st["registry"]["url"] == str(eureka_server) and st["registry"]["reachable"] is True
    docs = eureka_instances(eureka_server, "HELLO")
    assert set(docs) == {w["registry_id"] for w in st["workloads"]}
    for w in st["workloads"]:
        assert w["registry_id"] == f"{w['name']}@{w['inbound_address']}"
        d = docs[w["registry_id"]]
        assert d["status"] == "UP" and d["vipAddress"] == "hello"
        assert f"{d['ipAddr']}:{d['port']['$']}" == w["inbound_address"]
        assert d["metadata"]["version"] == w["version"]
        assert d["leaseInfo"]["renewalIntervalInSecs"] == 10
    eureka_mesh["renewed_at"] = {n: d["leaseInfo"]["lastRenewalTimestamp"] for n, d in docs.items()}


@pytest.mark.eureka
def test_eureka_foreign_app_is_reachable_by_vip_and_a_down_instance_is_removed(eureka_mesh, eureka_server, tmp_path):
    out = eureka_mesh["outbound"]
    # `up` returned once Pilot saw every instance: routable at once, no waiting.
    assert answers_only(out, "http://hello:9080/", {"v1", "v2"})
    pa, pb = free_port(), free_port()
    eureka_mesh["apps"] += [start_hello(pa, "inventory-a", tmp_path / "a.log"), start_hello(pb, "inventory-b", tmp_path / "b.log")]
    eureka_register(eureka_server, "inventory-a", "inventory", pa)
    eureka_register(eureka_server, "inventory-b", "inventory", pb)
    wait_for(lambda: answers_only(out, "http://inventory/", {"inventory-a", "inventory-b"}, 12),
             what="inventory reachable by its VIP address")
    # A client whose health check fails registers itself DOWN: it leaves the endpoints.
    eureka_register(eureka_server, "inventory-b", "inventory", pb, status="DOWN")
    wait_for(lambda: answers_only(out, "http://inventory/", {"inventory-a"}, 12), what="inventory-b removed")


@pytest.mark.eureka
def test_eureka_leases_are_renewed(eureka_mesh, eureka_server):
    before = eureka_mesh["renewed_at"]

    def renewed():
        docs = eureka_instances(eureka_server, "HELLO")
        return all(docs[n]["leaseInfo"]["lastRenewalTimestamp"] > t for n, t in before.items())

    wait_for(renewed, timeout=15, interval=0.5, what="every lease renewed within the 10 s renewal interval")


@pytest.mark.eureka
def test_eureka_down_under_load_then_back(eureka_mesh, eureka_server, tmp_path):
    out, work = eureka_mesh["outbound"], eureka_mesh["dir"]
    try:
        with LoadGenerator(out, "http://hello:9080/", rps=40, connections=4) as load:
            time.sleep(1.0)
            load.mark()
            eureka_server.stop()
            st = wait_for(lambda: (s := status(work)) and not s["registry"]["reachable"] and s, timeout=15,
                          what="status shows the registry unreachable")
            load.mark()
            time.sleep(3.0)
        assert "cannot connect" in st["registry"]["error"]
        result = load.result
        assert result.failed == 0 and set(result.statuses) == {200}, (result.statuses, result.errors[:5])
        assert load.ran_in_every_phase(), load.marks  # before, while Eureka went away, after
    finally:
        eureka_server.start()  # an empty registry: it forgot every instance
    # generous bounds (polled, so a quick recovery is not slowed): a restarted JVM on a busy CI machine
    wait_for(lambda: status(work)["registry"]["reachable"], timeout=30, what="status shows the registry reachable")
    wait_for(lambda: {"hello-v1-0", "hello-v2-0"} <= workload_names(eureka_instances(eureka_server, "HELLO")), timeout=40,
             what="sidecars registered again")
    wait_for(lambda: answers_only(out, "http://hello:9080/", {"v1", "v2"}), timeout=40, what="routing again")
    port = free_port()
    eureka_mesh["apps"].append(start_hello(port, "inventory-late", tmp_path / "late.log"))
    eureka_register(eureka_server, "inventory-late", "inventory", port)
    wait_for(lambda: answers_only(out, "http://inventory/", {"inventory-late"}, 3), timeout=25,
             what="new instance discovered")


@pytest.mark.eureka
def test_eureka_instance_removed_by_up_is_out_of_service_then_deleted_without_failed_requests(eureka_mesh, eureka_server):
    def v2_state():
        doc = next((d for i, d in eureka_instances(eureka_server, "HELLO").items() if i.startswith("hello-v2-0@")), None)
        return doc["status"] if doc else None

    result, seen = remove_v2_under_load(eureka_mesh, v2_state)
    assert result.failed == 0 and set(result.statuses) == {200}, (result.statuses, result.errors[:5])
    assert seen == ["UP", "OUT_OF_SERVICE", None], seen


@pytest.mark.eureka
def test_eureka_down_deletes_every_instance(eureka_mesh, eureka_server):
    meshctl("down", cwd=eureka_mesh["dir"])
    # `down` returns once every DELETE was answered; Eureka's own read path may lag
    # a moment behind its writes on a busy machine.
    wait_for(lambda: eureka_instances(eureka_server, "HELLO") == {}, timeout=10,
             what=f"instances deleted (left: {sorted(eureka_instances(eureka_server, 'HELLO'))})")
