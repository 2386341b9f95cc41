"""Two namespaces, each with its own `reviews`, on one registry (a real Consul agent; two
meshes with their own state directories stand in for two teams' hosts): a caller reaching
`reviews` by its short name gets its own namespace's reviews, as a pod does in Kubernetes
(DNS search path) and so in Istio; the other namespace's is `reviews.<ns>`, `reviews.<ns>.svc`
or the FQDN. A rule whose short host is another namespace's service is said, naming both."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pytest

from .helpers import HELLO_APP, http_get, mesh_ports
from .test_multihost_rules import meshctl, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.consul]


def write_mesh(work: Path, mesh_id: str, ns: str, version: str, caller: str, registry: str) -> None:
    hello = f"[python3, {HELLO_APP}]"
    work.mkdir(parents=True, exist_ok=True)
    (work / "mesh.yaml").write_text(
        f"settings: {{portRange: {mesh_ports()[0]}, meshId: {mesh_id}, namespace: {ns}, registry: '{registry}'"
        f"{', outboundTrafficPolicy: REGISTRY_ONLY' if ns == 'bookinfo' else ''}}}\n"
        "services:\n"
        f"- name: reviews\n  port: 9080\n  versions:\n  - {{name: {version}, command: {hello}}}\n"
        f"- name: {caller}\n  port: 9081\n  versions:\n  - {{name: v1, command: {hello}}}\n")


def versions(outbound: int, authority: str, n: int = 6) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        code, body = http_get(outbound, f"http://{authority}/", host=authority)
        out[json.loads(body)["version"] if code == 200 else code] += 1
    return out


def test_a_short_name_reaches_the_callers_own_namespace(consul_agent, tmp_path):
    mesh_id = f"ns-{uuid.uuid4().hex[:8]}"
    # shop's reviews answers "shop-v1", bookinfo's "books-v1"
    meshes = {"shop": (tmp_path / "shop", "shop-v1", "buyer"), "bookinfo": (tmp_path / "bookinfo", "books-v1", "reader")}
    outbound: dict[str, int] = {}
    try:
        # one trust domain for both (docs/multi-host-ca.md): a root, each mesh's intermediate
        meshctl("citadel", "init", "--root-dir", str(tmp_path / "root"), "--mesh-id", mesh_id, cwd=tmp_path)
        for ns, (work, version, caller) in meshes.items():
            write_mesh(work, mesh_id, ns, version, caller, str(consul_agent))
            r = meshctl("citadel", "join", "--registry", str(consul_agent), "--host", f"host-{ns}", "--mesh-id", mesh_id,
                        cwd=work, check=False)
            assert r.returncode == 3, r.stdout + r.stderr
        meshctl("citadel", "approve", "--root-dir", str(tmp_path / "root"), "--registry", str(consul_agent), "--all",
                cwd=tmp_path)
        for ns, (work, version, caller) in meshes.items():
            meshctl("up", "-d", "-f", "mesh.yaml", cwd=work, env={"MESHCTL_HOST_NAME": f"host-{ns}"})
            st = json.loads(meshctl("status", "--json", cwd=work).stdout)
            w = next(w for w in st["workloads"] if w["name"] == f"{caller}-v1-0")
            outbound[ns] = int(w["outbound_address"].rsplit(":", 1)[1])

        def both_known() -> bool:
            try:
                return versions(outbound["shop"], "reviews.bookinfo:9080", 1) == Counter({"books-v1": 1}) and \
                    versions(outbound["bookinfo"], "reviews.shop:9080", 1) == Counter({"shop-v1": 1})
            except (OSError, ValueError):
                return False

        wait_for(both_known, 60, "each namespace's proxies know the other's reviews")
        for ns, other in (("shop", "bookinfo"), ("bookinfo", "shop")):
            own, theirs = meshes[ns][1], meshes[other][1]
            for a in ("reviews:9080", f"reviews.{ns}:9080", f"reviews.{ns}.svc:9080", f"reviews.{ns}.svc.cluster.local:9080"):
                assert versions(outbound[ns], a) == Counter({own: 6}), (ns, a)
            for a in (f"reviews.{other}:9080", f"reviews.{other}.svc:9080", f"reviews.{other}.svc.cluster.local:9080"):
                assert versions(outbound[ns], a) == Counter({theirs: 6}), (ns, a)

        # `inject-fault reviews` on bookinfo's mesh: bookinfo's reviews (the mesh's namespace), for every caller
        bookinfo_dir = meshes["bookinfo"][0]
        meshctl("inject-fault", "reviews", "--abort", "503", "--wait", cwd=bookinfo_dir)
        assert versions(outbound["bookinfo"], "reviews:9080", 3) == Counter({503: 3})
        assert versions(outbound["shop"], "reviews.bookinfo:9080", 3) == Counter({503: 3})
        assert versions(outbound["shop"], "reviews:9080", 3) == Counter({"shop-v1": 3})
        meshctl("inject-fault", "clear", "reviews", "--wait", cwd=bookinfo_dir)
        assert versions(outbound["bookinfo"], "reviews:9080", 3) == Counter({"books-v1": 3})

        # shop's buyer by its short name from bookinfo: no service of bookinfo; the reply says where it is
        code, body = http_get(outbound["bookinfo"], "http://buyer:9081/", host="buyer:9081")
        assert code == 502 and b"other namespaces have buyer.shop" in body, (code, body)
        assert versions(outbound["bookinfo"], "buyer.shop:9081", 2) == Counter({"v1": 2})

        # a rule of a third namespace naming `reviews` short: its own namespace's (none), said naming both
        vs = tmp_path / "vs.yaml"
        vs.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                      "metadata: {name: reviews, namespace: default}\n"
                      "spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n")
        r = meshctl("route", "validate", "-f", str(vs), cwd=meshes["shop"][0], check=False)
        err = " ".join(r.stderr.split())
        assert "vs.yaml:5: spec.hosts[0]: reviews names no known service: a short host is of the rule's " \
               "namespace 'default' (reviews.default.svc.cluster.local)" in err, err
        assert "the mesh has reviews.bookinfo.svc.cluster.local, reviews.shop.svc.cluster.local" in err, err
    finally:
        for work, _, _ in meshes.values():
            meshctl("down", cwd=work, check=False)
