"""Fault-injected aborts count under the service they were routed to, in `stat` and
`top`, not under a service called "unknown" (issue 18, item 5)."""

from __future__ import annotations

import json
import time
import shutil
from pathlib import Path

import pytest

from .helpers import HELLO_APP, http_get, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

ABORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api]
  http:
  - fault:
      abort: {httpStatus: 503, percentage: {value: 100}}
    route:
    - destination: {host: api}
"""


def test_aborted_requests_count_under_their_destination_service(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    ports, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(f"""
settings: {{portRange: {ports}}}
services:
- name: web
  port: 9080
  healthCheck: {{tcp: true}}
  versions: [{{name: v1, command: [python3, hello_app.py]}}]
- name: api
  port: 9080
  healthCheck: {{tcp: true}}
  versions: [{{name: v1, command: [python3, hello_app.py]}}]
""")
    (tmp_path / "abort.yaml").write_text(ABORT)
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), timeout=90)
    try:
        meshctl_run("route", "apply", "--wait", "-f", str(tmp_path / "abort.yaml"), "--state-dir", sd)
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        web = next(w for w in st["workloads"] if w["name"] == "web-v1-0")
        outbound = int(web["outbound_address"].rsplit(":", 1)[1])
        codes = [http_get(outbound, "http://api:9080/")[0] for _ in range(10)]
        assert codes == [503] * 10
        # Mixer scrapes the sidecars every second: the 10 requests show after its next scrape.
        deadline = time.monotonic() + 15
        while True:
            rows = json.loads(meshctl_run("stat", "--window", "1m", "--json", "--state-dir", sd).stdout)["rows"]
            counted = sum(r["requests"] for r in rows if r["service"] == "api.default.svc.cluster.local")
            if counted >= 10 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not [r for r in rows if r["service"] == "unknown" and r["requests"]], rows
        api = [r for r in rows if r["service"] == "api.default.svc.cluster.local"]
        assert sum(r["requests"] for r in api) == 10 and sum(r["errors"] for r in api) == 10, rows
    finally:
        meshctl_run("down", "--state-dir", sd)
