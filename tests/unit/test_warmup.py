"""Slow start (core/warmup.py): warmupDurationSecs and warmup, as Envoy's slow start mode."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshctl.core.balance import PickContext, make_balancer
from meshctl.core.warmup import SlowStart, WarmupConfig, warmup_config, weight_factor
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import validate
from meshctl.model.base import Duration
from meshctl.model.istio import LoadBalancerSettings, WarmupConfiguration
from meshctl.model.proxyconfig import Endpoint

OLD = Endpoint(address="127.0.0.1", port=1, instance="old")
NEW = Endpoint(address="127.0.0.1", port=2, instance="new")


def test_the_weight_ramps_linearly_over_the_window_from_the_minimum_percent():
    cfg = WarmupConfig(duration=100.0)
    assert weight_factor(cfg, 0.0) == pytest.approx(0.1)  # max(10 %, 1s/100s)
    assert weight_factor(cfg, 5.0) == pytest.approx(0.1)
    assert weight_factor(cfg, 50.0) == pytest.approx(0.5)
    assert weight_factor(cfg, 99.0) == pytest.approx(0.99)
    assert weight_factor(cfg, 100.0) == 1.0


def test_aggression_bends_the_ramp_and_minimum_percent_raises_its_floor():
    assert weight_factor(WarmupConfig(100.0, aggression=2.0), 25.0) == pytest.approx(0.5)  # 0.25 ** (1/2)
    assert weight_factor(WarmupConfig(100.0, minimum_percent=40.0), 25.0) == pytest.approx(0.4)


def test_warmup_wins_over_warmup_duration_secs_and_absent_means_none():
    assert warmup_config(None) is None
    assert warmup_config(LoadBalancerSettings(simple="ROUND_ROBIN")) is None
    assert warmup_config(LoadBalancerSettings(warmup_duration_secs=Duration(60.0))) == WarmupConfig(60.0)
    lb = LoadBalancerSettings(warmup_duration_secs=Duration(60.0),
                              warmup=WarmupConfiguration(duration=Duration(30.0), minimum_percent=5.0, aggression=1.5))
    assert warmup_config(lb) == WarmupConfig(30.0, 5.0, 1.5)


def _picks(ss: SlowStart, now: float, n: int = 2000, policy: str = "ROUND_ROBIN") -> Counter:
    bal = make_balancer(LoadBalancerSettings(simple=policy))
    rand = random.Random(7)
    got: Counter = Counter()
    for _ in range(n):
        ep = bal.pick(ss.weigh([OLD, NEW], now), PickContext(), rand)
        assert ep is not None
        got[ep.instance] += 1
    return got


def test_an_endpoint_that_joins_later_gets_a_growing_share():
    ss = SlowStart(WarmupConfig(duration=60.0))
    ss.observe([OLD], now=0.0)
    ss.observe([OLD, NEW], now=100.0)  # NEW joins at 100 s; OLD is long warm
    at_start = _picks(ss, 100.0)
    assert 0.07 < at_start["new"] / 2000 < 0.11  # 10 : 100
    half = _picks(ss, 130.0)
    assert 0.30 < half["new"] / 2000 < 0.37  # 50 : 100
    done = _picks(ss, 160.0)
    assert 0.47 < done["new"] / 2000 < 0.53


def test_least_request_weighs_a_warming_endpoints_in_flight_requests_up():
    ss = SlowStart(WarmupConfig(duration=60.0))
    ss.observe([OLD], now=0.0)
    ss.observe([OLD, NEW], now=100.0)
    bal = make_balancer(LoadBalancerSettings(simple="LEAST_REQUEST"))
    busy_old = PickContext(active={("127.0.0.1", 1): 4})
    rand = random.Random(1)
    # warm, the idle NEW wins over OLD with 4 in flight; warming (10 %), 1 in flight counts as 10
    assert bal.pick(ss.weigh([OLD, NEW], 200.0), busy_old, rand) is not None
    assert {bal.pick(ss.weigh([OLD, NEW], 200.0), busy_old, rand).instance for _ in range(20)} == {"new"}
    assert {bal.pick(ss.weigh([OLD, NEW], 100.0), busy_old, rand).instance for _ in range(20)} == {"old"}


def test_endpoints_that_joined_together_share_alike():
    ss = SlowStart(WarmupConfig(duration=60.0))
    ss.observe([OLD, NEW], now=0.0)
    eps = [OLD, NEW]
    assert ss.weigh(eps, 10.0) is eps


def test_an_endpoint_that_leaves_and_comes_back_warms_up_again():
    ss = SlowStart(WarmupConfig(duration=60.0))
    ss.observe([OLD, NEW], now=0.0)
    ss.observe([OLD], now=100.0)
    ss.observe([OLD, NEW], now=200.0)
    assert ss.factor(NEW, 200.0) == pytest.approx(0.1)
    assert ss.factor(OLD, 200.0) == 1.0


DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  trafficPolicy:
    loadBalancer:
      simple: %s
      warmupDurationSecs: 60s
"""


def test_warmup_is_accepted_with_round_robin_and_least_request_and_refused_by_name_otherwise():
    for policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
        assert [str(f) for f in validate(load_resources_text(DR % policy, "dr.yaml"))] == []
    findings = [str(f) for f in validate(load_resources_text(DR % "RANDOM", "dr.yaml"))]
    assert any(f.startswith("dr.yaml:") and "loadBalancer.warmupDurationSecs: meshctl does not implement slow start "
               "with RANDOM yet" in f for f in findings), findings


# ---------------------------------------------------------------- the proxy's request path (memory network)

A, B = ("10.0.0.1", 9080), ("10.0.0.2", 9080)


def _config(version: str, endpoints):
    from meshctl.model.base import FrozenDict
    from meshctl.model.istio import Destination, HTTPRetry, HTTPRoute, HTTPRouteDestination, PortSelector, TrafficPolicy
    from meshctl.model.proxyconfig import (Cluster, Listener, ProxyConfig, RouteTable, Settings, VirtualHost, Workload,
                                           cluster_name)

    host = "hello.default.svc.cluster.local"
    name = cluster_name(host, 9080)
    tp = TrafficPolicy(load_balancer=LoadBalancerSettings(simple="ROUND_ROBIN", warmup_duration_secs=Duration(60.0)))
    cl = Cluster(name=name, service=host, port=9080, traffic_policy=tp,
                 endpoints=tuple(Endpoint(address=a, port=p) for a, p in endpoints))
    route = HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=host, port=PortSelector(number=9080))),),
                      retries=HTTPRetry(attempts=0))
    vh = VirtualHost(name=f"{host}:9080", domains=("hello:9080",), routes=(route,))
    return ProxyConfig(
        version=version, workload=Workload(name="curl-0", service="curl"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001, route_table="outbound"),),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(vh,))),
        clusters=FrozenDict({name: cl}), settings=Settings())


async def test_the_proxy_ramps_up_an_endpoint_added_by_a_config_update(autojump_clock):
    from functools import partial

    import trio

    from meshctl.proxy.runtime import ProxyRuntime
    from meshctl.proxy.testing import MemoryBackend

    served: Counter = Counter()

    def app(name: str):
        async def serve(stream) -> None:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some()
            served[name] += 1
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        return serve

    async def requests(n: int) -> Counter:
        before = served.copy()
        for _ in range(n):
            stream = await backend.connect("127.0.0.1", 15001)
            await stream.send_all(b"GET http://hello:9080/ HTTP/1.1\r\nhost: hello:9080\r\nconnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            assert data.startswith(b"HTTP/1.1 200")
            await stream.aclose()
        return served - before

    backend = MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        backend.serve(*A, app("a"), nursery)
        backend.serve(*B, app("b"), nursery)
        await nursery.start(partial(rt.run, _config("v1", (A,)), handle_signals=False))
        assert await requests(10) == Counter({"a": 10})
        await trio.sleep(120)  # A is long warm
        rt.apply(_config("v2", (A, B)))  # B joins
        first = await requests(400)
        assert 0.06 < first["b"] / 400 < 0.13  # 10 % of A's weight
        await trio.sleep(30)
        rt.apply(_config("v3", (A, B)))  # a new config version keeps B's join time
        half = await requests(400)
        assert 0.28 < half["b"] / 400 < 0.38  # 50 : 100
        await trio.sleep(31)
        assert 0.45 < (await requests(400))["b"] / 400 < 0.55
        rt.drain()
