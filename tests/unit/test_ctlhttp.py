"""proxy/ctlhttp.py: the sidecar's client for Pilot, Mixer, collectors and external
authorizers runs on the sidecar's runtime, trio or evloop (proxy/aio.py), against a real
HTTP server on loopback; concurrent calls through a ClientPool do not share a connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.tools.certs import self_signed

CLIENT = r"""
import json, sys
import meshctl.proxy.aio as aio
from meshctl.plainhttp import HTTPError
from meshctl.proxy.ctlhttp import ClientPool, control_client

base = sys.argv[1]

async def main():
    out = {"loop": aio.LOOP}
    pool = ClientPool(timeout=5.0, headers={"authorization": "Bearer s3cret"})
    got = {}

    async def ask(i):
        r = await pool.request("POST", f"{base}/v1/quota", json={"n": i})
        got[i] = (r.status_code, r.json())

    async with aio.open_nursery() as n:
        for i in range(4):
            n.start_soon(ask, i)
    out["asks"] = [got[i] for i in range(4)]
    r = await pool.request("GET", f"{base}/check?x=1", headers=[("host", "orig.example"), ("x-user", "a")],
                           content=b"")
    out["raw"] = [r.status_code, r.header_list, r.content.decode()]
    async with control_client(timeout=0.5) as c:
        try:
            await c.get(f"{base}/slow")
            out["slow"] = "answered"
        except HTTPError as exc:
            out["slow"] = str(exc)
    await pool.aclose()
    print(json.dumps(out))

aio.run(main)
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list = []

    def log_message(self, *a):  # quiet
        pass

    def _answer(self, status, body: bytes, extra=()):
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(("POST", self.path, self.headers["authorization"], self.client_address[1]))
        self._answer(200, json.dumps({"granted": json.loads(body)["n"]}).encode(),
                     [("content-type", "application/json")])

    def do_GET(self):
        if self.path == "/slow":
            threading.Event().wait(2.0)
            try:
                return self._answer(200, b"late")
            except BrokenPipeError:  # the client gave up at its timeout, as it should
                return None
        self.seen.append(("GET", self.path, self.headers["host"], self.headers["x-user"],
                          self.headers.get("accept"), self.headers["content-length"]))
        self._answer(403, b"denied", [("set-cookie", "a=1"), ("set-cookie", "b=2")])


@pytest.fixture
def server():
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("loop", ["trio", "evloop"])
def test_control_client_on_each_runtime(server, loop):
    env = dict(os.environ, MESHCTL_PROXY_LOOP=loop)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    r = subprocess.run([sys.executable, "-c", CLIENT, base], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["loop"] == loop
    assert out["asks"] == [[200, {"granted": i}] for i in range(4)]
    status, header_list, body = out["raw"]
    assert (status, body) == (403, "denied")
    assert [h for h in header_list if h[0] == "set-cookie"] == [["set-cookie", "a=1"], ["set-cookie", "b=2"]]
    assert "no answer within 0.5s" in out["slow"]
    posts = [s for s in _Handler.seen if s[0] == "POST"]
    assert sorted(s[1:3] for s in posts) == [("/v1/quota", "Bearer s3cret")] * 4
    assert len({s[3] for s in posts}) >= 2  # concurrent asks went over connections of their own
    # a raw request carries the caller's host and headers as given, no accept of its own
    assert ("GET", "/check?x=1", "orig.example", "a", None, "0") in _Handler.seen


HTTPS_CLIENT = r"""
import sys
import meshctl.proxy.aio as aio
from meshctl.plainhttp import HTTPError
from meshctl.proxy.ctlhttp import control_client

async def main():
    async with control_client(timeout=5.0) as c:
        try:
            r = await c.post(sys.argv[1], content=b'{"n": 7}', headers=[("content-type", "application/json")])
            print("answered", r.status_code, r.json())
        except HTTPError as exc:
            print("error", exc)

aio.run(main)
"""


@pytest.mark.parametrize("loop", ["trio", "evloop"])
def test_https_is_tls_verified_against_the_trusted_cas(server, tmp_path, loop):
    """An https:// collector gets TLS, verified: trusted (SSL_CERT_FILE) it answers; untrusted, the
    call fails naming the certificate (never plaintext, never unverified)."""
    import ssl

    cpath, kpath = self_signed(tmp_path, "collector", ip="127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cpath, kpath)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_address[1]}/v1/quota"
    env = dict(os.environ, MESHCTL_PROXY_LOOP=loop)
    env.pop("SSL_CERT_FILE", None)
    untrusted = subprocess.run([sys.executable, "-c", HTTPS_CLIENT, url], capture_output=True, text=True,
                               timeout=60, env=env)
    assert untrusted.stdout.startswith("error") and "TLS handshake failed: self-signed certificate" in untrusted.stdout
    env["SSL_CERT_FILE"] = str(cpath)
    trusted = subprocess.run([sys.executable, "-c", HTTPS_CLIENT, url], capture_output=True, text=True,
                             timeout=60, env=env)
    assert trusted.stdout.strip() == "answered 200 {'granted': 7}", trusted
