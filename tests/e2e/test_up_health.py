"""`meshctl up`'s active health checks and its refusals, end to end."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from .helpers import LoadGenerator, http_get, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


def mesh_file(work: Path, port_range: str, gw: int) -> None:
    shutil.copy(HERE / "hello_app.py", work / "hello_app.py")
    (work / "mesh.yaml").write_text(f"""
settings: {{portRange: {port_range}}}
services:
- name: hello
  port: 9080
  healthCheck: {{http: /health, interval: 0.3s, unhealthyThreshold: 2}}
  versions:
  - name: v1
    command: [python3, hello_app.py]
    replicas: 2
    env: {{UNHEALTHY_IF: {work}/sick}}
gateways:
- name: gw
  labels: {{istio: ingressgateway}}
  ports: {{80: {gw}}}
""")


def status(work: Path) -> dict:
    return json.loads(meshctl_run("status", "--json", "--state-dir", str(work / ".meshctl")).stdout)


def test_a_failing_health_check_takes_the_instance_out_and_back(tmp_path):
    # mesh_ports(): below Linux's ephemeral range (32768-60999), where any client socket can take a planned port
    ports, gw = mesh_ports()
    mesh_file(tmp_path, ports, gw)
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"))
    try:
        st = status(tmp_path)
        outbound = int(st["workloads"][0]["outbound_address"].rsplit(":", 1)[1])
        seen = {json.loads(http_get(outbound, "http://hello:9080/")[1])["instance"] for _ in range(20)}
        assert seen == {"hello-v1-0", "hello-v1-1"}
        (tmp_path / "sick").write_text("x")  # both replicas read this flag
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = {w["name"]: w["state"] for w in status(tmp_path)["workloads"]}
            if set(states.values()) == {"unhealthy"}:
                break
            time.sleep(0.2)
        assert set(states.values()) == {"unhealthy"}, states
        # No healthy endpoint left: the sidecar says so instead of hanging.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            code, body = http_get(outbound, "http://hello:9080/")
            if code == 503:
                break
            time.sleep(0.1)
        assert code == 503
        (tmp_path / "sick").unlink()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = {w["name"]: w["state"] for w in status(tmp_path)["workloads"]}
            if set(states.values()) == {"ready"}:
                break
            time.sleep(0.2)
        assert set(states.values()) == {"ready"}, states
        with LoadGenerator(outbound, "http://hello:9080/", rps=100, connections=2) as load:
            time.sleep(0.75)
            load.mark()
            time.sleep(0.75)
        assert load.result.failed == 0 and load.ran_in_every_phase(), (load.result.statuses, load.marks)
    finally:
        meshctl_run("down", "--state-dir", str(tmp_path / ".meshctl"))


def test_a_busy_gateway_port_is_named_and_nothing_is_left_running(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    gw = holder.getsockname()[1]
    mesh_file(tmp_path, mesh_ports()[0], gw)
    try:
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "meshctl", "up", "-d", "-f", str(tmp_path / "mesh.yaml")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert f"127.0.0.1:{gw} (gateway gw port 80) is already in use" in r.stderr
        assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()
        st = json.loads((tmp_path / ".meshctl" / "status.json").read_text())
        assert st["state"] in ("failed", "stopped")
    finally:
        holder.close()


def test_outlier_ejection_is_logged_and_shown_by_proxy_config_endpoints(tmp_path):
    ports, gw = mesh_ports()
    shutil.copy(HERE / "hello_app.py", tmp_path / "hello_app.py")
    (tmp_path / "mesh.yaml").write_text(f"""
settings: {{portRange: {ports}}}
services:
- name: hello
  port: 9080
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
  - {{name: v2, command: [python3, hello_app.py], env: {{FAIL_IF: {tmp_path}/fail}}}}
gateways:
- name: gw
  labels: {{istio: ingressgateway}}
  ports: {{80: {gw}}}
""")
    (tmp_path / "dr.yaml").write_text("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
""")
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"))
    try:
        meshctl_run("route", "apply", "--wait", "-f", str(tmp_path / "dr.yaml"), "--state-dir", sd)
        st = status(tmp_path)
        client = next(w for w in st["workloads"] if w["name"] == "hello-v1-0")
        outbound = int(client["outbound_address"].rsplit(":", 1)[1])
        (tmp_path / "fail").write_text("x")
        # v2 now answers 503; the client's retries (Istio's default policy) hide that from
        # the caller, but outlier detection counts it and ejects v2.
        codes = [http_get(outbound, "http://hello:9080/")[0] for _ in range(12)]
        assert codes == [200] * 12
        out = meshctl_run("pilot", "proxy-config", "hello-v1-0", "endpoints", "--state-dir", sd).stdout
        v2_line = next(line for line in out.splitlines() if line.startswith(" hello:9080 ") and "hello-v2-0" in line)
        assert "EJECTED" in v2_line
        v1_line = next(line for line in out.splitlines() if line.startswith(" hello:9080 ") and "hello-v1-0" in line)
        assert "EJECTED" not in v1_line
        log = (tmp_path / ".meshctl" / "logs" / "hello-v1-0.proxy.log").read_text()
        assert "ejected" in log
    finally:
        meshctl_run("down", "--state-dir", sd)
