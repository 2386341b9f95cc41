"""loader.proxyconfig: ProxyConfig files, their consistency checks, and the docs example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from meshctl.loader.codec import LoadError, from_data
from meshctl.loader.proxyconfig import check_proxy_config, dump_proxy_config, load_proxy_config, load_proxy_config_text
from meshctl.model.proxyconfig import ProxyConfig, cluster_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "proxy-demo" / "proxy.yaml"
DOC = ROOT / "docs" / "proxyconfig.md"


def test_example_loads_with_what_the_docs_promise():
    cfg = load_proxy_config(EXAMPLE)
    inbound, outbound, binding = cfg.listeners
    assert (inbound.direction, inbound.port, inbound.app_address, inbound.app_port) == ("inbound", 15006, "127.0.0.1", 9080)
    assert (outbound.direction, outbound.port, outbound.route_table) == ("outbound", 15001, "outbound")
    assert (binding.direction, binding.protocol, binding.service_port) == ("binding", "tcp", 27017)
    (vhost,) = cfg.route_tables["outbound"].virtual_hosts
    assert "reviews:9080" in vhost.domains
    split = [(d.destination.subset, d.weight) for d in vhost.routes[0].route]
    assert split == [("v1", 50), ("v2", 50)]
    for d in vhost.routes[0].route:
        assert cluster_name(d.destination.host, d.destination.port.number, d.destination.subset) in cfg.clusters
    # names were taken from the keys
    assert cfg.route_tables["outbound"].name == "outbound"
    assert all(c.name == key for key, c in cfg.clusters.items())
    assert cfg.settings.connect_timeout == 1.0
    assert cfg.clusters["outbound|9080|v2|reviews.default.svc.cluster.local"].traffic_policy.outlier_detection.base_ejection_time == 30.0


def test_docs_contain_the_example_verbatim():
    doc = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert EXAMPLE.read_text() in blocks


def test_round_trip_through_json_file(tmp_path):
    cfg = load_proxy_config(EXAMPLE)
    data = dump_proxy_config(cfg)
    assert from_data(ProxyConfig, data, path="") == cfg
    out = tmp_path / "proxy.json"
    out.write_text(json.dumps(data, indent=2))
    assert load_proxy_config(out) == cfg


def test_check_proxy_config_on_a_built_config_is_clean():
    assert check_proxy_config(load_proxy_config(EXAMPLE)) == []


TEXT = EXAMPLE.read_text()


def variant(old: str, new: str, count: int = 1) -> str:
    assert old in TEXT, old
    return TEXT.replace(old, new, count)


BAD = [
    (
        "direction typo",
        variant("  direction: outbound\n", "  direction: outbund\n"),
        ["p.yaml:21: listeners[1].direction: unknown value 'outbund' (did you mean outbound?)"],
    ),
    (
        "route table that does not exist",
        variant("  routeTable: outbound\n", "  routeTable: outbond\n"),
        ["p.yaml:24: listeners[1].routeTable: route table 'outbond' is not defined in routeTables (defined: outbound)"],
    ),
    (
        "route to a cluster that does not exist",
        variant("            subset: v2\n", "            subset: v3\n"),
        [
            "p.yaml:49: routeTables.outbound.virtualHosts[0].routes[0].route[1].destination: cluster "
            "'outbound|9080|v3|reviews.default.svc.cluster.local' is not defined in clusters "
            "(did you mean 'outbound|9080|v2|reviews.default.svc.cluster.local'?)"
        ],
    ),
    (
        "destination without a port",
        variant("            subset: v1\n            port: {number: 9080}\n", "            subset: v1\n"),
        [
            "p.yaml:44: routeTables.outbound.virtualHosts[0].routes[0].route[0].destination: destination "
            "'reviews.default.svc.cluster.local' needs port.number (clusters are per port)"
        ],
    ),
    (
        "inbound listener without appPort",
        variant("  appPort: 9080\n", ""),
        ["p.yaml:13: listeners[0].appPort: an inbound listener needs appPort"],
    ),
    (
        "listener protocol and mtls mode",
        variant("  mtlsMode: DISABLE\n", "  mtlsMode: permissive\n  protocol: udp\n"),
        [
            "p.yaml:20: listeners[0].protocol: unknown value 'udp' (expected one of: http, tcp)",
            "p.yaml:19: listeners[0].mtlsMode: unknown value 'permissive' (did you mean PERMISSIVE?)",
        ],
    ),
    (
        "tcp binding whose service has no cluster",
        variant("  servicePort: 27017\n", "  servicePort: 27019\n"),
        ["p.yaml:30: listeners[2].service: cluster 'outbound|27019||mongodb.default.svc.cluster.local' for this tcp binding is not defined in clusters"],
    ),
    (
        "unknown listener field",
        variant("  appAddress: 127.0.0.1\n", "  appAdress: 127.0.0.1\n"),
        ["p.yaml:17: listeners[0].appAdress: unknown field (did you mean appAddress?)"],
    ),
    (
        "missing required listener field",
        variant("  address: 127.0.0.1\n  port: 15001\n", "  port: 15001\n"),
        ["p.yaml:20: listeners[1].address: required field missing"],
    ),
    (
        "cluster key and name disagree",
        variant("    service: mongodb.default.svc.cluster.local\n    port: 27017\n",
                "    name: mongodb\n    service: mongodb.default.svc.cluster.local\n    port: 27017\n"),
        ['p.yaml:79: clusters["outbound|27017||mongodb.default.svc.cluster.local"].name: name \'mongodb\' differs from its key \'outbound|27017||mongodb.default.svc.cluster.local\''],
    ),
]


@pytest.mark.parametrize("name, text, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_proxy_config(name, text, expected):
    with pytest.raises(LoadError) as info:
        load_proxy_config_text(text, "p.yaml")
    assert str(info.value).splitlines() == expected


def test_two_documents_are_refused():
    with pytest.raises(LoadError) as info:
        load_proxy_config_text(TEXT + "---\n" + TEXT, "p.yaml")
    assert str(info.value) == "p.yaml:94: expected one ProxyConfig document, found 2"


def test_missing_file(tmp_path):
    with pytest.raises(LoadError) as info:
        load_proxy_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
