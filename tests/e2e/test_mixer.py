"""`up -d` starts Mixer next to Pilot; `meshctl stat` shows known traffic; sidecars write access logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .helpers import HELLO_APP, http_get, mesh_ports

pytestmark = pytest.mark.e2e

WRAPPER = f"""import os, runpy, sys
sys.argv = [{str(HELLO_APP)!r}, os.environ["PORT"], sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy")}
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:g}s")
        time.sleep(0.3)


@pytest.fixture
def mesh(tmp_path):
    # mesh_ports(): 42000-56999 was inside Linux's ephemeral range, where any client socket can take a planned port
    ports, _ = mesh_ports()
    (tmp_path / "hello.py").write_text(WRAPPER)
    (tmp_path / "mesh.yaml").write_text(
        # REGISTRY_ONLY: the unknown host below is a local 502 NR (ALLOW_ANY would pass it through)
        f"settings: {{portRange: {ports}, outboundTrafficPolicy: REGISTRY_ONLY}}\n"
        "services:\n"
        "- name: web\n"
        "  port: 9080\n"
        "  versions: [{name: v1, command: [python3, hello.py, v1]}]\n"
        "- name: api\n"
        "  port: 9080\n"
        "  versions: [{name: v2, command: [python3, hello.py, v2]}]\n"
    )
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=tmp_path)
    try:
        yield tmp_path
    finally:
        meshctl("down", cwd=tmp_path, check=False)


def test_stat_after_known_traffic_and_access_logs(mesh):
    st = json.loads(meshctl("status", "--json", cwd=mesh).stdout)
    control = json.loads((mesh / ".meshctl" / "control.json").read_text())
    assert control.get("mixer", "").startswith("http://127.0.0.1:")
    web = next(w for w in st["workloads"] if w["name"] == "web-v1-0")
    outbound = int(web["outbound_address"].rsplit(":", 1)[1])
    for i in range(20):
        code, _ = http_get(outbound, f"http://api:9080/item/{i}", host="api:9080")
        assert code == 200
    code, _ = http_get(outbound, "http://nowhere:9080/", host="nowhere:9080")
    assert code == 502

    def api_row():
        data = json.loads(meshctl("stat", "--json", "--window", "5m", cwd=mesh).stdout)
        rows = [r for r in data["rows"] if r["service"] == "api.default.svc.cluster.local" and r["version"] == "v2"]
        return rows[0] if rows and rows[0]["requests"] == 20 else None

    row = wait_for(api_row, what="Mixer sees 20 requests to api v2")
    assert row["success_rate"] == 1.0 and row["errors"] == 0 and row["rps"] > 0
    assert 0 < row["p50"] <= row["p90"] <= row["p99"] < 1000

    # the table form names the service and fits 80 columns
    out = meshctl("stat", "--service", "api", "--window", "5m", cwd=mesh).stdout
    assert all(len(x) <= 80 for x in out.splitlines())
    assert any(x.split()[:2] == ["api", "v2"] for x in out.splitlines())

    # Mixer's mesh-wide /metrics has both reporters
    text = httpx.get(control["mixer"] + "/metrics", trust_env=False, timeout=5).text
    assert 'reporter="source"' in text and 'reporter="destination"' in text and "source_workload=\"web-v1\"" in text

    # each sidecar logs what it saw
    log = mesh / ".meshctl" / "logs" / "web-v1-0.access.log"
    lines = wait_for(lambda: (log.exists() and len(log.read_text().splitlines()) >= 21 and log.read_text().splitlines()),
                     what="21 access log lines")
    recs = [json.loads(x) for x in lines]
    assert sorted(r["response_code"] for r in recs) == [200] * 20 + [502]
    nr = next(r for r in recs if r["response_code"] == 502)
    assert nr["response_flags"] == "NR" and nr["authority"] == "nowhere:9080"
