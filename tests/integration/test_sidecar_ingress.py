"""Sidecar ``ingress`` on meshctl's inbound listeners, through a real proxy, with
Istio's own example (tests/data/istio-sidecar/no-ip-tables.yaml, see its README):
port 9080 of app=productpage forwarded to the app's 127.0.0.1:PORT; an entry for
another port opens one more inbound listener there (captureMode NONE: meshctl
captures nothing); what meshctl does not do is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshctl.loader.codec import LoadError
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy

from proxy_testkit import curl, free_port, running_proxy

EXAMPLE = (Path(__file__).resolve().parents[1] / "data" / "istio-sidecar" / "no-ip-tables.yaml").read_text()
INGRESS_ONLY = EXAMPLE.split("  egress:\n", 1)[0]


def _node(inbound: int, app_port: int, labels: dict) -> Node:
    return Node(
        Workload(name="productpage-v1-0", service="productpage", namespace="prod-us1", labels=FrozenDict(labels)),
        (Listener(name="inbound", direction="inbound", address="127.0.0.1", port=inbound, protocol="http",
                  app_address="127.0.0.1", app_port=app_port, service_port=9080),
         Listener(name="outbound", direction="outbound", address="127.0.0.1", port=free_port())),
    )


def _compile(rules: str, node: Node):
    resources = load_resources_text(rules, "sidecar.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    return compile_proxy(Inputs(resources, {}), node)


def test_istios_example_is_refused_for_its_egress_listener_only():
    with pytest.raises(LoadError) as e:
        load_resources_text(EXAMPLE, "no-ip-tables.yaml")
    msgs = [str(x) for x in getattr(e.value, "errors", [e.value])]
    assert msgs and all("spec.egress[0]" in m and "does not implement" in m for m in msgs), msgs
    assert any(m.startswith("no-ip-tables.yaml:18: spec.egress[0].port") for m in msgs), msgs
    assert not [m for m in validate(load_resources_text(INGRESS_ONLY, "x.yaml")) if m.level == "error"]


async def test_the_ingress_port_of_the_service_forwards_to_the_default_endpoint(upstreams):
    app, wrong = upstreams("app-on-default-endpoint"), upstreams("app-port-from-mesh-yaml")
    inbound = free_port()
    rules = INGRESS_ONLY.replace("127.0.0.1:8080", f"127.0.0.1:{app.port}")
    cfg = _compile(rules, _node(inbound, wrong.port, {"app": "productpage", "version": "v1"}))
    (lst,) = [l for l in cfg.listeners if l.direction == "inbound"]
    assert (lst.port, lst.app_port) == (inbound, app.port)
    async with running_proxy(cfg):
        r = await curl("-s", "-H", "Host: productpage:9080", f"http://127.0.0.1:{inbound}/productpage")
        assert json.loads(r.stdout)["upstream"] == "app-on-default-endpoint"
    assert wrong.requests == []
    # a workload the selector does not pick keeps mesh.yaml's target
    cfg = _compile(rules, _node(inbound, wrong.port, {"app": "reviews"}))
    (lst,) = [l for l in cfg.listeners if l.direction == "inbound"]
    assert lst.app_port == wrong.port


async def test_an_ingress_entry_for_another_port_opens_a_listener_there(upstreams):
    app, admin = upstreams("app"), upstreams("app-admin")
    inbound, extra = free_port(), free_port()
    rules = INGRESS_ONLY.replace("127.0.0.1:8080", f"127.0.0.1:{app.port}") + f"""\
  - port:
      number: {extra}
      protocol: HTTP
      name: admin
    defaultEndpoint: 0.0.0.0:{admin.port}
"""
    cfg = _compile(rules, _node(inbound, app.port, {"app": "productpage"}))
    names = sorted(l.name for l in cfg.listeners if l.direction == "inbound")
    assert names == ["inbound", f"ingress-{extra}"]
    async with running_proxy(cfg) as rt:
        r = await curl("-s", f"http://127.0.0.1:{extra}/admin")
        assert json.loads(r.stdout)["upstream"] == "app-admin"  # 0.0.0.0: the app's own address
        r = await curl("-s", f"http://127.0.0.1:{inbound}/page")
        assert json.loads(r.stdout)["upstream"] == "app"


def test_what_ingress_listeners_do_not_do_is_refused_by_name():
    def errors(extra: str) -> list[str]:
        return [str(f) for f in validate(load_resources_text(INGRESS_ONLY.replace(
            "    captureMode: NONE", extra), "s.yaml")) if f.level == "error"]

    assert any("spec.ingress[0].captureMode: meshctl does not implement captureMode IPTABLES yet" in m
               for m in errors("    captureMode: IPTABLES"))
    uds = INGRESS_ONLY.replace("127.0.0.1:8080", "unix:///var/run/someuds.sock")
    msgs = [str(f) for f in validate(load_resources_text(uds, "s.yaml"))]
    assert any("spec.ingress[0].defaultEndpoint: meshctl does not implement unix domain socket endpoints yet" in m
               for m in msgs), msgs
    assert any("spec.ingress[0].tls: meshctl does not implement tls yet" in m
               for m in errors("    tls: {mode: SIMPLE}"))
    assert any("spec.ingress[0].port.protocol: meshctl does not implement protocol HTTPS yet" in m
               for m in [str(f) for f in validate(load_resources_text(
                   INGRESS_ONLY.replace("protocol: HTTP", "protocol: HTTPS"), "s.yaml"))])
