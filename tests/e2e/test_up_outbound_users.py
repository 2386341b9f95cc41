"""Under `meshctl up`, a workload's sidecar sends with that workload's identity only for
the mesh's own user: another local user who points curl at the sidecar's outbound
listener gets 403 naming the uid, until mesh.yaml settings.outboundUsers lists that
user (a running mesh takes the change). The other user is `nobody` through setpriv
(needs root; this machine and CI are)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import HELLO_APP, mesh_ports, meshctl_run

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="a client as another user (setpriv --reuid=nobody) needs root")]

MESH = """\
settings:
  portRange: {ports}
{extra}services:
- name: web
  port: 9080
  healthCheck: {{http: /health}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
"""


def curl_via(outbound: str, *, as_nobody: bool) -> tuple[str, bytes]:
    argv = ["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", "-x", f"http://{outbound}",
            "http://web:9080/hi"]
    if as_nobody:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, timeout=30).stdout
    body, _, code = out.rpartition(b"\n")
    return code.decode(), body


def test_another_local_user_cannot_use_a_sidecar_until_outbound_users_lists_it(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    ports, _ = mesh_ports()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(ports=ports, extra=""))
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
    try:
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        assert st["outbound_user_check"] == {"on": True, "reason": None}
        outbound = next(w for w in st["workloads"] if w["name"] == "web-v1-0")["outbound_address"]
        code, body = curl_via(outbound, as_nobody=False)
        assert code == "200" and json.loads(body)["path"] == "/hi"
        code, body = curl_via(outbound, as_nobody=True)
        assert code == "403" and b"uid 65534 may not use this sidecar's outbound listeners" in body
        log = (tmp_path / ".meshctl" / "logs" / "web-v1-0.proxy.log").read_text()
        assert "listener outbound: refused a connection from uid 65534" in log

        mesh.write_text(MESH.format(ports=ports, extra="  outboundUsers: [nobody]\n"))
        meshctl_run("up", "-f", str(mesh), timeout=90)
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        outbound = next(w for w in st["workloads"] if w["name"] == "web-v1-0")["outbound_address"]
        deadline = time.monotonic() + 30
        while (got := curl_via(outbound, as_nobody=True))[0] != "200" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got[0] == "200" and json.loads(got[1])["path"] == "/hi"
    finally:
        meshctl_run("down", "--state-dir", sd)
