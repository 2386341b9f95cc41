"""Istio metrics and access logs through a real sidecar pair: client sidecar → server sidecar → app."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from functools import partial

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshctl.model.base import FrozenDict
from meshctl.model.istio import HTTPRetry
from meshctl.model.proxyconfig import Endpoint, Listener, ProxyConfig, Workload, fqdn
from meshctl.proxy.accesslog import AccessLog
from meshctl.proxy.runtime import ProxyRuntime

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, vhost

REVIEWS = fqdn("reviews")


@asynccontextmanager
async def sidecar(cfg: ProxyConfig, access_log=None):
    rt = ProxyRuntime()
    if access_log is not None:
        rt.access_log = AccessLog(access_log, flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(rt.run, cfg, admin_port=0, handle_signals=False))
        try:
            yield rt
        finally:
            rt.drain()


def with_workload(cfg: ProxyConfig, name: str, app: str, version: str) -> ProxyConfig:
    from dataclasses import replace

    return replace(cfg, workload=Workload(name=name, service=app, labels=FrozenDict(app=app, version=version)))


async def scrape(rt, path: str = "/stats") -> dict[str, list]:
    async with httpx.AsyncClient(trust_env=False) as c:
        r = await c.get(f"http://127.0.0.1:{rt.admin_port}{path}")
    assert r.status_code == 200
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples, **labels) -> float:
    got = [s for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (labels, [s.labels for s in samples])
    return got[0].value


def pair_configs(app_port: int, access: bool = False):
    inbound_port, outbound_port = free_port(), free_port()
    server = with_workload(
        config(listeners=[Listener(name="inbound", direction="inbound", address="127.0.0.1", port=inbound_port,
                                   service="reviews", app_address="127.0.0.1", app_port=app_port)]),
        "reviews-v2-0", "reviews", "v2")
    ep = Endpoint(address="127.0.0.1", port=inbound_port, labels=FrozenDict(app="reviews", version="v2"),
                  instance="reviews-v2-0")
    client = with_workload(
        config(listeners=[outbound_listener(outbound_port)],
               vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, retries=HTTPRetry(attempts=0)),))],
               clusters=[cluster("reviews", 9080, [ep])]),
        "productpage-v1-0", "productpage", "v1")
    return client, server, outbound_port


async def test_requests_are_counted_by_both_sidecars_with_istio_labels(upstream, tmp_path):
    client_cfg, server_cfg, port = pair_configs(upstream.port)
    log_path = tmp_path / "client.access.log"
    async with sidecar(server_cfg) as server, sidecar(client_cfg, log_path) as client:
        for _ in range(7):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                           "-A", "metrics-test", "http://reviews:9080/download?n=100")
            assert r.stdout == b"200"
        for _ in range(3):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                           "http://reviews:9080/flaky?fail=100&key=always")
            assert r.stdout == b"503"
        c = await scrape(client)
        s = await scrape(server, "/metrics")
        with trio.move_on_after(15):  # the access log's flush: waited for (bounded), generous for a slow machine
            while client.access_log.written < 10:
                await trio.sleep(0.02)

    common = dict(source_workload="productpage-v1", source_app="productpage", source_version="v1",
                  destination_workload="reviews-v2", destination_app="reviews", destination_version="v2",
                  destination_service=REVIEWS, request_protocol="http")
    assert value(c["istio_requests_total"], reporter="source", response_code="200", response_flags="-", **common) == 7
    assert value(c["istio_requests_total"], reporter="source", response_code="503", **common) == 3
    assert value(s["istio_requests_total"], reporter="destination", response_code="200",
                 connection_security_policy="none", **common) == 7
    assert value(s["istio_requests_total"], reporter="destination", response_code="503", **common) == 3
    for m in (c, s):
        counts = [x.value for x in m["istio_request_duration_milliseconds_count"]]
        assert sum(counts) == 10
        assert value(m["istio_response_bytes_sum"], response_code="200") == 700
        assert value(m["istio_response_bytes_sum"], response_code="503") == 3 * len(b"failing on purpose\n")
    # the client sidecar's latency includes the server sidecar's
    assert (value(c["istio_request_duration_milliseconds_sum"], response_code="200")
            >= value(s["istio_request_duration_milliseconds_sum"], response_code="200"))
    # the app never sees the identity headers
    for _, _, headers in upstream.requests:
        assert not any(k.startswith("x-meshctl-source") for k, _ in headers)

    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert len(lines) == 10
    first = lines[0]
    assert first["method"] == "GET" and first["path"] == "/download?n=100" and first["response_code"] == 200
    assert first["response_flags"] == "-" and first["bytes_sent"] == 100 and first["user_agent"] == "metrics-test"
    assert first["upstream_cluster"] == f"outbound|9080||{REVIEWS}"
    assert first["upstream_host"] == f"127.0.0.1:{server_cfg.listeners[0].port}"
    assert first["authority"] == "reviews:9080" and first["protocol"] == "HTTP/1.1"
    assert first["source_workload"] == "productpage-v1" and first["destination_workload"] == "reviews-v2"
    assert len(first["x_request_id"]) == 36 and first["start_time"].endswith("Z")
    assert first["downstream_remote_address"] == "127.0.0.1"
    assert sorted(x["response_code"] for x in lines) == [200] * 7 + [503] * 3


async def test_no_healthy_upstream_is_counted_with_its_flag(upstream):
    port = free_port()
    cfg = config(listeners=[outbound_listener(port)],
                 vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
                 clusters=[cluster("reviews", 9080, [])])
    async with sidecar(cfg) as rt:
        for _ in range(2):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                           "http://reviews:9080/")
            assert r.stdout == b"503"
        m = await scrape(rt)
    assert value(m["istio_requests_total"], response_code="503", response_flags="UH",
                 destination_service=REVIEWS, destination_workload="unknown") == 2


async def test_tcp_binding_bytes_and_connections():
    async def echo(stream):
        data = b""
        while True:
            d = await stream.receive_some()
            if not d:
                break
            data += d
        await stream.send_all(data * 2)
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, echo, 0)
        up_port = listeners[0].socket.getsockname()[1]
        lp = free_port()
        bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                        service=fqdn("db"), service_port=5432)
        ep = Endpoint(address="127.0.0.1", port=up_port, labels=FrozenDict(app="db", version="v1"), instance="db-v1-0")
        cfg = with_workload(config(listeners=[bind], clusters=[cluster("db", 5432, [ep], protocol="tcp")]),
                            "productpage-v1-0", "productpage", "v1")
        async with sidecar(cfg) as rt:
            for payload in (b"hello", b"abc"):
                s = await trio.open_tcp_stream("127.0.0.1", lp)
                await s.send_all(payload)
                await s.send_eof()
                got = b""
                with trio.fail_after(5):
                    while True:
                        d = await s.receive_some()
                        if not d:
                            break
                        got += d
                assert got == payload * 2
                await s.aclose()
            with trio.fail_after(5):
                while True:
                    m = await scrape(rt)
                    if m.get("istio_tcp_connections_closed_total") and m["istio_tcp_connections_closed_total"][0].value == 2:
                        break
                    await trio.sleep(0.02)
        n.cancel_scope.cancel()
    lab = dict(reporter="source", request_protocol="tcp", destination_service=fqdn("db"), destination_version="v1",
               destination_workload="db-v1", source_workload="productpage-v1")
    assert value(m["istio_tcp_connections_opened_total"], **lab) == 2
    assert value(m["istio_tcp_connections_closed_total"], **lab) == 2
    assert value(m["istio_tcp_received_bytes_total"], **lab) == 8
    assert value(m["istio_tcp_sent_bytes_total"], **lab) == 16
