"""Locality load balancing (core/locality.py): priority levels, failover, distribute.

Named after the rule each test proves. The localities of Istio's locality
tasks (istio.io/latest/docs/tasks/traffic-management/locality-load-balancing/):
the caller in region1/zone1, helloworld in region1/zone1, region1/zone2,
region2/zone3 and region3/zone4.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from meshctl.core.locality import (
    choose,
    explain,
    lb_priority,
    locality_problem,
    parse_locality,
    pattern_matches,
    plan_locality,
    priority_loads,
    setting_problems,
)
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import validate
from meshctl.model.base import FrozenDict
from meshctl.model.istio import LocalityDistribute, LocalityFailover, LocalityLoadBalancerSetting as LLB
from meshctl.model.proxyconfig import Endpoint

CALLER = "region1/zone1"
LABELS = FrozenDict({"app": "curl"})


def ep(n: int, locality: str, **labels: str) -> Endpoint:
    return Endpoint(address="127.0.0.1", port=20000 + n, instance=f"hello-{n}", locality=locality, labels=FrozenDict(labels))


R1Z1, R1Z2, R2Z3, R3Z4 = ep(1, "region1/zone1"), ep(2, "region1/zone2"), ep(3, "region2/zone3"), ep(4, "region3/zone4")
ALL = (R1Z1, R1Z2, R2Z3, R3Z4)


def levels(plan) -> list[list[str]]:
    return [[g.locality for g in level] for level in plan.levels]


def shares(plan, eligible, n=20000, seed=1) -> Counter:
    rand = random.Random(seed)
    out: Counter = Counter()
    for _ in range(n):
        eps = choose(plan, eligible, rand)
        out[eps[0].locality if eps else None] += 1
    return out


# ---------------------------------------------------------------- localities and patterns


def test_a_locality_is_region_zone_subzone_with_trailing_parts_optional():
    assert str(parse_locality("us-east/zone-a/rack1")) == "us-east/zone-a/rack1"
    assert parse_locality("us-east").zone == ""
    assert locality_problem("us-east/zone-a") is None
    assert locality_problem("") is None
    assert "three parts" in (locality_problem("a/b/c/d") or "")
    assert "empty part" in (locality_problem("a//c") or "")
    assert "wildcards" in (locality_problem("a/*") or "")


def test_patterns_match_as_istio_wildcards_and_missing_parts_match_any():
    loc = parse_locality("region1/zone1/sub1")
    assert pattern_matches(loc, "region1/zone1/*")
    assert pattern_matches(loc, "region1/*")
    assert pattern_matches(loc, "region1")
    assert pattern_matches(loc, "*")
    assert not pattern_matches(loc, "region1/zone2/*")
    assert not pattern_matches(loc, "region2/*")


def test_lb_priority_counts_what_the_caller_and_endpoint_share():
    c = parse_locality("r/z/s")
    assert [lb_priority(c, parse_locality(x)) for x in ("r/z/s", "r/z/t", "r/y/s", "q/z/s")] == [0, 1, 2, 3]


# ---------------------------------------------------------------- rule 1: off


def test_without_outlier_detection_failover_is_off_as_in_istio():
    plan = plan_locality(LLB(failover=(LocalityFailover("region1", "region2"),)), False, CALLER, LABELS, ALL)
    assert plan.mode == "off" and not plan.active
    assert "outlierDetection" in plan.reason


def test_enabled_false_turns_it_off_even_with_outlier_detection():
    assert plan_locality(LLB(enabled=False), True, CALLER, LABELS, ALL).mode == "off"


def test_outlier_detection_alone_turns_on_locality_failover_by_default():
    plan = plan_locality(None, True, CALLER, LABELS, ALL)
    assert plan.mode == "failover"
    assert levels(plan) == [["region1/zone1"], ["region1/zone2"], ["region2/zone3", "region3/zone4"]]


def test_endpoints_and_caller_without_localities_are_one_pool():
    eps = (ep(1, ""), ep(2, ""))
    plan = plan_locality(None, True, "", LABELS, eps)
    assert not plan.active


# ---------------------------------------------------------------- rule 2: levels


def test_istios_failover_task_priorities_with_failover_region1_to_region2():
    # The task's table: 0 region1.zone1, (1 none), 2 region1.zone2, 3 region2.zone3, 4 region3.zone4;
    # empty levels are dropped, so four levels remain in that order.
    plan = plan_locality(LLB(enabled=True, failover=(LocalityFailover("region1", "region2"),)), True, CALLER, LABELS, ALL)
    assert levels(plan) == [["region1/zone1"], ["region1/zone2"], ["region2/zone3"], ["region3/zone4"]]


def test_failover_applies_only_to_callers_of_its_from_region():
    plan = plan_locality(LLB(failover=(LocalityFailover("region9", "region3"),)), True, CALLER, LABELS, ALL)
    assert levels(plan)[-1] == ["region2/zone3", "region3/zone4"]


def test_failover_priority_orders_by_labels_in_turn():
    eps = (ep(1, "", network="n1", cluster="c1"), ep(2, "", network="n1", cluster="c2"), ep(3, "", network="n2", cluster="c1"))
    caller = FrozenDict({"network": "n1", "cluster": "c1"})
    plan = plan_locality(LLB(failover_priority=("network", "cluster")), True, "", caller, eps)
    assert [[e.instance for g in level for e in g.endpoints] for level in plan.levels] == [["hello-1"], ["hello-2"], ["hello-3"]]


def test_failover_priority_reads_topology_labels_from_localities_and_label_equals_value():
    plan = plan_locality(LLB(failover_priority=("topology.kubernetes.io/region",)), True, CALLER, LABELS, ALL)
    assert levels(plan) == [["region1/zone1", "region1/zone2"], ["region2/zone3", "region3/zone4"]]
    plan = plan_locality(LLB(failover_priority=("topology.kubernetes.io/region=region2",)), True, CALLER, LABELS, ALL)
    assert levels(plan) == [["region2/zone3"], ["region1/zone1", "region1/zone2", "region3/zone4"]]


def test_failover_priority_with_failover_is_five_times_the_label_level_plus_the_locality_level():
    eps = (ep(1, "region1/zone1", tier="a"), ep(2, "region2/zone3", tier="a"), ep(3, "region3/zone4", tier="a"),
           ep(4, "region1/zone1", tier="b"))
    caller = FrozenDict({"tier": "a"})
    plan = plan_locality(LLB(failover_priority=("tier",), failover=(LocalityFailover("region1", "region3"),)), True,
                         CALLER, caller, eps)
    assert [[e.instance for g in level for e in g.endpoints] for level in plan.levels] == [
        ["hello-1"], ["hello-3"], ["hello-2"], ["hello-4"]]


# ---------------------------------------------------------------- rule 3: priority load


def test_priority_load_is_envoys_with_overprovisioning_1_4():
    assert priority_loads([100.0, 100.0]) == [100.0, 0.0]
    assert priority_loads([70.0, 100.0]) == pytest.approx([70.0, 30.0])
    assert priority_loads([0.0, 100.0, 100.0]) == [0.0, 100.0, 0.0]
    assert priority_loads([0.0, 50.0]) == [0.0, 100.0]  # normalized: what is healthy takes it all
    assert priority_loads([0.0, 0.0]) == [0.0, 0.0]


def test_a_healthy_local_level_takes_every_request():
    plan = plan_locality(LLB(failover=(LocalityFailover("region1", "region2"),)), True, CALLER, LABELS, ALL)
    assert shares(plan, ALL, n=2000) == Counter({"region1/zone1": 2000})


def test_failed_levels_fail_over_to_the_next_in_priority_order():
    plan = plan_locality(LLB(failover=(LocalityFailover("region1", "region2"),)), True, CALLER, LABELS, ALL)
    assert shares(plan, (R1Z2, R2Z3, R3Z4), n=1000) == Counter({"region1/zone2": 1000})
    assert shares(plan, (R2Z3, R3Z4), n=1000) == Counter({"region2/zone3": 1000})  # failover region before region3
    assert shares(plan, (R3Z4,), n=1000) == Counter({"region3/zone4": 1000})
    assert choose(plan, (), random.Random(1)) == []


def test_a_partly_failed_level_spills_its_unhealthy_share_to_the_next():
    local = tuple(ep(10 + i, "region1/zone1") for i in range(4))
    remote = tuple(ep(20 + i, "region1/zone2") for i in range(4))
    plan = plan_locality(None, True, CALLER, LABELS, local + remote)
    # 2 of 4 eligible: health 70 %: 70 % stays, 30 % spills over
    got = shares(plan, local[:2] + remote)
    assert 0.68 < got["region1/zone1"] / 20000 < 0.72
    # 3 of 4 eligible: 105 % → 100: nothing spills
    assert shares(plan, local[:3] + remote)["region1/zone2"] == 0


# ---------------------------------------------------------------- rule 4: distribute


DISTRIBUTE = LLB(enabled=True, distribute=(LocalityDistribute(
    "region1/zone1/*", FrozenDict({"region1/zone1/*": 70, "region1/zone2/*": 20, "region3/zone4/*": 10})),))


def test_istios_distribute_task_splits_70_20_0_10():
    plan = plan_locality(DISTRIBUTE, True, CALLER, LABELS, ALL)
    got = shares(plan, ALL)
    assert set(got) == {"region1/zone1", "region1/zone2", "region3/zone4"}  # region2/zone3 gets nothing
    assert 0.68 < got["region1/zone1"] / 20000 < 0.72
    assert 0.18 < got["region1/zone2"] / 20000 < 0.22
    assert 0.08 < got["region3/zone4"] / 20000 < 0.12


def test_distribute_works_without_outlier_detection_as_in_istio():
    assert plan_locality(DISTRIBUTE, False, CALLER, LABELS, ALL).mode == "distribute"


def test_distribute_applies_only_to_callers_its_from_matches():
    plan = plan_locality(DISTRIBUTE, True, "region2/zone3", LABELS, ALL)
    assert plan.mode == "off" and "region2/zone3" in plan.reason


def test_a_wildcard_share_is_split_by_endpoint_weight_and_rounded_up():
    eps = (ep(1, "region1/zone1"), ep(2, "region1/zone2"), ep(3, "region1/zone2"), ep(4, "region2/zone3"))
    d = LLB(distribute=(LocalityDistribute("region1/*", FrozenDict({"region1/*": 50, "region2/*": 50})),))
    plan = plan_locality(d, False, CALLER, LABELS, eps)
    assert {g.locality: g.share for g in plan.levels[0]} == {"region1/zone1": 17, "region1/zone2": 34, "region2/zone3": 50}


def test_an_unavailable_locality_hands_its_share_to_the_others():
    plan = plan_locality(DISTRIBUTE, True, CALLER, LABELS, ALL)
    got = shares(plan, (R1Z2, R3Z4))
    assert set(got) == {"region1/zone2", "region3/zone4"}
    assert 0.64 < got["region1/zone2"] / 20000 < 0.69  # 20 : 10


def test_explain_names_the_levels_and_their_loads():
    plan = plan_locality(LLB(failover=(LocalityFailover("region1", "region2"),)), True, CALLER, LABELS, ALL)
    lines = explain(plan, (R1Z2, R2Z3, R3Z4))
    assert lines[0].startswith("locality: caller region1/zone1: failover by locality; failover region1→region2")
    assert "  priority 0: region1/zone1, 0/1 endpoint eligible" in lines
    assert "  → priority 1 takes 100% of requests" in lines


# ---------------------------------------------------------------- validation, as Istio's


def test_istio_refusals_of_bad_settings():
    msgs = dict(setting_problems(LLB(
        distribute=(LocalityDistribute("region1/*/zone", FrozenDict({"a/*": 60, "b/*": 30})),),
        failover=(LocalityFailover("r1", "r1"),))))
    assert "only one of distribute" in msgs["distribute"]
    assert "'*' may only be" in msgs["distribute[0].from"]
    assert msgs["distribute[0].to"] == "total locality weight 90 != 100"
    assert "different regions" in msgs["failover[0]"]
    msgs = dict(setting_problems(LLB(failover=(LocalityFailover("r1", "r2"),),
                                     failover_priority=("topology.kubernetes.io/region",))))
    assert "failoverPriority[0]" in msgs


# Istio's "Locality failover" task's DestinationRule (tests/data/istio-locality/README)
ISTIO_FAILOVER_DR = (Path(__file__).parents[1] / "data" / "istio-locality" / "helloworld-failover.yaml").read_text()


def test_istios_failover_task_rule_validates_and_without_outlier_detection_is_refused():
    assert [str(f) for f in validate(load_resources_text(ISTIO_FAILOVER_DR, "dr.yaml"))] == []
    cut = ISTIO_FAILOVER_DR.split("    outlierDetection:")[0]
    findings = validate(load_resources_text(cut, "dr.yaml"))
    assert [f.level for f in findings] == ["error"]
    assert "localityLbSetting: failover has no effect without outlierDetection" in str(findings[0])
    only_enabled = cut.split("        failover:")[0]  # enabled: true alone is failover too
    assert [f.level for f in validate(load_resources_text(only_enabled, "dr.yaml"))] == ["error"]


def test_a_bad_distribute_is_an_error_naming_file_line_and_field():
    text = ISTIO_FAILOVER_DR.replace("""        failover:
          - from: region1
            to: region2
""", """        distribute:
          - from: region1/zone1/*
            to:
              "region1/zone1/*": 70
""")
    findings = [str(f) for f in validate(load_resources_text(text, "dr.yaml"))]
    assert any(f.startswith("dr.yaml:") and "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: "
               "total locality weight 70 != 100" in f for f in findings), findings


def test_workload_and_service_entry_localities_are_checked():
    text = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm}
spec: {address: 10.0.0.1, labels: {app: hello}, locality: "a//b"}
"""
    findings = [str(f) for f in validate(load_resources_text(text, "we.yaml"))]
    assert any("spec.locality" in f and "empty part" in f for f in findings), findings


# ---------------------------------------------------------------- where localities come from


def _node(locality: str):
    from meshctl.model.proxyconfig import Listener, Workload
    from meshctl.pilot.compile import Node

    return Node(workload=Workload(name="curl-v1-0", service="curl", labels=LABELS, locality=locality),
                listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=1),))


def test_registry_metadata_workload_entries_and_service_entry_endpoints_carry_localities():
    from meshctl.pilot.compile import META_LOCALITY, Inputs, compile_proxy
    from meshctl.registry.base import Instance

    snap = {"hello": (
        Instance("hello-v1-0", "hello", "127.0.0.1", 21001, FrozenDict({"app": "hello"}),
                 meta=FrozenDict({META_LOCALITY: "region1/zone1"})),
    )}
    text = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1}
spec: {address: 10.0.0.7, labels: {app: hello}, locality: region2/zone3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [mydb.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, locality: us-east1}
  - {address: 10.1.0.2, locality: us-west}
"""
    cfg = compile_proxy(Inputs(load_resources_text(text, "r.yaml"), snap), _node("region1/zone1"))
    assert cfg.workload.locality == "region1/zone1"
    hello = next(c for c in cfg.clusters.values() if c.service.startswith("hello.") and c.subset is None)
    assert {e.instance: e.locality for e in hello.endpoints} == {"hello-v1-0": "region1/zone1", "vm-1": "region2/zone3"}
    db = next(c for c in cfg.clusters.values() if c.service == "mydb.com")
    assert sorted(e.locality for e in db.endpoints) == ["us-east1", "us-west"]


def test_the_proxy_balances_within_the_chosen_locality_and_fails_over():
    from meshctl.model.istio import LoadBalancerSettings, OutlierDetection, TrafficPolicy
    from meshctl.model.proxyconfig import Cluster, Workload
    from meshctl.proxy.snapshot import ClusterState
    from meshctl.proxy.stats import Stats
    from meshctl.core.outlier import OutlierDetector

    tp = TrafficPolicy(load_balancer=LoadBalancerSettings(locality_lb_setting=LLB(failover=(LocalityFailover("region1", "region2"),))),
                       outlier_detection=OutlierDetection(consecutive_5xx_errors=1))
    cluster = Cluster(name="outbound|80||hello", service="hello", port=80, traffic_policy=tp, endpoints=ALL)
    od = OutlierDetector(tp.outlier_detection, [(e.address, e.port) for e in ALL])
    cs = ClusterState(cluster, Stats().cluster(cluster.name), od, None, Workload(name="c", service="curl", locality=CALLER))
    assert cs.shaped
    rand = random.Random(3)
    assert {cs.balancer.pick(cs.candidates(0.0, rand), _ctx(), rand).locality for _ in range(50)} == {"region1/zone1"}
    od.record((R1Z1.address, R1Z1.port), status=503, now=1.0)  # ejected
    od.record((R1Z2.address, R1Z2.port), status=503, now=1.0)  # not ejected: maxEjectionPercent 10 % allows one
    assert {cs.balancer.pick(cs.candidates(2.0, rand), _ctx(), rand).locality for _ in range(50)} == {"region1/zone2"}


def _ctx():
    from meshctl.core.balance import PickContext

    return PickContext()


def test_mesh_yaml_gives_localities_per_host_and_per_version(tmp_path):
    from meshctl.loader.codec import LoadError
    from meshctl.supervisor.plan import load_mesh, make_plan, workload_node

    (tmp_path / "mesh.yaml").write_text("""
settings: {locality: region1/zone1, portRange: 30000-30099}
services:
- name: hello
  port: 9080
  versions:
  - {name: v1, address: "127.0.0.1:9999"}
  - {name: v2, address: "127.0.0.1:9998", locality: region2/zone3}
""")
    spec = load_mesh(tmp_path / "mesh.yaml")
    plan = make_plan(spec, tmp_path, lambda p: True)
    assert {w.name: w.locality for w in plan.workloads} == {"hello-v1-0": "region1/zone1", "hello-v2-0": "region2/zone3"}
    assert workload_node(plan.workloads[1], spec).workload.locality == "region2/zone3"
    (tmp_path / "mesh.yaml").write_text("settings: {locality: 'a/*'}\nservices: []\n")
    with pytest.raises(LoadError) as e:
        load_mesh(tmp_path / "mesh.yaml")
    assert "settings.locality" in str(e.value) and "wildcards" in str(e.value)


# ---------------------------------------------------------------- rule 6: retryRemoteLocalities


def test_retry_priorities_leave_tried_levels_out_from_every_second_try_as_envoys_previous_priorities():
    from meshctl.core.locality import RetryPriorities

    plan = plan_locality(LLB(failover=(LocalityFailover("region1", "region2"),)), True, CALLER, LABELS, ALL)
    rp = RetryPriorities()
    rand = random.Random(5)
    first = choose(plan, ALL, rand, rp.before_pick())
    assert first == [R1Z1]
    rp.tried(plan.level_of(first[0]))
    second = choose(plan, ALL, rand, rp.before_pick())  # one try so far: no update yet
    assert second == [R1Z1]
    rp.tried(plan.level_of(second[0]))
    assert rp.before_pick() == frozenset({0})  # two tries: level 0 is left out
    assert choose(plan, ALL, rand, frozenset({0})) == [R1Z2]
    assert choose(plan, ALL, rand, frozenset({0, 1})) == [R2Z3]
    # only the left-out levels have eligible endpoints: the plain loads
    assert choose(plan, (R1Z1,), rand, frozenset({0})) == [R1Z1]


def test_retry_remote_localities_is_carried_into_the_routes_retry_policy():
    from meshctl.core.retrypolicy import retry_policy
    from meshctl.model.istio import HTTPRetry
    from meshctl.model.proxyconfig import Settings

    assert retry_policy(HTTPRetry(attempts=2, retry_remote_localities=True), Settings()).retry_remote_localities
    assert not retry_policy(HTTPRetry(attempts=2), Settings()).retry_remote_localities
    assert not retry_policy(None, Settings()).retry_remote_localities


# ---------------------------------------------------------------- the proxy's request path (memory network)

LOCAL, REMOTE = ("10.0.1.1", 9080), ("10.0.2.1", 9080)  # region1/zone1 (nothing serves it: refused), region2/zone3


def _proxy_config(retry_remote: bool | None):
    from meshctl.model.base import Duration
    from meshctl.model.istio import (Destination, HTTPRetry, HTTPRoute, HTTPRouteDestination, LoadBalancerSettings,
                                     OutlierDetection, PortSelector, TrafficPolicy)
    from meshctl.model.proxyconfig import (Cluster, Listener, ProxyConfig, RouteTable, Settings, VirtualHost, Workload,
                                           cluster_name)

    host = "helloworld.default.svc.cluster.local"
    name = cluster_name(host, 5000)
    tp = TrafficPolicy(load_balancer=LoadBalancerSettings(locality_lb_setting=LLB(failover=(LocalityFailover("region1", "region2"),))),
                       outlier_detection=OutlierDetection(consecutive_5xx_errors=100, consecutive_gateway_errors=100))
    cl = Cluster(name=name, service=host, port=5000, traffic_policy=tp, endpoints=(
        Endpoint(address=LOCAL[0], port=LOCAL[1], locality="region1/zone1"),
        Endpoint(address=REMOTE[0], port=REMOTE[1], locality="region2/zone3")))
    retries = HTTPRetry(attempts=3, retry_on="connect-failure", retry_remote_localities=retry_remote)
    route = HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=host, port=PortSelector(number=5000))),),
                      retries=retries)
    vh = VirtualHost(name=f"{host}:5000", domains=("helloworld:5000",), routes=(route,))
    return ProxyConfig(
        version="v1", workload=Workload(name="curl-0", service="curl", locality="region1/zone1"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001, route_table="outbound"),),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(vh,))),
        clusters=FrozenDict({name: cl}), settings=Settings(connect_timeout=Duration(1.0)))


async def _one_request(cfg) -> tuple[int, list]:
    from functools import partial

    import trio

    from meshctl.proxy.runtime import ProxyRuntime
    from meshctl.proxy.testing import MemoryBackend

    async def app(stream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")

    backend = MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        backend.serve(*REMOTE, app, nursery)
        await nursery.start(partial(rt.run, cfg, handle_signals=False))
        stream = await backend.connect("127.0.0.1", 15001)
        await stream.send_all(b"GET http://helloworld:5000/hello HTTP/1.1\r\nhost: helloworld:5000\r\nconnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        await stream.aclose()
        rt.drain()
    return int(data.split(b" ", 2)[1]), [c for c in backend.connects if c in (LOCAL, REMOTE)]


async def test_retry_remote_localities_sends_the_third_try_to_the_next_locality(autojump_clock):
    status, connects = await _one_request(_proxy_config(True))
    assert status == 200
    assert connects == [LOCAL, LOCAL, REMOTE]  # level 0 left out from the third try (update frequency 2)


async def test_without_retry_remote_localities_retries_stay_in_the_local_locality(autojump_clock):
    status, connects = await _one_request(_proxy_config(None))
    assert status == 503
    assert connects == [LOCAL] * 4
