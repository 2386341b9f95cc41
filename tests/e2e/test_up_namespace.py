"""settings.namespace under `meshctl up`: the mesh's workloads live in that namespace
(their identities spiffe://<td>/ns/<namespace>/sa/<sa>, its policies apply to them), and
their registrations say so (meshctl.io/namespace), so callers expect the identity the
sidecars hold and Pilot's STRICT registration check reads that namespace's
PeerAuthentication (which a gateway's instances are not under: their Gateway
servers decide their TLS, as in Istio)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from meshctl.credentials import mesh_credential

from .helpers import HELLO_APP, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

MESH = """\
settings: {{portRange: {ports}, namespace: shop}}
services:
- name: server
  port: 9080
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
- name: client
  port: 9081
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
gateways:
- name: istio-egressgateway
  labels: {{istio: egressgateway}}
  ports: {{80: {gw}}}
"""

SHOP_STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
"""


def test_a_mesh_in_its_own_namespace_talks_mtls_under_that_namespaces_strict(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    ports, gw = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(MESH.format(ports=ports, gw=gw))
    (tmp_path / "strict.yaml").write_text(SHOP_STRICT)
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), timeout=90)
    try:
        meshctl_run("route", "apply", "--wait", "-f", str(tmp_path / "strict.yaml"), "--state-dir", sd)
        # registered again under shop's STRICT (the rules stay in the state directory)
        meshctl_run("down", "--state-dir", sd)
        meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), timeout=90)
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        client = next(w for w in st["workloads"] if w["name"] == "client-v1-0")
        server = next(w for w in st["workloads"] if w["name"] == "server-v1-0")
        # through the client's sidecar, mTLS to the server's (whose identity is ns/shop/sa/server)
        r = subprocess.run(["curl", "-s", "-m", "10", "-x", f"http://{client['outbound_address']}",
                            "-w", "\n%{http_code}", "http://server:9080/"], capture_output=True, text=True, timeout=20)
        assert r.stdout.endswith("\n200"), r.stdout
        # shop is STRICT: the server's inbound refuses a plaintext caller
        r = subprocess.run(["curl", "-s", "-m", "10", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://{server['inbound_address']}/"], capture_output=True, text=True, timeout=20)
        assert r.stdout == "000", r.stdout
        log = (tmp_path / ".meshctl" / "logs" / "client-v1-0.proxy.log").read_text()
        assert "is not the expected one" not in log
        # every instance is in the registry: the sidecars' and the gateway's
        pilot = st["control_plane"]["pilot"]
        deadline = time.monotonic() + 15
        while True:
            reg = httpx.get(f"{pilot}/v1/registry", trust_env=False, timeout=10,
                            headers={"authorization": f"Bearer {mesh_credential(Path(sd), create=False)}"}).json()
            ids = {i["id"]: i["meta"] for insts in reg.values() for i in insts}
            if "istio-egressgateway-80" in ids or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ids["server-v1-0"]["meshctl.io/namespace"] == "shop"
        assert ids["istio-egressgateway-80"]["meshctl.io/namespace"] == "shop", reg
        assert "registration failed" not in (tmp_path / ".meshctl" / "logs" / "supervisor.log").read_text()
    finally:
        meshctl_run("down", "--state-dir", sd)


# ---------------------------------------------------------------- services live in the namespace

ROUTED_MESH = """\
settings: {{portRange: {ports}, namespace: shop}}
services:
- name: reviews
  port: 9080
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
  - {{name: v2, command: [python3, hello_app.py]}}
- name: client
  port: 9081
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
"""

SUBSETS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{host}]
  http:
  - {rule}
"""


def test_a_namespace_meshs_services_are_named_in_it_and_its_rules_route_them(tmp_path: Path) -> None:
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    ports, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(ROUTED_MESH.format(ports=ports))
    sd = str(tmp_path / ".meshctl")

    def rule(file: str, text: str) -> Path:
        (tmp_path / file).write_text(text)
        return tmp_path / file

    def versions(n: int = 12) -> list[str]:
        out = []
        for _ in range(n):
            r = subprocess.run(["curl", "-s", "-m", "10", "-x", f"http://{client['outbound_address']}",
                                "-w", "\n%{http_code}", "http://reviews:9080/"], capture_output=True, text=True, timeout=20)
            body, _, code = r.stdout.rpartition("\n")
            out.append(json.loads(body)["version"] if code == "200" else code)
        return out

    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), timeout=90)
    try:
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        client = next(w for w in st["workloads"] if w["name"] == "client-v1-0")
        # the registry service is reviews.shop.svc.cluster.local
        clusters = json.loads(meshctl_run("pilot", "proxy-config", "client-v1-0", "clusters", "-o", "json",
                                          "--state-dir", sd).stdout)
        services = {c["service"] for c in clusters.values()}
        assert "reviews.shop.svc.cluster.local" in services and "reviews.default.svc.cluster.local" not in services
        # a rule of namespace shop with the short host: reviews of shop (Istio's resolution)
        r = meshctl_run("route", "apply", "--wait", "--state-dir", sd, "-f", str(rule("dr.yaml", SUBSETS)),
                        "-f", str(rule("vs.yaml", ROUTE.format(name="reviews", ns="shop", host="reviews",
                                                               rule="route: [{destination: {host: reviews, subset: v2}}]"))))
        assert "names no known service" not in r.stderr, r.stderr
        assert set(versions()) == {"v2"}
        # its FQDN (the same VirtualService replaced)
        fq = ROUTE.format(name="reviews", ns="shop", host="reviews.shop.svc.cluster.local",
                          rule="route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v1}}]")
        r = meshctl_run("route", "apply", "--wait", "--state-dir", sd, "-f", str(rule("vs.yaml", fq)))
        assert "names no known service" not in r.stderr, r.stderr
        assert set(versions()) == {"v1"}
        # the default namespace's name is no service of this mesh: said at validate and apply, and it
        # routes nothing (its 100% abort would answer 503 to every request)
        wrong = ROUTE.format(name="reviews-default", ns="shop", host="reviews.default.svc.cluster.local",
                             rule="{fault: {abort: {httpStatus: 503, percentage: {value: 100}}}, "
                                  "route: [{destination: {host: reviews.default.svc.cluster.local}}]}")
        path = rule("wrong.yaml", wrong)
        for cmd in ("validate", "apply"):
            r = meshctl_run("route", cmd, "--state-dir", sd, "-f", str(path))
            err = " ".join(r.stderr.split())
            assert "wrong.yaml:5: spec.hosts[0]: reviews.default.svc.cluster.local names no known service" in err, err
            assert "the mesh has reviews.shop.svc.cluster.local" in err, err
        meshctl_run("route", "delete", "virtualservice", "reviews", "-n", "shop", "--state-dir", sd)
        time.sleep(2)
        assert set(versions(20)) == {"v1", "v2"}  # the default route over both; no 503
        # `inject-fault` takes the short name of the mesh's service, and clears it by that name
        meshctl_run("inject-fault", "reviews", "--abort", "503", "--wait", "--state-dir", sd)
        assert set(versions(5)) == {"503"}
        meshctl_run("inject-fault", "clear", "reviews", "--wait", "--state-dir", sd)
        assert set(versions(10)) == {"v1", "v2"}
    finally:
        meshctl_run("down", "--state-dir", sd)
