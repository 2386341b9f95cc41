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
