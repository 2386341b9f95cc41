"""Pilot with real sidecars under load: rules change 20 times and Pilot restarts,
and not one request fails. Also: a proxy starts from its last good config
while Pilot is down, and a config a proxy rejects never replaces the one it runs."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from meshctl.credentials import bearer, mesh_credential
from meshctl.loader.codec import to_data
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Node

from .helpers import LoadGenerator, free_port, meshctl_popen, meshctl_run, start_hello, stop, wait_http

pytestmark = pytest.mark.e2e

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def vs(w1: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: [hello]
  http:
  - route:
    - {{destination: {{host: hello, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: hello, subset: v2}}, weight: {100 - w1}}}
"""


class Mesh:
    """Pilot + a client sidecar + one server sidecar per hello version, all real processes."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.state = tmp / "state"
        self.state.mkdir()
        self.pilot_port = free_port()
        self.pilot_url = f"http://127.0.0.1:{self.pilot_port}"
        self.procs = []
        self.pilot = None

    def start_pilot(self):
        self.pilot = meshctl_popen("pilot", "serve", "--port", str(self.pilot_port), "--state-dir", str(self.state), log=self.tmp / "pilot.log")
        wait_http(self.pilot_port, "/healthz")

    def auth(self) -> dict:
        """The mesh credential, as the CLI and the supervisor send it (Pilot created it)."""
        return bearer(mesh_credential(self.state, create=False))

    def node_file(self, name: str, service: str, labels: dict, listeners: list[Listener]) -> str:
        node = Node(Workload(name=name, service=service, labels=FrozenDict(labels)), tuple(listeners))
        path = self.tmp / f"{name}.node.json"
        path.write_text(json.dumps(to_data(node)))
        return str(path)

    def sidecar(self, name: str, node_file: str) -> int:
        admin = free_port()
        p = meshctl_popen("proxy", "run", "--pilot", self.pilot_url, "--node", node_file, "--admin-port", str(admin),
                          "--state-dir", str(self.state), log=self.tmp / f"{name}.log")
        self.procs.append(p)
        wait_http(admin, "/ready")
        return admin

    def register(self, iid: str, service: str, port: int, labels: dict) -> None:
        body = {"instance": {"id": iid, "service": service, "address": "127.0.0.1", "port": port, "labels": labels,
                             "meta": {"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true"}}}
        httpx.put(f"{self.pilot_url}/v1/registry/instances/{iid}", json=body, timeout=5, headers=self.auth()).raise_for_status()

    def apply(self, text: str) -> None:
        f = self.tmp / "rule.yaml"
        f.write_text(text)
        meshctl_run("route", "apply", "--wait", "-f", str(f), "--state-dir", str(self.state))

    def close(self):
        for p in self.procs:
            stop(p)
        if self.pilot:
            stop(self.pilot)


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    m.start_pilot()
    try:
        yield m
    finally:
        m.close()


def build(mesh: Mesh) -> int:
    """Two hello versions behind their sidecars, and a client sidecar; returns its outbound port."""
    for version in ("v1", "v2"):
        app, inbound = free_port(), free_port()
        mesh.procs.append(start_hello(app, version, mesh.tmp / f"hello-{version}.log"))
        node = mesh.node_file(f"hello-{version}-0", "hello", {"app": "hello", "version": version}, [
            Listener(name="inbound", direction="inbound", address="127.0.0.1", port=inbound, app_address="127.0.0.1", app_port=app)])
        mesh.sidecar(f"hello-{version}-0", node)
        mesh.register(f"hello-{version}-0", "hello", inbound, {"app": "hello", "version": version})
    outbound = free_port()
    node = mesh.node_file("client-0", "client", {"app": "client"}, [
        Listener(name="outbound", direction="outbound", address="127.0.0.1", port=outbound)])
    mesh.sidecar("client-0", node)
    mesh.apply(DR + "---" + vs(100))
    return outbound


def test_rule_changes_and_a_pilot_restart_under_load_fail_no_request(mesh):
    outbound = build(mesh)
    with LoadGenerator(outbound, "http://hello:9080/", rps=500, connections=10) as load:
        time.sleep(1.0)
        load.mark()
        for i in range(20):
            mesh.apply(vs(100 if i % 2 else 0))
            if i == 10:
                load.mark()
                stop(mesh.pilot)
                time.sleep(1.0)  # traffic keeps flowing on the config the proxies have
                load.mark()
                mesh.start_pilot()
        time.sleep(1.0)
    r = load.result
    assert r.failed == 0, (r.statuses, r.errors[:5])
    # the load really ran: requests in every phase (warm-up, rule changes, Pilot down, Pilot back)
    assert load.ran_in_every_phase(), load.marks
    assert set(r.statuses) == {200}
    versions = {b.decode().split('"version": "')[1][:2] for b in r.bodies}
    assert versions == {"v1", "v2"}
    status = httpx.get(f"{mesh.pilot_url}/v1/status", timeout=5, headers=mesh.auth()).json()
    assert {p["status"] for p in status["proxies"]} == {"SYNCED"}


def test_a_proxy_starts_from_its_last_good_config_while_pilot_is_down(mesh):
    outbound = build(mesh)
    mesh.apply(vs(0))  # all to v2
    # Restart the client sidecar with Pilot gone: it must still route to v2.
    client = mesh.procs.pop()
    stop(client)
    stop(mesh.pilot)
    node = str(mesh.tmp / "client-0.node.json")
    mesh.sidecar("client-0", node)
    from .helpers import http_get

    status, body = http_get(outbound, "http://hello:9080/")
    assert status == 200 and b'"v2"' in body
    # When Pilot returns the proxy resyncs and ACKs, without a restart.
    mesh.start_pilot()
    deadline = time.monotonic() + 30  # a reconnect with backoff: generous for a loaded machine
    while time.monotonic() < deadline:
        st = httpx.get(f"{mesh.pilot_url}/v1/status", timeout=5, headers=mesh.auth()).json()
        if {p["status"] for p in st["proxies"]} == {"SYNCED"}:
            break
        time.sleep(0.1)
    assert {p["status"] for p in st["proxies"]} == {"SYNCED"}, st


def test_a_config_the_proxy_rejects_is_nacked_and_the_old_one_keeps_serving(mesh):
    outbound = build(mesh)
    mesh.apply(vs(0))
    # Give the client a node whose binding port is already taken: binding it must fail in the proxy.
    busy = free_port()
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", busy))
    holder.listen()
    try:
        node = json.loads((mesh.tmp / "client-0.node.json").read_text())
        node["listeners"].append({"name": "binding-hello", "direction": "binding", "address": "127.0.0.1", "port": busy,
                                  "protocol": "http", "service": "hello", "servicePort": 9080})
        httpx.put(f"{mesh.pilot_url}/v1/proxies/client-0", json=node, timeout=5, headers=mesh.auth()).raise_for_status()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = httpx.get(f"{mesh.pilot_url}/v1/status", timeout=5, headers=mesh.auth()).json()
            client = next(p for p in st["proxies"] if p["proxy"] == "client-0")
            if client["status"] == "NACKED":
                break
            time.sleep(0.1)
        assert client["status"] == "NACKED", client
        assert str(busy) in client["error"] or "in use" in client["error"], client["error"]
        from .helpers import http_get

        status, body = http_get(outbound, "http://hello:9080/")
        assert status == 200 and b'"v2"' in body
        out = meshctl_run("pilot", "proxy-status", "--state-dir", str(mesh.state)).stdout
        assert "NACKED" in out
    finally:
        holder.close()
