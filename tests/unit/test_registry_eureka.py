"""How EurekaRegistry encodes instances, reads Eureka documents and applies deltas."""

from __future__ import annotations

from meshctl.model.base import FrozenDict
from meshctl.registry.base import Instance
from meshctl.registry.eureka import (
    apply_delta,
    decode_instance,
    instance_document,
    reconcile_hash,
    snapshot_from_documents,
)


def doc(iid: str, status: str = "UP", vip: str = "reviews", action: str | None = None, **metadata: str) -> dict:
    d = {
        "instanceId": iid,
        "app": vip.upper(),
        "hostName": "host",
        "ipAddr": "10.0.0.1",
        "vipAddress": vip,
        "status": status,
        "port": {"$": 9080, "@enabled": "true"},
        "metadata": metadata,
    }
    if action:
        d["actionType"] = action
    return d


def test_document_shape():
    inst = Instance(
        id="reviews-v2-0",
        service="reviews",
        address="127.0.0.1",
        port=15001,
        labels=FrozenDict({"version": "v2", "topology.io/zone": "a"}),
    )
    body = instance_document(inst, renewal_interval=5, lease_duration=15)["instance"]
    assert body["app"] == "REVIEWS" and body["vipAddress"] == "reviews"
    assert body["instanceId"] == "reviews-v2-0" and body["status"] == "UP"
    assert body["port"] == {"$": 15001, "@enabled": "true"}
    assert body["dataCenterInfo"]["name"] == "MyOwn"
    assert body["leaseInfo"] == {"renewalIntervalInSecs": 5, "durationInSecs": 15}
    # XML-safe label keys go in plainly; all labels round-trip exactly
    assert body["metadata"]["version"] == "v2" and "topology.io/zone" not in body["metadata"]
    assert decode_instance(body).labels == inst.labels


def test_decode_foreign_instance():
    got = decode_instance(
        doc("localhost:catalog:8080", vip="Catalog-Service", **{"version": "v1", "@class": "java.util.Collections$EmptyMap"})
    )
    assert got.service == "catalog-service"
    assert got.labels == {"version": "v1"}
    assert (got.address, got.port) == ("10.0.0.1", 9080)


def test_snapshot_keeps_only_up_instances():
    snap = snapshot_from_documents(
        [doc("b", "UP"), doc("a", "UP"), doc("c", "DOWN"), doc("d", "OUT_OF_SERVICE"), doc("e", "STARTING")]
    )
    assert [i.id for i in snap["reviews"]] == ["a", "b"]


def test_reconcile_hash_matches_eurekas_format():
    assert reconcile_hash([]) == ""
    assert reconcile_hash([doc("a"), doc("b"), doc("c", "DOWN")]) == "DOWN_1_UP_2_"


def test_delta_adds_modifies_and_deletes():
    local = {"a": doc("a"), "b": doc("b")}
    delta = {
        "apps__hashcode": "OUT_OF_SERVICE_1_UP_1_",
        "application": [
            {"name": "REVIEWS", "instance": [doc("b", action="DELETED"), doc("c", action="ADDED"), doc("a", "OUT_OF_SERVICE", action="MODIFIED")]}
        ],
    }
    merged = apply_delta(local, delta)
    assert merged is not None
    assert sorted(merged) == ["a", "c"] and merged["a"]["status"] == "OUT_OF_SERVICE"
    assert local.keys() == {"a", "b"}  # the caller's copy is untouched


def test_delta_with_a_mismatching_hash_asks_for_a_full_fetch():
    local = {"a": doc("a")}
    # the server knows two UP instances; the delta only mentions one we already have
    delta = {"apps__hashcode": "UP_2_", "application": [{"name": "REVIEWS", "instance": doc("a", action="MODIFIED")}]}
    assert apply_delta(local, delta) is None
