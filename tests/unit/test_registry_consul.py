"""How ConsulRegistry encodes instances for Consul and reads them back."""

from __future__ import annotations

import json

from meshctl.model.base import FrozenDict
from meshctl.registry.base import Instance
from meshctl.registry.consul import decode_health_entry, registration_payload


def test_payload_carries_labels_as_tags_and_valid_meta_keys():
    inst = Instance(
        id="reviews-v2-0",
        service="reviews",
        address="127.0.0.1",
        port=15001,
        labels=FrozenDict({"app": "reviews", "version": "v2", "topology.kubernetes.io/zone": "z1"}),
        meta=FrozenDict({"meshctl.io/workload": "reviews-v2"}),
    )
    body = registration_payload(inst, ttl=10)
    assert body["ID"] == "reviews-v2-0" and body["Name"] == "reviews"
    assert (body["Address"], body["Port"]) == ("127.0.0.1", 15001)
    assert "version=v2" in body["Tags"] and "meshctl" in body["Tags"]
    assert "topology.kubernetes.io/zone=z1" in body["Tags"]
    # Consul only accepts [A-Za-z0-9_-] meta keys: the zone label lives in the tags only
    assert body["Meta"]["version"] == "v2" and body["Meta"]["app"] == "reviews"
    assert "topology.kubernetes.io/zone" not in body["Meta"]
    assert json.loads(body["Meta"]["meshctl-meta"]) == {"meshctl.io/workload": "reviews-v2"}
    (check,) = body["Checks"]
    assert check["TTL"] == "10000ms" and check["Status"] == "passing"
    assert check["CheckID"] == "meshctl:reviews-v2-0"


def test_http_check_payload():
    inst = Instance(id="web-0", service="web", address="127.0.0.1", port=8080)
    (check,) = registration_payload(
        inst, ttl=10, http_check_url="http://127.0.0.1:8080/healthz", http_check_interval=2,
        deregister_critical_after="1m",
    )["Checks"]  # fmt: skip
    assert check["HTTP"] == "http://127.0.0.1:8080/healthz"
    assert check["Interval"] == "2000ms"
    assert check["DeregisterCriticalServiceAfter"] == "1m"
    assert "TTL" not in check


def test_round_trip_through_a_health_entry():
    inst = Instance(
        id="ratings-v1-0",
        service="ratings",
        address="10.1.2.3",
        port=9090,
        labels=FrozenDict({"version": "v1", "a.b/c": "d"}),
        meta=FrozenDict({"k": "v"}),
    )
    body = registration_payload(inst, ttl=5)
    entry = {
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Service": {k: body[k] for k in ("Tags", "Meta", "Address", "Port")} | {"ID": body["ID"], "Service": body["Name"]},
        "Checks": [],
    }
    got = decode_health_entry(entry)
    assert (got.id, got.service, got.address, got.port) == ("ratings-v1-0", "ratings", "10.1.2.3", 9090)
    assert got.labels == inst.labels
    assert got.meta["k"] == "v" and got.meta["meshctl.io/consul-node"] == "n1"


def test_foreign_service_uses_meta_and_key_value_tags_and_node_address():
    entry = {
        "Node": {"Node": "vm-7", "Address": "192.0.2.7"},
        "Service": {
            "ID": "redis-1",
            "Service": "redis",
            "Tags": ["primary", "role=cache"],
            "Meta": {"version": "7"},
            "Address": "",
            "Port": 6379,
        },
    }
    got = decode_health_entry(entry)
    assert got.address == "192.0.2.7"  # no service address: the node's
    assert got.labels == {"version": "7", "role": "cache"}
