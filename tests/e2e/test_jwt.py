"""End-user authentication on Bookinfo, end to end through the ingress gateway:
Istio's "authorization with JWT" task shapes (RequestAuthentication + requestPrincipals,
then a claim condition), with Istio's own samples (tests/data/istio-jwt: jwks.json,
demo.jwt, groups-scope.jwt, unchanged) and tokens signed with a key made here.

The Istio issuer's keys come from a jwksUri served by a local HTTP server that Pilot
fetches; the server is then stopped and the keys Pilot has keep working."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from .helpers import bookinfo_workdir, free_port
from .test_istio_tasks import meshctl

pytestmark = pytest.mark.e2e

SAMPLES = Path(__file__).parents[1] / "data" / "istio-jwt"
ISTIO_ISS = "testing@secure.istio.io"
DEMO = (SAMPLES / "demo.jwt").read_text().strip()
GROUPS = (SAMPLES / "groups-scope.jwt").read_text().strip()
MY_ISS = "https://issuer.meshctl.test"
MY_KEY = ec.generate_private_key(ec.SECP256R1())


def my_token(**claims) -> str:
    body = {"iss": MY_ISS, "sub": "alice", "exp": int(time.time()) + 600, **claims}
    return pyjwt.encode(body, MY_KEY, algorithm="ES256", headers={"kid": "meshctl-test"})


class JwksServer:
    """Serves Istio's jwks.json, unchanged, until stopped."""

    def __init__(self) -> None:
        body = (SAMPLES / "jwks.json").read_bytes()
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/security/tools/jwt/samples/jwks.json"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jwks_server():
    s = JwksServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, jwks_server):
    work = tmp_path_factory.mktemp("jwt")
    gw_port = bookinfo_workdir(work)
    import os

    os.environ["PILOT_JWT_PUB_KEY_REFRESH_INTERVAL"] = "1s"  # Istio's variable: refresh often, so the test sees it
    try:
        meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    finally:
        del os.environ["PILOT_JWT_PUB_KEY_REFRESH_INTERVAL"]
    try:
        m = {"dir": work, "gw": f"http://127.0.0.1:{gw_port}"}
        apply(m, "rules/bookinfo-gateway.yaml", "rules/destination-rule-all.yaml", "rules/virtual-service-all-v1.yaml")
        yield m
    finally:
        meshctl("down", cwd=work, check=False)


def apply(mesh, *files: str, text: str | None = None) -> None:
    args: list[str] = []
    for f in files:
        args += ["-f", f]
    if text is not None:
        path = mesh["dir"] / f"rule-{abs(hash(text))}.yaml"
        path.write_text(text)
        args += ["-f", path.name]
    meshctl("route", "apply", "--wait", *args, cwd=mesh["dir"])


def delete(mesh, kind: str, name: str, ns: str = "default") -> None:
    meshctl("route", "delete", kind, name, "-n", ns, cwd=mesh["dir"])


def get(mesh, token: str | None = None, path: str = "/productpage", header: str = "Authorization",
        prefix: str = "Bearer ") -> tuple[int, str]:
    extra = ["-H", f"{header}: {prefix}{token}"] if token is not None else []
    r = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "20", "-o", "-", "-w", "\n%{http_code}", *extra,
                        mesh["gw"] + path], capture_output=True, text=True, timeout=25)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def request_authentication(jwks_uri: str) -> str:
    my_jwks = json.dumps({"keys": [{**ECAlgorithm.to_jwk(MY_KEY.public_key(), as_dict=True), "kid": "meshctl-test"}]})
    return f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
spec:
  selector:
    matchLabels:
      app: productpage
  jwtRules:
  - issuer: "{ISTIO_ISS}"
    jwksUri: "{jwks_uri}"
  - issuer: "{MY_ISS}"
    jwks: '{my_jwks}'
    fromHeaders:
    - name: x-jwt-assertion
"""


REQUIRE_JWT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
       requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
"""

REQUIRE_GROUP1 = REQUIRE_JWT + """\
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"""


def tamper(token: str) -> str:
    h, p, s = token.split(".")
    claims = json.loads(pyjwt.utils.base64url_decode(p))
    claims["sub"] = "admin@secure.istio.io"
    return ".".join((h, pyjwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), s))


def test_request_authentication_then_jwt_authorization(mesh, jwks_server):
    apply(mesh, text=request_authentication(jwks_server.url))
    deadline = time.monotonic() + 15  # Pilot fetches the jwksUri, then pushes the keys
    while (got := get(mesh, DEMO))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert got[0] == 200, got
    assert jwks_server.hits >= 1

    # RequestAuthentication alone: no token passes, bad tokens get 401 with Envoy's bodies
    assert get(mesh)[0] == 200
    assert get(mesh, tamper(DEMO)) == (401, "Jwt verification fails")
    assert get(mesh, my_token(exp=int(time.time()) - 3600), header="x-jwt-assertion", prefix="") == (401, "Jwt is expired")
    assert get(mesh, my_token(iss="https://someone.else")) == (401, "Jwt issuer is not configured")
    assert get(mesh, my_token(), header="x-jwt-assertion", prefix="")[0] == 200
    # a token of the second issuer in the first one's location is not that issuer's
    assert get(mesh, my_token()) == (401, "Jwt issuer is not configured")

    # Istio's require-jwt: only testing@secure.istio.io/testing@secure.istio.io gets in
    apply(mesh, text=REQUIRE_JWT)
    code, body = get(mesh)
    assert code == 403 and "RBAC: access denied" in body
    assert get(mesh, DEMO)[0] == 200
    assert get(mesh, my_token(), header="x-jwt-assertion", prefix="")[0] == 403  # valid, but another principal
    assert get(mesh, tamper(DEMO))[0] == 401

    # ...and then only with groups: [group1] (groups-scope.jwt has it, demo.jwt not)
    apply(mesh, text=REQUIRE_GROUP1)
    assert get(mesh, GROUPS)[0] == 200
    assert get(mesh, DEMO)[0] == 403
    assert get(mesh)[0] == 403

    # the jwksUri goes away: Pilot keeps the last good key set (refreshing every 1s here)
    hits = jwks_server.hits
    time.sleep(1.5)
    assert jwks_server.hits > hits, "Pilot did not refresh the jwksUri"
    jwks_server.stop()
    time.sleep(3)  # several failed refreshes
    assert get(mesh, GROUPS)[0] == 200
    assert get(mesh, tamper(GROUPS))[0] == 401
    # a config push for another reason keeps the keys too
    apply(mesh, text=REQUIRE_JWT)
    assert get(mesh, DEMO)[0] == 200
    log = (mesh["dir"] / ".meshctl" / "logs").glob("pilot*")
    assert any("keeping the last good key set" in p.read_text() for p in log)

    delete(mesh, "authorizationpolicy", "require-jwt")
    delete(mesh, "requestauthentication", "jwt-example")
    assert get(mesh, tamper(DEMO))[0] == 200  # no RequestAuthentication: the header is not looked at


INGRESS_JWT = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: ingress-jwt
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  jwtRules:
  - issuer: "{ISTIO_ISS}"
    jwks: '{(SAMPLES / "jwks.json").read_text()}'
"""

# Istio's "JWT claim based routing" task, on Bookinfo's gateway VirtualService
CLAIM_ROUTING = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
      headers:
        "@request.auth.claims.groups":
          exact: group1
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"""

INGRESS_REQUIRE_JWT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-require-jwt
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"""


def test_jwt_at_the_ingress_gateway_and_claim_based_routing(mesh):
    apply(mesh, text=INGRESS_JWT + "---\n" + CLAIM_ROUTING)
    assert get(mesh, GROUPS)[0] == 200  # groups: [group1, group2]
    assert get(mesh, DEMO)[0] == 404  # valid, but no group1 claim: no route
    assert get(mesh)[0] == 404
    assert get(mesh, tamper(GROUPS)) == (401, "Jwt verification fails")  # answered by the gateway

    # Istio's ingress "require a token": DENY notRequestPrincipals ["*"] on the gateway
    apply(mesh, "rules/bookinfo-gateway.yaml", text=INGRESS_REQUIRE_JWT)
    assert get(mesh)[0] == 403
    assert get(mesh, DEMO)[0] == 200
    delete(mesh, "authorizationpolicy", "ingress-require-jwt", "istio-system")
    delete(mesh, "requestauthentication", "ingress-jwt", "istio-system")
    assert get(mesh)[0] == 200
