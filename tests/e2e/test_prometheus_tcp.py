"""istio_tcp_* as users read them: a TCP service (an echo server, protocol tcp) reached
through a client's sidecar binding under `meshctl up`, a REAL Prometheus (Debian's,
scripts/tools/prometheus.sh) scraping the scrape configuration `meshctl
prometheus-config` prints, and the TCP queries of Istio's Grafana dashboards (Istio
Service and Istio Workload dashboards, with their template variables filled in:
$qrep, $service, $workload, $namespace) returning the bytes and connections this
test made."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.tools.servers import ServerProcess, _http_ok, build_tool, free_port

from .helpers import HELLO_APP, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

TCP_ECHO = '''\
import os, socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
def serve(c):
    with c:
        while (d := c.recv(65536)):
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

MESH = """\
settings: {{portRange: {ports}}}
services:
- name: tcp-echo
  port: 9000
  protocol: tcp
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, tcp_echo.py]}}
- name: client
  port: 9080
  upstreams: {{tcp-echo: {binding}}}
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
"""

CONNECTIONS, PAYLOAD = 6, 5000  # bytes each connection sends (and gets back)


def promql(base: str, q: str) -> float | None:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        res = json.loads(r.read())["data"]["result"]
    if not res:
        return None
    assert len(res) == 1, res
    return float(res[0]["value"][1])


def series(base: str, q: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return [x["metric"] for x in json.loads(r.read())["data"]["result"]]


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while len(data) < len(payload) and (chunk := s.recv(65536)):
            data += chunk
    return data


@pytest.fixture(scope="module")
def tcp_mesh(tmp_path_factory):
    binary = build_tool("prometheus.sh")
    work: Path = tmp_path_factory.mktemp("tcp-prom")
    shutil.copy(HELLO_APP, work / "hello_app.py")
    (work / "tcp_echo.py").write_text(TCP_ECHO)
    ports, binding = mesh_ports()
    (work / "mesh.yaml").write_text(MESH.format(ports=ports, binding=binding))
    sd = str(work / ".meshctl")
    meshctl_run("up", "-d", "-f", str(work / "mesh.yaml"), timeout=90)
    prom = None
    try:
        cfg = meshctl_run("prometheus-config", "--interval", "1s", "--state-dir", sd).stdout
        pdir = tmp_path_factory.mktemp("prometheus-tcp")
        (pdir / "prometheus.yml").write_text(cfg)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        prom = ServerProcess("prometheus", [
            binary, f"--config.file={pdir / 'prometheus.yml'}", f"--storage.tsdb.path={pdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ], lambda: _http_ok(f"{base}/-/ready"), pdir / "prometheus.log", start_timeout=60)
        prom.start()
        yield {"binding": binding, "prom": base}
    finally:
        if prom is not None:
            prom.stop()
        meshctl_run("down", "--state-dir", sd)


def test_istio_dashboard_tcp_queries_return_the_bytes_and_connections_made(tcp_mesh):
    prom, binding = tcp_mesh["prom"], tcp_mesh["binding"]
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{prom}/api/v1/targets", timeout=5) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        if len(active) == 2 and all(t["health"] == "up" for t in active):
            break
        assert time.monotonic() < deadline, [(t["labels"], t["health"], t.get("lastError")) for t in active]
        time.sleep(0.5)

    traffic_from = time.monotonic()
    for i in range(CONNECTIONS):  # spread over a few scrapes, so irate() sees an increase
        payload = bytes([65 + i]) * PAYLOAD
        assert echo(binding, payload) == payload
        time.sleep(0.4)

    service = "tcp-echo.default.svc.cluster.local"
    total = CONNECTIONS * PAYLOAD
    # every counter asserted exactly below has been scraped from both sidecars (each is scraped on
    # its own; waiting for two of them left the others to a scrape that a loaded machine can delay)
    final = {f'sum(istio_tcp_connections_{what}_total{{reporter="{rep}",destination_service_name="tcp-echo"}})': CONNECTIONS
             for what in ("opened", "closed") for rep in ("source", "destination")}
    final.update({f'sum(istio_tcp_{what}_bytes_total{{reporter="{rep}", destination_service="{service}"}})': total
                  for what in ("received", "sent") for rep in ("source", "destination")})
    deadline = time.monotonic() + 20
    while (got := {q: promql(prom, q) for q in final}) != final:
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    # the dashboards' [1m] covers all the traffic: a minute, or longer if a loaded machine took longer
    rng = f"[{max(60, int(time.monotonic() - traffic_from) + 5)}s]"

    for rep in ("source", "destination"):  # the dashboards' $qrep: the client's sidecar, the server's
        # counters: every byte each way, as each side's sidecar saw it
        assert promql(prom, f'sum(istio_tcp_received_bytes_total{{reporter="{rep}", destination_service="{service}"}})') \
            == total
        assert promql(prom, f'sum(istio_tcp_sent_bytes_total{{reporter="{rep}", destination_service="{service}"}})') \
            == total
        # Istio Service dashboard, "TCP Received Bytes" (a rate over the last minute: > 0 while traffic was seen)
        rate = promql(prom, f'sum(irate(istio_tcp_received_bytes_total{{reporter=~"{rep}", '
                            f'destination_service=~"{service}"}}' + rng + '))')
        assert rate is not None and rate >= 0
        increase = promql(prom, f'sum(increase(istio_tcp_received_bytes_total{{reporter=~"{rep}", '
                                f'destination_service=~"{service}"}}' + rng + '))')
        assert 0.5 * total <= increase <= 2 * total, increase
    # Istio Service dashboard, "Bytes Received from Incoming TCP Connection" (mTLS between the sidecars)
    by_client = promql(prom, 'round(sum(increase(istio_tcp_received_bytes_total{reporter=~"destination", '
                             'connection_security_policy="mutual_tls", destination_service=~"' + service + '", '
                             'source_workload=~"client-v1", source_workload_namespace=~"default"}' + rng + ')) '
                             'by (source_workload, source_workload_namespace), 0.001)')
    assert by_client is not None and by_client > 0.5 * total, json.dumps(series(prom, 'istio_tcp_received_bytes_total'))
    # Istio Workload dashboard, "TCP Server Traffic": sent + received of the server workload
    both = promql(prom, 'sum(istio_tcp_sent_bytes_total{reporter=~"destination", destination_workload_namespace=~"default", '
                        'destination_workload=~"tcp-echo-v1"}) + sum(istio_tcp_received_bytes_total{reporter=~"destination", '
                        'destination_workload_namespace=~"default", destination_workload=~"tcp-echo-v1"})')
    assert both == 2 * total
    # connections: opened = closed per reporter, and a rate of connections opened over the last minute
    assert promql(prom, 'sum(istio_tcp_connections_closed_total{reporter="source",destination_service_name="tcp-echo"})') \
        == CONNECTIONS
    assert promql(prom, 'sum(istio_tcp_connections_opened_total{reporter="destination",destination_service_name="tcp-echo"})') \
        == CONNECTIONS
    opened_rate = promql(prom, 'sum(rate(istio_tcp_connections_opened_total{reporter=~"source", '
                               f'destination_service=~"{service}"}}' + rng + ')) by (source_workload)')
    assert opened_rate is not None and opened_rate > 0
