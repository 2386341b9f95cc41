"""An upstream binding to a TCP service under `meshctl up` (issue 18, item 2): bytes
reach a real TCP echo app through the client's sidecar, and the client's sidecar
follows mesh.yaml when the binding is removed, across a restart of the mesh too
(a saved last-good config never outranks a newer mesh.yaml)."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

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
{upstreams}  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
"""


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while len(data) < len(payload) and (chunk := s.recv(65536)):
            data += chunk
    return data


def client_status(tmp: Path) -> dict:
    st = json.loads(meshctl_run("status", "--json", "--state-dir", str(tmp / ".meshctl")).stdout)
    return next(w for w in st["workloads"] if w["name"] == "client-v1-0")


def client_listeners(tmp: Path) -> set[str]:
    admin = int(client_status(tmp)["admin_address"].rsplit(":", 1)[1])
    token = (tmp / ".meshctl" / "auth" / "mesh.token").read_text().strip()  # /config: the mesh credential only
    cfg = httpx.get(f"http://127.0.0.1:{admin}/config", timeout=5, headers={"authorization": f"Bearer {token}"}).json()
    return {lst["name"] for lst in cfg["listeners"]}


def test_a_binding_to_a_tcp_service_carries_bytes_and_follows_mesh_yaml(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    (tmp_path / "tcp_echo.py").write_text(TCP_ECHO)
    ports, spare = mesh_ports()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(ports=ports, upstreams=f"  upstreams: {{tcp-echo: {spare}}}\n"))
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
    try:
        payload = b"hello over a TCP binding\n" * 100
        assert echo(spare, payload) == payload
        assert client_status(tmp_path)["restarts"] == 0
        log = (tmp_path / ".meshctl" / "logs" / "client-v1-0.proxy.log").read_text()
        assert "does not exist" not in log

        # The binding goes from mesh.yaml: the running mesh drops it ...
        mesh.write_text(MESH.format(ports=ports, upstreams=""))
        meshctl_run("up", "-f", str(mesh), timeout=90)
        deadline = time.monotonic() + 20
        while "binding-tcp-echo" in client_listeners(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "binding-tcp-echo" not in client_listeners(tmp_path)
        # ... and so does a restarted mesh, whose sidecars have a last-good config on disk.
        meshctl_run("down", "--state-dir", sd)
        mesh.write_text(MESH.format(ports=ports, upstreams=f"  upstreams: {{tcp-echo: {spare}}}\n"))
        meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
        assert echo(spare, payload) == payload
        meshctl_run("down", "--state-dir", sd)
        mesh.write_text(MESH.format(ports=ports, upstreams=""))
        meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
        assert "binding-tcp-echo" not in client_listeners(tmp_path)
        assert client_status(tmp_path)["state"] == "ready"
    finally:
        meshctl_run("down", "--state-dir", sd)
