"""Istio's gateway tasks end to end: one mesh (`meshctl up -d`, real processes)
with an httpbin stand-in behind the ingress gateway, Istio's YAML as written in
its docs, and real clients (curl, openssl s_client, raw sockets)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import HELLO_APP, mesh_ports

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
GW_DATA = ROOT / "tests" / "data" / "istio-gateways"


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("meshctl_state_dir", "http_proxy", "https_proxy")}
    env["COLUMNS"] = "250"
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def curl(*args: str) -> tuple[str, str]:
    """(status code, body) of a curl run; code '000' when nothing answered."""
    r = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    return code, body


def apply_text(mesh, text: str, *, check: bool = True) -> subprocess.CompletedProcess:
    path = mesh["dir"] / f"rules-{abs(hash(text))}.yaml"
    path.write_text(text)
    return meshctl("route", "apply", "--wait", "-f", path.name, cwd=mesh["dir"], check=check)


def delete(mesh, kind: str, name: str, namespace: str = "default") -> None:
    meshctl("route", "delete", kind, name, "-n", namespace, cwd=mesh["dir"])
    time.sleep(0.5)


MESH = """\
settings:
  portRange: {port_range}
services:
- name: httpbin
  port: 8000
  versions:
  - name: v1
    command: [{python}, {hello}]
gateways:
- name: istio-ingressgateway
  labels: {{istio: ingressgateway}}
  ports: {{80: {http}}}
  numTrustedProxies: 1
"""

# Istio's docs (tasks/traffic-management/ingress/ingress-control), as written there
HTTPBIN_GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: httpbin-gateway
spec:
  # The selector matches the ingress gateway pod labels.
  # If you installed Istio using Helm following the standard documentation, this would be "istio=ingress"
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "httpbin.example.com"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - httpbin-gateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    - uri:
        prefix: /headers
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("gateways")
    port_range, http = mesh_ports()
    (work / "mesh.yaml").write_text(MESH.format(port_range=port_range, python=sys.executable, hello=HELLO_APP, http=http))
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        m = {"dir": work, "http": http}
        apply_text(m, HTTPBIN_GATEWAY)
        yield m
    finally:
        meshctl("down", cwd=work, check=False)


def http_url(mesh, path: str) -> list[str]:
    return ["-H", "Host: httpbin.example.com", f"http://127.0.0.1:{mesh['http']}{path}"]


# ---------------------------------------------------------------- authorization on the gateway

DENY_HEADERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-headers
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"""

# Istio's docs (tasks/security/authorization/authz-ingress), as written there
INGRESS_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: ALLOW
  rules:
  - from:
    - source:
        remoteIpBlocks: ["1.2.3.4", "5.6.7.0/24"]
"""


def test_authorization_policy_selecting_the_gateway_is_enforced(mesh):
    assert curl(*http_url(mesh, "/headers"))[0] == "200"
    apply_text(mesh, DENY_HEADERS)
    try:
        code, body = curl(*http_url(mesh, "/headers"))
        assert code == "403" and "RBAC: access denied" in body
        assert curl(*http_url(mesh, "/status/200"))[0] == "200"
    finally:
        delete(mesh, "authorizationpolicy", "deny-headers")
    assert curl(*http_url(mesh, "/headers"))[0] == "200"


def test_remote_ip_blocks_use_x_forwarded_for_behind_num_trusted_proxies(mesh):
    apply_text(mesh, INGRESS_POLICY)
    try:
        # one trusted proxy (mesh.yaml numTrustedProxies: 1): the client is the last x-forwarded-for address
        assert curl("-H", "X-Forwarded-For: 5.6.7.8", *http_url(mesh, "/status/200"))[0] == "200"
        assert curl("-H", "X-Forwarded-For: 5.6.7.8, 1.2.3.4", *http_url(mesh, "/status/200"))[0] == "200"
        assert curl("-H", "X-Forwarded-For: 1.2.3.4, 9.9.9.9", *http_url(mesh, "/status/200"))[0] == "403"
        assert curl(*http_url(mesh, "/status/200"))[0] == "403"  # no header: the peer, 127.0.0.1
    finally:
        delete(mesh, "authorizationpolicy", "ingress-policy", "istio-system")
    assert curl(*http_url(mesh, "/status/200"))[0] == "200"
