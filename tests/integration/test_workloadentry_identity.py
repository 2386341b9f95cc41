"""A workload meshctl does not launch (a VM), with or without its own sidecar:
Istio's WorkloadEntry example (tests/data/istio-workloadentry, see its README).
With ``serviceAccount`` the mesh reaches it with mutual TLS and expects that
identity; without, in plaintext. The VM's sidecar is a meshctl proxy with a
certificate of the mesh's CA, as `meshctl proxy run` on the VM would be."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.proxy.identity import SidecarCertificates

from proxy_testkit import config, curl, free_port, running_proxy

EXAMPLE = (Path(__file__).resolve().parents[1] / "data" / "istio-workloadentry" / "details-svc.yaml").read_text()
DETAILS_LEGACY = "spiffe://cluster.local/ns/default/sa/details-legacy"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", datetime.now(timezone.utc) - timedelta(days=1))


def certs(ca, spiffe: str) -> SidecarCertificates:
    h = SidecarCertificates()
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), datetime.now(timezone.utc))
    h.update(leaf + ca.issuer_chain_pem, key_to_pem(key), ca.root_pem)
    return h


def vm_sidecar(app_port: int, mode: str = "STRICT"):
    port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=port, protocol="http",
                       app_address="127.0.0.1", app_port=app_port, mtls_mode=mode)
    cfg = replace(config(listeners=[inbound]),
                  workload=Workload(name="details-vm1", service="details-legacy", labels=FrozenDict(app="details-legacy")))
    return cfg, port


def mesh_client(rules: str):
    resources = load_resources_text(rules, "details-svc.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    lp = free_port()
    node = Node(Workload(name="productpage-v1-0", service="productpage", labels=FrozenDict(app="productpage")),
                (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=lp),))
    cfg = compile_proxy(Inputs(resources, {}), node)
    return cfg, lp


def _rules(target_port: int, with_account: bool = True) -> str:
    text = EXAMPLE.replace("2.2.2.2", "127.0.0.1").replace("targetPort: 8080", f"targetPort: {target_port}")
    return text if with_account else text.replace("  serviceAccount: details-legacy\n", "")


async def test_a_workload_entry_with_a_service_account_is_reached_with_mtls_as_that_identity(upstream, root):
    vcfg, vport = vm_sidecar(upstream.port)
    ccfg, cport = mesh_client(_rules(vport))
    (ep,) = ccfg.clusters["outbound|80||details.bookinfo.com"].endpoints
    assert ep.identity == DETAILS_LEGACY
    async with running_proxy(vcfg) as vm:
        vm.tls = certs(root, DETAILS_LEGACY)
        async with running_proxy(ccfg) as client:
            client.tls = certs(root, PRODUCTPAGE)
            r = await curl("-s", "-x", f"http://127.0.0.1:{cport}", "http://details.bookinfo.com/details/0")
            assert json.loads(r.stdout)["path"] == "/details/0"
        secured = [k for k in vm.telemetry.http if k[-1] == "mutual_tls"]
        assert secured and {k[3] for k in secured} == {PRODUCTPAGE}  # the VM's sidecar saw productpage's identity


async def test_a_vm_answering_with_another_identity_is_refused(upstream, root):
    vcfg, vport = vm_sidecar(upstream.port)
    ccfg, cport = mesh_client(_rules(vport))
    async with running_proxy(vcfg) as vm:
        vm.tls = certs(root, "spiffe://cluster.local/ns/default/sa/someone-else")
        async with running_proxy(ccfg) as client:
            client.tls = certs(root, PRODUCTPAGE)
            r = await curl("-si", "-x", f"http://127.0.0.1:{cport}", "http://details.bookinfo.com/details/0")
            assert r.stdout.startswith(b"HTTP/1.1 503")
    assert upstream.requests == []


async def test_without_a_service_account_the_workload_is_reached_in_plaintext(upstream, root):
    # no sidecar on the VM: the entry points at the app itself, plaintext even from an mTLS-capable sidecar
    ccfg, cport = mesh_client(_rules(upstream.port, with_account=False))
    (ep,) = ccfg.clusters["outbound|80||details.bookinfo.com"].endpoints
    assert ep.identity is None
    async with running_proxy(ccfg) as client:
        client.tls = certs(root, PRODUCTPAGE)
        r = await curl("-s", "-x", f"http://127.0.0.1:{cport}", "http://details.bookinfo.com/plain")
        assert json.loads(r.stdout)["path"] == "/plain"
    # and so a STRICT sidecar on the VM refuses it: the serviceAccount is what asks for mTLS
    vcfg, vport = vm_sidecar(upstream.port)
    ccfg, cport = mesh_client(_rules(vport, with_account=False))
    async with running_proxy(vcfg) as vm:
        vm.tls = certs(root, DETAILS_LEGACY)
        async with running_proxy(ccfg) as client:
            client.tls = certs(root, PRODUCTPAGE)
            r = await curl("-si", "-x", f"http://127.0.0.1:{cport}", "http://details.bookinfo.com/refused")
            assert not r.stdout.startswith(b"HTTP/1.1 200")
    assert [p for _, p, _ in upstream.requests] == ["/plain"]


def test_a_workload_entry_joining_a_mesh_service_carries_its_own_identity():
    from meshctl.pilot.compile import META_SERVICE_PORT
    from meshctl.registry.base import Instance

    rules = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-vm, namespace: legacy}
spec:
  address: 10.0.0.8
  serviceAccount: reviews-vm
  labels: {app: reviews}
"""
    snapshot = {"reviews": (Instance(id="reviews-v1-0", service="reviews", address="127.0.0.1", port=15006,
                                     labels=FrozenDict(app="reviews"),
                                     meta=FrozenDict({META_SERVICE_PORT: "9080", "meshctl.io/sidecar": "true"})),)}
    node = Node(Workload(name="productpage-v1-0", service="productpage"),
                (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=free_port()),))
    resources = load_resources_text(rules.replace("namespace: legacy", "namespace: default"), "we.yaml")
    cfg = compile_proxy(Inputs(resources, snapshot), node)
    eps = {e.address: e.identity for e in cfg.clusters["outbound|9080||reviews.default.svc.cluster.local"].endpoints}
    assert eps == {"127.0.0.1": "spiffe://cluster.local/ns/default/sa/reviews",
                   "10.0.0.8": "spiffe://cluster.local/ns/default/sa/reviews-vm"}
