"""Istio's mirroring and egress tasks under `meshctl up`, end to end, asserting what
Istio's docs say the user sees:

- Mirroring (istio.io/latest/docs/tasks/traffic-management/mirroring/, its rules
  unchanged): with all traffic on httpbin v1, v2's access log stays empty; with the
  mirror rule, v2's log receives each request, Host "httpbin-shadow:8000".
- Egress (istio.io/latest/docs/tasks/traffic-management/egress/egress-control/):
  under ALLOW_ANY, Istio's default, a host outside the mesh is reached; under
  REGISTRY_ONLY it gets 502, until a ServiceEntry names it. The external server
  here is local (no internet in CI) and records what it receives: none of
  meshctl's internal headers.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .helpers import HELLO_APP, http_get, mesh_ports, meshctl_run

MIRRORING = Path(__file__).resolve().parents[1] / "data" / "istio-mirroring"

pytestmark = pytest.mark.e2e

# A small httpbin: /headers echoes the request headers, and each request is logged
# one line a request, as the task's gunicorn --access-logfile does.
HTTPBIN = '''\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "httpbin-" + os.environ["SERVICE_VERSION"] + ".log"), "a")

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"headers": {k: v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        LOG.write(json.dumps({"request": self.command + " " + self.path, "host": self.headers.get("host")}) + "\\n")
        LOG.flush()
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''

MESH = """\
settings: {{portRange: {ports}{policy}}}
services:
- name: httpbin
  port: 8000
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, httpbin_app.py]}}
  - {{name: v2, command: [python3, httpbin_app.py]}}
- name: sleep
  port: 9080
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
"""

# Istio's mirroring task, unchanged: all traffic to v1 ...
ALL_V1 = (MIRRORING / "httpbin-all-v1.yaml").read_text()

# ... then mirrored to v2.
MIRROR = (MIRRORING / "httpbin-mirror-v2.yaml").read_text()

# Istio's egress-control ServiceEntry for httpbin.org, pointed at the local stand-in
# (resolution DNS of a name that resolves here: localhost).
EGRESS_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
spec:
  hosts:
  - localhost
  ports:
  - number: {port}
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
"""


class _External:
    """The 'internet': an HTTP server outside the mesh that records each request's headers."""

    def __init__(self) -> None:
        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append({k.lower(): v for k, v in self.headers.items()})
                body = b"external"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _outbound(tmp: Path) -> int:
    st = json.loads(meshctl_run("status", "--json", "--state-dir", str(tmp / ".meshctl")).stdout)
    w = next(w for w in st["workloads"] if w["name"] == "sleep-v1-0")
    return int(w["outbound_address"].rsplit(":", 1)[1])


def _apply(tmp: Path, name: str, text: str) -> None:
    (tmp / name).write_text(text)
    meshctl_run("route", "apply", "--wait", "-f", str(tmp / name), "--state-dir", str(tmp / ".meshctl"))


def _log(tmp: Path, version: str) -> list[dict]:
    p = tmp / f"httpbin-{version}.log"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _wait(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_mirroring_and_egress_tasks(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    (tmp_path / "httpbin_app.py").write_text(HTTPBIN)
    ports, _ = mesh_ports()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(ports=ports, policy=""))
    sd = str(tmp_path / ".meshctl")
    external = _External()
    meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
    try:
        out = _outbound(tmp_path)
        # -- mirroring: all traffic to v1, v2 sees nothing
        _apply(tmp_path, "all-v1.yaml", ALL_V1)
        code, _ = http_get(out, "http://httpbin:8000/headers", host="httpbin:8000")
        assert code == 200
        _wait(lambda: len(_log(tmp_path, "v1")) == 1, "v1's log line")
        time.sleep(0.5)
        assert _log(tmp_path, "v2") == []
        # the mirror rule: v2's log receives each request
        _apply(tmp_path, "mirror.yaml", MIRROR)
        for i in range(3):
            code, body = http_get(out, f"http://httpbin:8000/headers?i={i}", host="httpbin:8000")
            assert code == 200 and b"httpbin:8000" in body
        v2 = _wait(lambda: len(_log(tmp_path, "v2")) == 3 and _log(tmp_path, "v2"), "3 mirrored requests in v2's log")
        assert sorted(r["request"] for r in v2) == [f"GET /headers?i={i}" for i in range(3)]
        assert {r["host"] for r in v2} == {"httpbin-shadow:8000"}
        assert len(_log(tmp_path, "v1")) == 4
        # beyond Istio: how v2's answers compare with v1's
        diff = json.loads(meshctl_run("mirror", "diff", "httpbin", "--json", "--state-dir", sd).stdout)
        (cluster, stats), = diff["mirrors"].items()
        assert cluster == "outbound|8000|v2|httpbin.default.svc.cluster.local"
        assert (stats["compared"], stats["status_differs"], stats["content_type_differs"], stats["failed"]) == (3, 0, 0, 0)
        # httpbin's /headers echoes the request's Host, which the shadow changes: every body differs
        assert stats["body_differs"] == 3
        assert [e["differs"] for e in diff["examples"]] == [["body"]] * 3
        assert {e["shadow_body_sha256"] != e["primary_body_sha256"] for e in diff["examples"]} == {True}
        table = meshctl_run("mirror", "diff", "httpbin", "-H", "content-type", "-H", "content-length",
                            "--window", "600", "--state-dir", sd).stdout
        assert "httpbin:8000/v2" in table and "COMPARED" in table and "BODY≠" in table
        assert "headers differing (of 3 compared): content-type 0, content-length 3" in table
        assert "/headers?i=2  [body, header content-length]" in table
        # what `mirror diff` reads (paths, query strings, both answers' headers) is the mesh's user's only
        for w in json.loads((tmp_path / ".meshctl" / "status.json").read_text())["workloads"]:
            r = httpx.get(f"http://{w['admin_address']}/mirror", timeout=5, trust_env=False)
            assert r.status_code == 401 and "headers?i=" not in r.text, (w["name"], r.text)

        # -- egress, ALLOW_ANY (the default): the external host is reached, without meshctl's headers
        code, body = http_get(out, f"http://localhost:{external.port}/get", host=f"localhost:{external.port}")
        assert (code, body) == (200, b"external")
        assert not [k for k in external.seen[-1] if k.startswith("x-meshctl-")], external.seen[-1]

        # -- REGISTRY_ONLY: 502 for the unknown host ...
        meshctl_run("down", "--state-dir", sd)
        mesh.write_text(MESH.format(ports=ports, policy=", outboundTrafficPolicy: REGISTRY_ONLY"))
        meshctl_run("up", "-d", "-f", str(mesh), timeout=90)
        out = _outbound(tmp_path)
        _wait(lambda: http_get(out, f"http://localhost:{external.port}/get", host=f"localhost:{external.port}")[0] == 502,
              "502 under REGISTRY_ONLY")
        before = len(external.seen)
        # ... until a ServiceEntry names it
        _apply(tmp_path, "egress-se.yaml", EGRESS_SE.format(port=external.port))
        code, body = http_get(out, f"http://localhost:{external.port}/get", host=f"localhost:{external.port}")
        assert (code, body) == (200, b"external")
        assert len(external.seen) == before + 1
        assert not [k for k in external.seen[-1] if k.startswith("x-meshctl-")], external.seen[-1]
    finally:
        meshctl_run("down", "--state-dir", sd)
        external.close()
