"""`meshctl up -f` again with a changed proxy setting, on a mesh whose registry is a
real Consul agent or a real Eureka server: every sidecar starts again with the setting, in two parallel waves
(all but one instance of each service version, then the rest), so the reload takes the
same time for one instance or many; each instance is drained out of Pilot's endpoints
before its sidecar stops and comes back into the registry after, routable (Consul:
passing; Eureka: UP, not the OUT_OF_SERVICE its drain set). Traffic through the ingress
gateway (itself started again only after the sidecars) meanwhile gets no error.

Before: an instance drained for a restart was never registered again (its health loop
ended at DRAINING), and each instance waited for it the whole readyTimeout, one after
the other; and the drain waited its whole 10 s whenever Pilot kept the instance listed
(as draining, Eureka, or as a service's last instance, unhealthy)."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from .helpers import HELLO_APP, mesh_ports
from .test_up_registries import meshctl, status

pytestmark = pytest.mark.e2e

REPLICAS = 5

RULES = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: hello-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello}
spec:
  hosts: ["*"]
  gateways: [hello-gateway]
  http:
  - route:
    - destination: {host: hello, port: {number: 9080}}
"""


def _mesh(port_range: str, gw: int, extra: str = "") -> str:
    return (f"settings: {{portRange: {port_range}, readyTimeout: 20s{extra}}}\n"
            "services:\n- name: hello\n  port: 9080\n  healthCheck: {tcp: true, interval: 1s}\n"
            f"  versions:\n  - {{name: v1, command: [python3, hello_app.py], replicas: {REPLICAS}}}\n"
            "- name: solo\n  port: 9080\n  healthCheck: {tcp: true, interval: 1s}\n"
            "  versions:\n  - {name: v1, command: [python3, hello_app.py]}\n"
            f"gateways:\n- name: gw\n  labels: {{istio: ingressgateway}}\n  ports: {{80: {gw}}}\n")


class _Load:
    """GETs through the gateway, one connection each, every 20 ms; each outcome with its time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                self.seen.append((t, data.split(b" ", 2)[1].decode() if data else "empty"))
            except OSError as e:
                self.seen.append((t, type(e).__name__))
            time.sleep(0.02)

    def __enter__(self) -> "_Load":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(10)


def _log_times(path: Path, pattern: str) -> list[float]:
    """The wall-clock times of a log's lines matching ``pattern``."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
            if m:
                out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000)
    return out


def _routable_in_registry(kind: str, server) -> set[str]:
    """The ids of the instances of hello and solo the registry itself hands out: Consul's
    passing ones, Eureka's UP ones."""
    out: set[str] = set()
    with httpx.Client(trust_env=False, timeout=5) as c:
        for svc in ("hello", "solo"):
            if kind == "consul":
                out |= {e["Service"]["ID"] for e in c.get(f"{server.http}/v1/health/service/{svc}",
                                                          params={"passing": "1"}).json()}
            else:
                app = c.get(f"{server.http}/apps/{svc.upper()}", headers={"accept": "application/json"}).json()
                out |= {i["instanceId"] for i in app["application"]["instance"] if i["status"] == "UP"}
    return out


@pytest.mark.parametrize("kind", [pytest.param("consul", marks=pytest.mark.consul),
                                  pytest.param("eureka", marks=pytest.mark.eureka)])
def test_a_proxy_settings_reload_restarts_sidecars_in_parallel_and_drops_no_request(kind, request, tmp_path):
    server = request.getfixturevalue("consul_agent" if kind == "consul" else "eureka_server")
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    port_range, gw = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(_mesh(port_range, gw))
    meshctl("up", "-d", "-f", "mesh.yaml", "--registry", server, cwd=tmp_path, timeout=180)
    try:
        (tmp_path / "rules.yaml").write_text(RULES)
        meshctl("route", "apply", "--wait", "-f", "rules.yaml", cwd=tmp_path)
        before = {w["name"]: w for w in status(tmp_path)["workloads"]}
        assert len(before) == REPLICAS + 1  # hello's, and solo's one
        (tmp_path / "mesh.yaml").write_text(_mesh(port_range, gw, ", requestTimeout: 30s"))
        with _Load(gw) as load:
            time.sleep(1.0)
            assert {c for _, c in load.seen} == {"200"}, load.seen[-5:]
            started = time.monotonic()
            r = meshctl("up", "-f", "mesh.yaml", cwd=tmp_path, timeout=180)
            took = time.monotonic() - started
        assert "mesh updated" in r.stdout
        print(f"reload of {REPLICAS + 1} instances on {kind}: {took:.1f}s")
        after = {w["name"]: w for w in status(tmp_path)["workloads"]}
        assert all(after[n]["state"] == "ready" and after[n]["proxy_pid"] != before[n]["proxy_pid"]
                   and after[n]["app_pid"] == before[n]["app_pid"] for n in before), after
        # every instance is back in the registry, routable
        assert _routable_in_registry(kind, server) == {w["registry_id"] for w in after.values()}
        logs = tmp_path / ".meshctl" / "logs"
        # two waves: REPLICAS - 1 of hello's sidecars were stopped before any of them was back
        hello = [n for n in before if n.startswith("hello-")]
        stopped = sorted(_log_times(logs / f"{n}.proxy.log", "SIGINT: draining")[-1] for n in hello)
        back = sorted(_log_times(logs / f"{n}.proxy.log", "connected to Pilot")[-1] for n in hello)
        assert stopped[REPLICAS - 2] < back[0], (stopped, back)
        # no request failed while the sidecars restarted (the gateway's own restart comes after)
        gw_stop = _log_times(logs / "gw.gateway.log", "SIGINT: draining") if (logs / "gw.gateway.log").exists() else []
        until = gw_stop[-1] if gw_stop else time.time()
        during = [c for t, c in load.seen if t < until - 0.5]
        assert len(during) > 50 and set(during) == {"200"}, [x for x in load.seen if x[1] != "200"][:10]
    finally:
        meshctl("down", cwd=tmp_path, check=False)
