"""Mirroring to a service reached over HTTP/2: a gRPC route's shadow goes to the mirror
subset's gRPC server as gRPC (HTTP/2), as Envoy's shadow uses its cluster's protocol.
Before, every shadow went over HTTP/1.1 and a gRPC server never answered one."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
import trio

from meshctl.model.istio import ConnectionPoolSettings, Destination, HTTPSettings, Percent, PortSelector, TrafficPolicy
from meshctl.model.proxyconfig import fqdn

import os
import sys

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, running_proxy, vhost
from test_grpc_proxy import _channel, _run, echo_apps, sidecar_pair  # noqa: F401 (echo_apps: a fixture)

sys.path.insert(0, os.path.dirname(__file__))
from h2_testkit import H2App  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V2 = "outbound|9090|v2|" + fqdn("echo")


async def _wait(cond, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def test_a_grpc_call_is_mirrored_over_http2_to_the_mirror_subsets_grpc_server(echo_apps):  # noqa: F811
    a, b = echo_apps("a"), echo_apps("b")
    route = replace(route_to("echo", 9090), mirror=Destination(host=fqdn("echo"), subset="v2", port=PortSelector(number=9090)),
                    mirror_percentage=Percent(value=100.0))
    async with sidecar_pair(a, route, extra_apps=[("v2", b)]) as (port, rt):
        def calls():
            with _channel(port) as ch:
                say = ch.unary_unary("/mesh.Echo/Say")
                # the channel closes right after the last answer: its call is mirrored all the same
                return [say(f"call-{i}".encode(), metadata=(("x-client", "7"),), timeout=10) for i in range(3)]

        assert await _run(calls) == [f"a: hello call-{i}".encode() for i in range(3)]  # the primary's answers
        await _wait(lambda: len(b.hits) == 3 and rt.mirrors.sent == 3)
        # each shadow reached v2's gRPC server with the request's message and metadata
        assert b.hits == {f"call-{i}".encode(): 1 for i in range(3)}
        assert all(md.get("x-client") == "7" for md in b.metadata)
        assert a.hits == {f"call-{i}".encode(): 1 for i in range(3)}  # and the primary went once to v1
        report = rt.mirrors.report()
        assert report["failed"] == 0 and report["dropped"] == 0
        t = report["targets"][V2]
        # `mirror diff`: v2 answered 200 application/grpc like v1, with another message ("b: hello ...")
        assert t["compared"] == 3 and t["failed"] == 0 and t["status_differs"] == 0
        assert t["content_type_differs"] == 0 and t["body_differs"] == 3
        rec = report["recent"][-1]
        assert rec["shadow_status"] == 200 and rec["shadow_content_type"] == "application/grpc"
        assert rec["shadow_headers"].get("grpc-status", "0") == "0" or "grpc-status" not in rec["shadow_headers"]


async def test_a_dead_grpc_mirror_never_delays_or_fails_the_primary(echo_apps):  # noqa: F811
    a, b = echo_apps("a"), echo_apps("b")
    route = replace(route_to("echo", 9090), mirror=Destination(host=fqdn("echo"), subset="v2", port=PortSelector(number=9090)))
    b.stop()  # v2's port refuses connections
    async with sidecar_pair(a, route, extra_apps=[("v2", b)]) as (port, rt):
        def call():
            with _channel(port) as ch:
                return ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10)

        assert await _run(call) == b"a: hello x"
        await _wait(lambda: rt.mirrors.failed == 1)
        rec = rt.mirrors.report()["recent"][-1]
        assert rec["shadow_status"] == 0 and rec["differs"] == ["no answer"] and rec["shadow_error"]


async def test_an_http11_request_is_mirrored_over_h2_prior_knowledge_with_its_body_and_shadow_host():
    # the primary and the mirror are HTTP/2-only apps (h2c prior knowledge, clusters declared http2);
    # the client speaks HTTP/1.1 to the proxy
    v1, v2 = H2App(), H2App()
    try:
        lp = free_port()
        route = replace(route_to("grpcsvc", 9090),
                        mirror=Destination(host=fqdn("grpcsvc"), subset="v2", port=PortSelector(number=9090)))
        cfg = config(listeners=[outbound_listener(lp)], vhosts=[vhost("grpcsvc", 9090, (route,))],
                     clusters=[cluster("grpcsvc", 9090, [("127.0.0.1", v1.port)], protocol="http2"),
                               cluster("grpcsvc", 9090, [("127.0.0.1", v2.port)], subset="v2", protocol="http2")])
        async with running_proxy(cfg) as rt:
            r = await curl("-s", "--http1.1", "-x", f"http://127.0.0.1:{lp}", "-d", "a body", "-H", "x-custom: v",
                           "http://grpcsvc:9090/echo?n=1")
            assert b'"authority": "grpcsvc:9090"' in r.stdout  # the primary's answer, from v1
            await _wait(lambda: rt.mirrors.sent == 1)
            rec = rt.mirrors.report()["recent"][-1]
            # v2 answered the same status and type; its echo names another authority: the body differs
            assert rec["shadow_status"] == 200 and rec["differs"] == ["body"], rec
        ((method, path, headers),) = v2.requests
        h = dict(headers)
        assert (method, path) == ("POST", "/echo?n=1")
        assert h[":authority"] == "grpcsvc-shadow:9090" and h["x-custom"] == "v"
        assert [p for _, p, _ in v1.requests] == ["/echo?n=1"]
    finally:
        v1.close()
        v2.close()


async def test_shadows_count_against_the_mirror_clusters_http2_max_requests():
    # Envoy's shadows go through the mirror cluster's circuit breakers: with v2's
    # http2MaxRequests at 1 and v2 stuck on its first shadow, the next shadows are dropped
    # and counted as v2's overflow; the primaries are not touched
    v1, v2 = H2App(), H2App()
    v2.hold = True
    try:
        lp = free_port()
        route = replace(route_to("grpcsvc", 9090),
                        mirror=Destination(host=fqdn("grpcsvc"), subset="v2", port=PortSelector(number=9090)))
        v2_cluster = replace(cluster("grpcsvc", 9090, [("127.0.0.1", v2.port)], subset="v2", protocol="http2"),
                             traffic_policy=TrafficPolicy(connection_pool=ConnectionPoolSettings(
                                 http=HTTPSettings(http2_max_requests=1))))
        cfg = config(listeners=[outbound_listener(lp)], vhosts=[vhost("grpcsvc", 9090, (route,))],
                     clusters=[cluster("grpcsvc", 9090, [("127.0.0.1", v1.port)], protocol="http2"), v2_cluster])
        async with running_proxy(cfg) as rt:
            for i in range(4):
                r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "--http1.1", "-x", f"http://127.0.0.1:{lp}",
                               f"http://grpcsvc:9090/echo?n={i}")
                assert r.stdout == b"200"  # every primary answered by v1
            await _wait(lambda: rt.mirrors.dropped == 3)
            assert rt.mirrors.in_flight == 1 and rt.mirrors.sent == 0
            assert rt.stats.cluster(v2_cluster.name).rq_pending_overflow == 3
            stats = (await curl(f"http://127.0.0.1:{rt.admin_port}/stats")).stdout
            assert b'meshctl_mirror_requests_total{outcome="dropped"} 3' in stats
        assert [p for _, p, _ in v2.requests] == ["/echo?n=0"]  # one shadow reached v2, and no more
        assert [p for _, p, _ in v1.requests] == [f"/echo?n={i}" for i in range(4)]
    finally:
        v1.close()
        v2.close()
