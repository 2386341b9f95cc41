"""RequestAuthentication in a sidecar's inbound pipeline, HTTP/1.1 and HTTP/2 (h2c prior
knowledge), with curl and Istio's sample token (tests/data/istio-jwt, unchanged)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from meshctl.loader.resources import load_resources_text
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener

from proxy_testkit import config, curl, free_port, running_proxy

SAMPLES = Path(__file__).parents[1] / "data" / "istio-jwt"
DEMO = (SAMPLES / "demo.jwt").read_text().strip()

RULES = f"""\
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata:
  name: jwt
spec:
  jwtRules:
  - issuer: testing@secure.istio.io
    jwks: '{(SAMPLES / "jwks.json").read_text()}'
    outputClaimToHeaders:
    - header: x-jwt-foo
      claim: foo
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
spec:
  rules:
  - from:
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
"""


async def test_jwt_on_the_inbound_path_over_http1_and_http2(upstream):
    ra, ap = load_resources_text(RULES)
    lp = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=lp,
                       app_address="127.0.0.1", app_port=upstream.port)
    cfg = replace(config(listeners=[inbound]), authorization=(ap.spec,),
                  request_authentication=FrozenDict({"default/jwt": ra.spec}))
    url = f"http://127.0.0.1:{lp}/headers"
    async with running_proxy(cfg):
        for proto in ("--http1.1", "--http2-prior-knowledge"):
            r = await curl(proto, "-s", "-w", "\n%{http_code} %{http_version}", "-H", f"Authorization: Bearer {DEMO}", url)
            body, _, status = r.stdout.rpartition(b"\n")
            assert status.split()[0] == b"200", (proto, r.stdout)
            assert status.split()[1] == (b"2" if "http2" in proto else b"1.1")
            hdrs = dict(json.loads(body)["headers"])
            assert hdrs["x-jwt-foo"] == "bar" and "authorization" not in hdrs  # claim out, token removed
            r = await curl(proto, "-s", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {DEMO[:-3]}xyz", url)
            assert r.stdout == b"Jwt verification fails\n401", (proto, r.stdout)
            r = await curl(proto, "-si", "-H", f"Authorization: Bearer {DEMO[:-3]}xyz", url + "?a=1")
            assert f'www-authenticate: Bearer realm="http://127.0.0.1:{lp}/headers", error="invalid_token"'.encode() \
                in r.stdout.lower().replace(b"bearer", b"Bearer"), r.stdout
            r = await curl(proto, "-s", "-o", "/dev/null", "-w", "%{http_code}", url)
            assert r.stdout == b"403", proto  # no token: the policy requires a principal


async def test_local_replies_to_grpc_are_grpc_statuses_as_envoy_sends_them(upstream):
    """A sidecar's own denials and failures, to a gRPC request: HTTP 200 trailers-only
    with grpc-status (UNAUTHENTICATED 16 for a bad token, PERMISSION_DENIED 7 for
    RBAC, UNAVAILABLE 14 for no upstream) and the reason in grpc-message, seen by
    grpcurl (its exit code is 64 + the status) and, over HTTP/1.1, by curl."""
    import subprocess

    import trio

    from proxy_testkit import cluster, outbound_listener, route_to, vhost

    tools = Path(__file__).resolve().parents[2] / "scripts" / "tools" / "grpcurl.sh"
    built = subprocess.run([str(tools)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    grpcurl = built.stdout.strip().splitlines()[-1]

    async def call(port: int, *extra: str) -> tuple[int, str]:
        r = await trio.run_process(
            [grpcurl, "-plaintext", "-authority", "echo:9090", "-import-path", str(Path(__file__).parent),
             "-proto", "echo.proto", *extra, "-d", '{"text": "x"}', f"127.0.0.1:{port}", "mesh.Echo/Greet"],
            capture_stdout=True, capture_stderr=True, check=False)
        return r.returncode, r.stderr.decode()

    ra, ap = load_resources_text(RULES)
    lp = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=lp,
                       app_address="127.0.0.1", app_port=upstream.port)
    cfg = replace(config(listeners=[inbound]), authorization=(ap.spec,),
                  request_authentication=FrozenDict({"default/jwt": ra.spec}))
    async with running_proxy(cfg):
        code, err = await call(lp, "-H", f"Authorization: Bearer {DEMO[:-3]}xyz")
        assert code == 64 + 16 and "Code: Unauthenticated" in err and "Message: Jwt verification fails" in err, err
        code, err = await call(lp)
        assert code == 64 + 7 and "Code: PermissionDenied" in err and "Message: RBAC: access denied" in err, err
        r = await curl("--http1.1", "-si", "-H", "content-type: application/grpc", "--data-binary", "@/dev/null",
                       f"http://127.0.0.1:{lp}/mesh.Echo/Greet")
        head = r.stdout.lower()
        assert head.startswith(b"http/1.1 200") and b"grpc-status: 7\r\n" in head, r.stdout
        assert b"grpc-message: rbac: access denied\r\n" in head
    assert upstream.requests == []  # denied in the sidecar, the app saw nothing

    op = free_port()
    cfg = config(listeners=[outbound_listener(op)], vhosts=[vhost("echo", 9090, (route_to("echo", 9090),))],
                 clusters=[cluster("echo", 9090, [("127.0.0.1", free_port())], protocol="grpc")])
    async with running_proxy(cfg):
        code, err = await call(op)
        assert code == 64 + 14 and "Code: Unavailable" in err and "upstream connect" in err, err
