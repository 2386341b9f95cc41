"""Pilot's jwksUri resolver against a real local HTTP server: fetched at once,
refreshed, the last good key set kept (and persisted) when the uri goes down
or serves something that is not a JWKS."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import trio

from meshctl.pilot.jwks import JwksResolver

JWKS = (Path(__file__).parents[1] / "data" / "istio-jwt" / "jwks.json").read_text()


class Server:
    def __init__(self) -> None:
        self.body = JWKS.encode()
        self.hits = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                body = outer.body
                if self.path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": outer.base, "jwks_uri": outer.url}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/jwks.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def _until(cond, timeout=5.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def test_fetch_refresh_keep_last_good_and_persist(tmp_path, monkeypatch):
    monkeypatch.setenv("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL", "200ms")
    srv = Server()
    changes = []
    r = JwksResolver(tmp_path, lambda: changes.append(1))
    try:
        async with trio.open_nursery() as n:
            n.start_soon(r.run)
            r.want([(srv.url, 2.0)])
            await _until(lambda: srv.url in r.keys)
            assert r.keys[srv.url] == JWKS and len(changes) == 1
            hits = srv.hits
            await _until(lambda: srv.hits >= hits + 2)  # refreshed
            assert len(changes) == 1  # same keys: no push
            srv.body = b"<html>maintenance</html>"  # not a JWKS: ignored
            await _until(lambda: srv.url in r.errors)
            assert r.keys[srv.url] == JWKS
            srv.stop()
            await trio.sleep(0.5)
            assert r.keys[srv.url] == JWKS and "jwks.json" in r.errors[srv.url]
            n.cancel_scope.cancel()
    finally:
        srv.stop()
    # a restarted Pilot starts from the last good sets
    assert JwksResolver(tmp_path, lambda: None).keys == {srv.url: JWKS}


async def test_openid_discovery_from_the_issuer_when_no_jwks_uri(tmp_path):
    from meshctl.loader.resources import load_resources_text
    from meshctl.pilot.compile import jwks_wanted

    srv = Server()
    text = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: oidc
spec:
  jwtRules:
  - issuer: {srv.base}
"""
    wanted = jwks_wanted(load_resources_text(text))
    assert wanted == [(f"{srv.base}/.well-known/openid-configuration", 5.0)]
    r = JwksResolver(tmp_path, lambda: None)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(r.run)
            r.want(wanted)
            await _until(lambda: wanted[0][0] in r.keys)
            assert r.keys[wanted[0][0]] == JWKS
            n.cancel_scope.cancel()
    finally:
        srv.stop()
