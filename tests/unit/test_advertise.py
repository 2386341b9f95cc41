"""Across hosts: settings.advertise / `up --advertise` (docs/multi-host.md).

The advertised address is where a host's instances are registered and where
their inbound listeners listen; there, inbound is mutual TLS only unless a
PeerAuthentication asks otherwise (on 127.0.0.1 Istio's PERMISSIVE default stays)."""

from dataclasses import replace
from pathlib import Path

import pytest

from meshctl.loader.codec import LoadError
from meshctl.loader.resources import load_resources_text
from meshctl.pilot.compile import Inputs, compile_proxy
from meshctl.supervisor.plan import load_mesh, make_plan, workload_node
from meshctl.supervisor.run import Supervisor, UpError

from tests.unit.test_pilot_compile import PRODUCTPAGE, SNAP

MESH = """settings:
  registry: consul://127.0.0.1:8500
  advertise: {addr}
services:
- name: reviews
  port: 9080
  versions:
  - name: v1
    command: [python3, app.py]
"""


def _mesh(tmp_path: Path, addr: str) -> Path:
    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(addr=addr))
    return f


def test_the_plan_registers_and_listens_on_the_advertised_address(tmp_path):
    spec = load_mesh(_mesh(tmp_path, "10.213.0.2"))
    plan = make_plan(spec, tmp_path, lambda p: True)
    (w,) = plan.workloads
    assert w.address == "10.213.0.2"
    inbound = next(l for l in workload_node(w, spec).listeners if l.direction == "inbound")
    assert (inbound.address, inbound.app_address) == ("10.213.0.2", "127.0.0.1")  # the app stays on loopback
    outbound = next(l for l in workload_node(w, spec).listeners if l.direction == "outbound")
    assert outbound.address == "127.0.0.1"


@pytest.mark.parametrize("bad, why", [("0.0.0.0", "cannot connect"), ("vm2.example", "not an IP address")])
def test_an_address_other_hosts_cannot_reach_is_refused_naming_the_line(tmp_path, bad, why):
    with pytest.raises(LoadError) as e:
        load_mesh(_mesh(tmp_path, bad))
    assert "mesh.yaml:3" in str(e.value) and "settings.advertise" in str(e.value) and why in str(e.value)


def test_the_flag_overrides_mesh_yaml_and_an_address_not_of_this_host_is_refused(tmp_path):
    f = _mesh(tmp_path, "127.0.0.1")
    sup = Supervisor(f, tmp_path / "s", advertise="127.0.0.2")
    assert sup.spec.settings.advertise == "127.0.0.2"
    with pytest.raises(UpError, match="--advertise"):
        Supervisor(f, tmp_path / "s2", advertise="0.0.0.0")
    # 192.0.2.1 (TEST-NET-1) is nobody's address: `up` says so before starting anything
    sup = Supervisor(f, tmp_path / "s3", advertise="192.0.2.1")
    plan = sup.make_plan()
    with pytest.raises(UpError, match="192.0.2.1 .* is not an address of this host"):
        sup.preflight(plan)


def _inbound_mode(address: str, rules: str = "") -> str:
    node = replace(PRODUCTPAGE, listeners=tuple(replace(l, address=address) if l.direction == "inbound" else l
                                                 for l in PRODUCTPAGE.listeners))
    rs = load_resources_text(rules, "pa.yaml") if rules else ()
    cfg = compile_proxy(Inputs(rs, SNAP), node)
    return next(l for l in cfg.listeners if l.direction == "inbound").mtls_mode


def test_inbound_on_a_network_address_is_strict_unless_a_peer_authentication_says_otherwise():
    assert _inbound_mode("127.0.0.1") == "PERMISSIVE"  # Istio's default, on loopback
    assert _inbound_mode("10.213.0.1") == "STRICT"  # nothing plaintext reaches the network by default
    permissive = ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\n"
                  "spec: {mtls: {mode: PERMISSIVE}}\n")
    assert _inbound_mode("10.213.0.1", permissive) == "PERMISSIVE"  # asked for by the user


def test_a_gateway_listens_where_mesh_yaml_says_and_is_registered_there(tmp_path):
    from meshctl.pilot.compile import Inputs, compile_proxy
    from meshctl.supervisor.plan import gateway_node
    from meshctl.supervisor.registration import gateway_instances

    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(addr="10.213.0.1") + "gateways:\n- name: gw\n  ports: {80: 8080}\n  address: 0.0.0.0\n")
    spec = load_mesh(f)
    (g,) = make_plan(spec, tmp_path, lambda p: True).gateways
    rules = ("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
             "spec: {selector: {app: gw}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]}\n")
    cfg = compile_proxy(Inputs(load_resources_text(rules, "gw.yaml"), SNAP), gateway_node(g, spec))
    assert [(l.address, l.port) for l in cfg.listeners if l.direction == "gateway"] == [("0.0.0.0", 8080)]
    assert [i.address for i in gateway_instances(g, "10.213.0.1")] == ["10.213.0.1"]  # all addresses: the advertised one

    f.write_text(MESH.format(addr="10.213.0.1") + "gateways:\n- name: gw\n  ports: {80: 8080}\n  address: everywhere\n")
    with pytest.raises(LoadError, match=r"gateways\[0\]\.address"):
        load_mesh(f)
