"""The HTTP pipeline end to end, with a ProxyRuntime in the test loop and real sockets."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import trio

from meshctl.model.istio import HTTPRetry
from meshctl.model.proxyconfig import Listener, Settings

from proxy_testkit import (
    cluster,
    config,
    curl,
    free_port,
    outbound_listener,
    raw_exchange,
    registry_only,
    route_to,
    running_proxy,
    vhost,
)


def _simple(upstream, port: int, **route_kw):
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, **route_kw),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    return cfg, lp


async def test_curl_with_http_proxy_is_routed_by_authority(upstreams):
    reviews, ratings = upstreams("reviews"), upstreams("ratings")
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[
            vhost("reviews", 9080, (route_to("reviews", 9080),)),
            vhost("ratings", 9080, (route_to("ratings", 9080),)),
        ],
        clusters=[
            cluster("reviews", 9080, [("127.0.0.1", reviews.port)]),
            cluster("ratings", 9080, [("127.0.0.1", ratings.port)]),
        ],
    )
    async with running_proxy(cfg):
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/a?b=1")
        info = json.loads(r.stdout)
        assert info["upstream"] == "reviews"
        assert info["path"] == "/a?b=1"  # origin-form upstream
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://ratings:9080/x")
        assert json.loads(r.stdout)["upstream"] == "ratings"
        # origin-form with a Host header works too
        r = await curl("-H", "Host: ratings:9080", f"http://127.0.0.1:{lp}/y")
        assert json.loads(r.stdout)["upstream"] == "ratings"
    # an unknown authority under REGISTRY_ONLY is a local 502 with the reason (ALLOW_ANY,
    # Istio's default, passes it through: tests/integration/test_serviceentry.py)
    async with running_proxy(registry_only(cfg)):
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://nope:9080/")
        assert r.stdout.startswith(b"HTTP/1.1 502")
        assert b"x-meshctl-reason: no route" in r.stdout.lower()


async def test_forwarding_headers_request_id_and_trace_context(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.get(
                "http://reviews:9080/h",
                headers={
                    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "tracestate": "rojo=00f067aa0ba902b7",
                    "x-b3-traceid": "463ac35c9f6413ad",
                    "x-b3-spanid": "a2fb4a1d1a96d312",
                    "x-b3-sampled": "1",
                    "x-custom": "kept",
                    "keep-alive": "timeout=5",
                    "connection": "keep-alive, x-custom-hop",
                    "x-custom-hop": "removed",
                },
            )
            assert r.status_code == 200
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert seen["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            assert seen["tracestate"] == "rojo=00f067aa0ba902b7"
            assert seen["x-b3-traceid"] == "463ac35c9f6413ad"
            assert seen["x-b3-sampled"] == "1"
            assert seen["x-custom"] == "kept"
            assert "keep-alive" not in seen and "x-custom-hop" not in seen
            assert seen["x-forwarded-for"] == "127.0.0.1"
            assert len(seen["x-request-id"]) == 36
            # a request id sent by the client is kept
            r = await c.get("http://reviews:9080/h", headers={"x-request-id": "abc-123"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert seen["x-request-id"] == "abc-123"
            # x-forwarded-for is appended to, not replaced
            r = await c.get("http://reviews:9080/h", headers={"x-forwarded-for": "10.0.0.1"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


async def test_trace_context_goes_on_in_the_b3_form_it_came_in(upstream):
    """A traced sidecar passes a single ``b3`` header on as one ``b3`` header naming its own span
    (B3 single-header callers are not switched to multi-headers), and multi-headers as multi-headers."""
    from dataclasses import replace

    cfg, lp = _simple(upstream, 9080)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # spans go nowhere: this test is about the headers
    cfg = replace(cfg, settings=replace(cfg.settings, tracing_zipkin=f"zipkin://127.0.0.1:{closed.getsockname()[1]}",
                                        tracing_sampling=0.0))
    closed.close()
    trace, caller = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.get("http://reviews:9080/h", headers={"b3": f"{trace}-{caller}-1"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert "x-b3-traceid" not in seen and "x-b3-spanid" not in seen and "x-b3-sampled" not in seen
            t, span, flag, parent = seen["b3"].split("-")
            assert (t, flag, parent) == (trace, "1", caller) and span != caller and len(span) == 16
            assert seen["traceparent"] == f"00-{trace}-{span}-01"
            # unsampled by the caller: passed on unchanged, in its form
            r = await c.get("http://reviews:9080/h", headers={"b3": f"{trace}-{caller}-0"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert seen["b3"] == f"{trace}-{caller}-0" and "x-b3-sampled" not in seen
            # no decision and this proxy says no (sampling 0 %): the decision is written into the b3 header
            r = await c.get("http://reviews:9080/h", headers={"b3": f"{trace}-{caller}"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert seen["b3"] == f"{trace}-{caller}-0" and "x-b3-sampled" not in seen
            # multi-headers stay multi-headers
            r = await c.get("http://reviews:9080/h", headers={"x-b3-traceid": trace, "x-b3-spanid": caller,
                                                                "x-b3-sampled": "1"})
            seen = dict((k, v) for k, v in r.json()["headers"])
            assert "b3" not in seen and seen["x-b3-traceid"] == trace and seen["x-b3-parentspanid"] == caller


async def test_keep_alive_reuses_upstream_connections(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            for i in range(50):
                r = await c.get(f"http://reviews:9080/k{i}")
                assert r.status_code == 200
    assert len(upstream.requests) == 50
    assert upstream.connections == 1


async def test_post_bodies_content_length_and_chunked(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.post("http://reviews:9080/p", content=b"hello body")
            assert r.json()["body"] == "hello body"

            async def gen():
                for part in (b"one,", b"two,", b"three"):
                    yield part

            r = await c.post("http://reviews:9080/p", content=gen())
            assert r.json()["body"] == "one,two,three"
            assert ["transfer-encoding", "chunked"] in r.json()["headers"]


async def test_chunked_streaming_both_ways_is_not_buffered(upstream):
    """Each request chunk reaches the upstream and its echo comes back before
    the client sends the next one."""
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(
            b"POST http://reviews:9080/stream-echo HTTP/1.1\r\nhost: reviews:9080\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        buf = b""
        for word in (b"alpha", b"beta", b"gamma"):
            await s.send_all(b"%x\r\n%s\r\n" % (len(word), word))
            with trio.fail_after(5):
                while word not in buf:
                    buf += await s.receive_some()
        await s.send_all(b"0\r\n\r\n")
        with trio.fail_after(5):
            while not buf.endswith(b"0\r\n\r\n"):
                buf += await s.receive_some()
        assert buf.startswith(b"HTTP/1.1 200")
        await s.aclose()


async def test_head_and_100_continue(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        r = await curl("-sI", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/download?n=12345")
        assert r.stdout.startswith(b"HTTP/1.1 200")
        assert b"content-length: 12345" in r.stdout.lower()
        r = await curl(
            "-sv", "-x", f"http://127.0.0.1:{lp}", "-H", "Expect: 100-continue",
            "--data-binary", "x" * 2048, "http://reviews:9080/upload",
        )
        assert b"HTTP/1.1 100 Continue" in r.stderr
        assert json.loads(r.stdout) == {"received": 2048}


async def test_websocket_upgrade_passes_bytes_through(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg) as rt:
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(
            b"GET http://reviews:9080/ws HTTP/1.1\r\nhost: reviews:9080\r\nconnection: Upgrade\r\n"
            b"upgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        buf = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                buf += await s.receive_some()
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"upgrade: websocket" in head.lower()
        for msg in (b"\x81\x05hello", b"\x81\x03bye"):
            await s.send_all(msg)
            got = rest
            rest = b""
            with trio.fail_after(5):
                while not got.endswith(msg):
                    got += await s.receive_some()
            assert got == b"echo:" + msg
        await s.send_eof()
        with trio.fail_after(5):
            assert await s.receive_some() == b""
        await s.aclose()
        c = rt.stats.clusters["outbound|9080||reviews.default.svc.cluster.local"]
        with trio.move_on_after(5):  # the upstream side is released: waited for (bounded), not slept on
            while c.cx_active:
                await trio.sleep(0.02)
        assert c.cx_active == 0


async def test_dead_upstream_is_503_with_reason(upstream):
    dead = free_port()
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", dead)])],
    )
    async with running_proxy(cfg) as rt:
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/")
        assert r.stdout.startswith(b"HTTP/1.1 503")
        assert b"x-meshctl-reason: upstream connect failure" in r.stdout.lower()
        assert rt.stats.flags["UF"] == 1
        stats = rt.stats.render()
        assert 'meshctl_response_flags_total{flag="UF"} 1' in stats


async def test_no_healthy_endpoint_is_503_uh(upstream):
    from meshctl.model.proxyconfig import Endpoint

    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [Endpoint("127.0.0.1", upstream.port, health="UNHEALTHY")])],
    )
    async with running_proxy(cfg):
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/")
        assert r.stdout.startswith(b"HTTP/1.1 503")
        assert b"x-meshctl-reason: no healthy upstream" in r.stdout.lower()
    assert upstream.requests == []


async def test_upstream_reset_before_response_is_503_ur(upstream):
    cfg, lp = _simple(upstream, 9080, retries=HTTPRetry(attempts=0))
    async with running_proxy(cfg):
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/reset")
        assert r.stdout.startswith(b"HTTP/1.1 503")
        assert b"x-meshctl-reason: upstream reset" in r.stdout.lower()


async def test_route_timeout_is_504(upstream):
    cfg, lp = _simple(upstream, 9080, timeout=0.3, retries=HTTPRetry(attempts=0))
    async with running_proxy(cfg):
        t0 = trio.current_time()
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/slow?ms=10000")
        took = trio.current_time() - t0
        assert r.stdout.startswith(b"HTTP/1.1 504")
        assert b"x-meshctl-reason: upstream timeout" in r.stdout.lower()
        assert took < 5  # the route's 0.3 s, not the upstream's 10 s (slack for a loaded machine)


async def test_retry_after_a_503_reaches_the_second_try(upstream):
    retries = HTTPRetry(attempts=2, retry_on="5xx")
    cfg, lp = _simple(upstream, 9080, retries=retries)
    async with running_proxy(cfg) as rt:
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "--data-binary", "payload",
                       "http://reviews:9080/flaky?key=a&fail=1")
        assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
        assert b'"body": "payload"' in r.stdout  # the body was replayed
        assert upstream.hits["a"] == 2
        # more failures than attempts: the last 503 is what the client sees
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/flaky?key=b&fail=5")
        assert r.stdout.startswith(b"HTTP/1.1 503")
        assert upstream.hits["b"] == 3
        assert rt.stats.clusters["outbound|9080||reviews.default.svc.cluster.local"].rq_retry == 3


async def test_per_try_timeout_then_retry_succeeds(upstreams):
    slow, fast = upstreams("slow"), upstreams("fast")
    lp = free_port()
    from meshctl.model.proxyconfig import Endpoint

    retries = HTTPRetry(attempts=2, per_try_timeout=0.3, retry_on="5xx")
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, retries=retries),))],
        clusters=[cluster("reviews", 9080, [Endpoint("127.0.0.1", slow.port), Endpoint("127.0.0.1", fast.port)])],
    )
    async with running_proxy(cfg) as rt:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}", timeout=10) as c:
            for _ in range(6):
                t0 = trio.current_time()
                # only the "slow" upstream sleeps; round robin hits it on every other request
                r = await c.get("http://reviews:9080/slow?ms=10000&only=slow")
                assert r.status_code == 200
                assert r.json()["upstream"] == "fast"
                assert trio.current_time() - t0 < 4  # the slow try was cut at 0.3s, not waited out (10 s)
    assert len(slow.requests) >= 2
    assert rt.stats.clusters["outbound|9080||reviews.default.svc.cluster.local"].rq_retry >= 2


async def test_weighted_split_between_subsets(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, subsets={"v1": 80, "v2": 20}),))],
        clusters=[
            cluster("reviews", 9080, [("127.0.0.1", v1.port)], subset="v1"),
            cluster("reviews", 9080, [("127.0.0.1", v2.port)], subset="v2"),
        ],
    )
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            for _ in range(300):
                r = await c.get("http://reviews:9080/")
                assert r.status_code == 200
    n1, n2 = len(v1.requests), len(v2.requests)
    assert n1 + n2 == 300
    assert 0.70 < n1 / 300 < 0.90  # 80/20 within a wide bound (binomial sd ≈ 2.3%)


async def test_binding_listener_http_routes_as_the_service(upstream):
    lp = free_port()
    bind = Listener(name="bind-reviews", direction="binding", address="127.0.0.1", port=lp,
                    route_table="outbound", service="reviews.default.svc.cluster.local", service_port=9080)
    cfg = config(
        listeners=[bind],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    async with running_proxy(cfg):
        r = await curl(f"http://127.0.0.1:{lp}/via-binding")
        info = json.loads(r.stdout)
        assert info["path"] == "/via-binding"
        assert ["host", "reviews.default.svc.cluster.local:9080"] in info["headers"]


async def test_inbound_listener_forwards_to_the_app(upstream):
    lp = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=lp,
                       app_address="127.0.0.1", app_port=upstream.port)
    cfg = config(listeners=[inbound])
    async with running_proxy(cfg):
        r = await curl("-H", "Host: productpage:9080", f"http://127.0.0.1:{lp}/inside")
        info = json.loads(r.stdout)
        assert info["path"] == "/inside"
        assert ["host", "productpage:9080"] in info["headers"]


async def test_tcp_binding_relays_bytes_and_half_close():
    # a TCP upstream that answers after the client half-closes
    got = []

    async def tcp_server(stream):
        data = b""
        while True:
            d = await stream.receive_some()
            if not d:
                break
            data += d
        got.append(data)
        await stream.send_all(b"len=%d" % len(data))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, tcp_server, 0)
        up_port = listeners[0].socket.getsockname()[1]
        lp = free_port()
        bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                        service="db.default.svc.cluster.local", service_port=5432)
        cfg = config(listeners=[bind], clusters=[cluster("db", 5432, [("127.0.0.1", up_port)], protocol="tcp")])
        async with running_proxy(cfg):
            s = await trio.open_tcp_stream("127.0.0.1", lp)
            payload = b"z" * 300_000
            await s.send_all(payload)
            await s.send_eof()
            reply = b""
            with trio.fail_after(5):
                while True:
                    d = await s.receive_some()
                    if not d:
                        break
                    reply += d
            assert reply == b"len=300000"
            assert got == [payload]
            await s.aclose()
        n.cancel_scope.cancel()


HARDENING = [
    # (raw request, expected status)
    (b"GET / HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nhost: reviews:9080\r\nx-a: b\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost : reviews:9080\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost: reviews:9080\r\nhost: reviews:9080\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nhost: reviews:9080\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nhost: reviews:9080\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"NOT A REQUEST\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost: reviews:9080\r\nx-bad: a\x00b\r\n\r\n", 400),
]


async def test_hardening_table_end_to_end(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg):
        for raw, status in HARDENING:
            out, closed = await trio.to_thread.run_sync(raw_exchange, lp, raw)
            assert out.startswith(b"HTTP/1.1 %d" % status), (raw[:60], out[:80])
            assert b"connection: close" in out.lower()
            assert closed, raw[:60]
        # bad chunk framing in a body that already started: 400, closed
        out, closed = await trio.to_thread.run_sync(
            raw_exchange, lp,
            b"POST / HTTP/1.1\r\nhost: reviews:9080\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 400"), out[:80]
        assert closed
    # none of them reached the upstream as a complete request
    assert [r for r in upstream.requests] == []


async def test_config_swap_under_load_has_no_failed_request(upstreams):
    a, b = upstreams("a"), upstreams("b")
    lp = free_port()

    def cfg_for(up, version):
        return config(
            version=version,
            listeners=[outbound_listener(lp)],
            vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
            clusters=[cluster("reviews", 9080, [("127.0.0.1", up.port)])],
        )

    failures = []
    seen = set()
    async with running_proxy(cfg_for(a, "1")) as rt:
        async def client():
            async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
                for _ in range(60):
                    try:
                        r = await c.get("http://reviews:9080/")
                        if r.status_code != 200:
                            failures.append(r.status_code)
                        else:
                            seen.add(r.json()["upstream"])
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(client)
            for i in range(10):
                await trio.sleep(0.03)
                rt.apply(cfg_for(b if i % 2 == 0 else a, str(i + 2)))
    assert failures == []
    assert seen == {"a", "b"}


async def test_invalid_config_is_rejected_and_old_one_kept(upstream):
    from meshctl.proxy.runtime import ConfigRejected
    import pytest

    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg) as rt:
        bad = config(
            version="bad",
            listeners=[outbound_listener(lp)],
            vhosts=[vhost("reviews", 9080, (route_to("reviews", 9081),))],  # no such cluster
            clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
        )
        with pytest.raises(ConfigRejected, match=r"outbound\|9081\|\|reviews.default.svc.cluster.local"):
            rt.apply(bad)
        # a listener on a port in use is rejected too
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = busy.getsockname()[1]
        with pytest.raises(ConfigRejected, match=f"127.0.0.1:{p}"):
            rt.apply(config(version="busy", listeners=[outbound_listener(lp), outbound_listener(p, "other")],
                            vhosts=cfg.route_tables["outbound"].virtual_hosts,
                            clusters=list(cfg.clusters.values())))
        busy.close()
        assert rt.config.version == "v1"
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/")
        assert json.loads(r.stdout)["upstream"] == "up"


async def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(upstream):
    cfg, lp = _simple(upstream, 9080, retries=HTTPRetry(attempts=0))
    async with running_proxy(cfg) as rt:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.get("http://reviews:9080/then-close?ms=50")
            assert r.status_code == 200
            # the upstream closes the pooled connection meanwhile (its timer thread may be late on
            # a loaded machine: waited for, not slept on)
            assert await trio.to_thread.run_sync(upstream.closed_idle.wait, 10)
            r = await c.get("http://reviews:9080/again")
            assert r.status_code == 200
    assert upstream.connections == 2
    assert rt.stats.flags["UR"] == 0


async def test_request_header_timeout_closes_a_slow_client(upstream):
    from meshctl.model.base import Duration

    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
        settings=Settings(request_headers_timeout=Duration(0.5), idle_timeout=Duration(1.0)),
    )
    async with running_proxy(cfg):
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"GET http://reviews:9080/ HTTP/1.1\r\nhost: reviews")  # never finished
        t0 = trio.current_time()
        with trio.fail_after(5):
            while await s.receive_some():
                pass
        assert 0.4 < trio.current_time() - t0 < 2.5  # the 0.5 s header timeout, with slack for a loaded machine
        await s.aclose()
        # an idle keep-alive connection is closed after idle_timeout
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"GET http://reviews:9080/ HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        t0 = trio.current_time()
        data = b""
        with trio.fail_after(6):
            while True:
                d = await s.receive_some()
                if not d:
                    break
                data += d
        assert data.startswith(b"HTTP/1.1 200")
        assert 0.8 < trio.current_time() - t0 < 4  # the 1 s idle timeout, with slack for a loaded machine
        await s.aclose()
    assert len(upstream.requests) == 1


async def test_gateway_listener_routes_through_its_table(upstream):
    lp = free_port()
    gw = Listener(name="ingress", direction="gateway", address="127.0.0.1", port=lp, route_table="outbound")
    cfg = config(
        listeners=[gw],
        vhosts=[vhost("bookinfo.example.com", 80, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    async with running_proxy(cfg):
        r = await curl("-H", "Host: bookinfo.example.com", f"http://127.0.0.1:{lp}/productpage")
        assert json.loads(r.stdout)["path"] == "/productpage"
        r = await curl("-si", "-H", "Host: other.example.com", f"http://127.0.0.1:{lp}/")
        assert r.stdout.startswith(b"HTTP/1.1 404")


async def test_apply_opens_added_listeners_and_closes_removed_ones(upstream):
    cfg, lp = _simple(upstream, 9080)
    lp2 = free_port()
    async with running_proxy(cfg) as rt:
        two = config(version="v2", listeners=[outbound_listener(lp), outbound_listener(lp2, "second")],
                     vhosts=cfg.route_tables["outbound"].virtual_hosts, clusters=list(cfg.clusters.values()))
        rt.apply(two)
        r = await curl("-x", f"http://127.0.0.1:{lp2}", "http://reviews:9080/second")
        assert json.loads(r.stdout)["path"] == "/second"
        # an open keep-alive connection on the first listener survives its removal
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        with trio.fail_after(10):  # the accept loop took it (a fixed 50 ms raced it on a loaded machine)
            while not rt.stats.listeners["outbound"].cx_active:
                await trio.sleep(0.01)
        only_second = config(version="v3", listeners=[outbound_listener(lp2, "second")],
                             vhosts=cfg.route_tables["outbound"].virtual_hosts, clusters=list(cfg.clusters.values()))
        rt.apply(only_second)

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", lp)) == 0

        with trio.move_on_after(5):
            while listening():
                await trio.sleep(0.02)
        assert not listening()  # nobody listens any more
        await s.send_all(b"GET http://reviews:9080/old HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b"/old" not in data:
                data += await s.receive_some()
        assert data.startswith(b"HTTP/1.1 200")
        await s.aclose()


async def test_local_replies_keep_the_connection_usable(upstream):
    """A local 502 (an unknown host under REGISTRY_ONLY) to HEAD has no body, and the
    next request on the connection still works."""
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(registry_only(cfg)):
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"HEAD http://nope:1/ HTTP/1.1\r\nhost: nope:1\r\n\r\n"
                         b"GET http://reviews:9080/next HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b'"/next"' not in data:
                data += await s.receive_some()
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 502")
        assert rest.startswith(b"HTTP/1.1 200")  # no 502 body in between
        await s.aclose()


async def test_client_going_away_mid_upload_or_mid_wait_leaves_the_proxy_serving(upstream):
    cfg, lp = _simple(upstream, 9080)
    async with running_proxy(cfg) as rt:
        # abandons a chunked upload half way
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"POST http://reviews:9080/upload HTTP/1.1\r\nhost: reviews:9080\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + b"10000\r\n" + b"u" * 30000)
        await trio.sleep(0.1)
        s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await s.aclose()
        # abandons a request while the upstream is still working on it
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"GET http://reviews:9080/slow?ms=300 HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        await trio.sleep(0.05)
        await s.aclose()
        await trio.sleep(0.5)
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/still-up")
        assert json.loads(r.stdout)["path"] == "/still-up"
        with trio.fail_after(2):
            while rt.stats.listeners["outbound"].cx_active:  # curl's own connection closing
                await trio.sleep(0.01)


async def test_upstream_dying_mid_body_closes_the_client_connection(upstreams):
    """The client cannot be told with a status any more: it sees a truncated body and a close."""
    async def short_server(stream):
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, short_server, 0)
        port = listeners[0].socket.getsockname()[1]
        lp = free_port()
        cfg = config(
            listeners=[outbound_listener(lp)],
            vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
            clusters=[cluster("reviews", 9080, [("127.0.0.1", port)])],
        )
        async with running_proxy(cfg) as rt:
            out, closed = await trio.to_thread.run_sync(
                raw_exchange, lp, b"GET http://reviews:9080/ HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200")
            assert closed
            assert len(out.partition(b"\r\n\r\n")[2]) == 1000
            assert rt.stats.flags["UR"] == 1
            # the dead upstream connection is no longer counted as active
            assert rt.stats.clusters["outbound|9080||reviews.default.svc.cluster.local"].cx_active == 0
        n.cancel_scope.cancel()


async def test_fault_injection_delays_and_aborts_like_istio(upstream):
    from meshctl.model.base import Duration
    from meshctl.model.istio import FaultAbort, FaultDelay, HTTPFaultInjection, HTTPMatchRequest, Percent, StringMatch

    jason = (HTTPMatchRequest(headers={"end-user": StringMatch(exact="jason")}),)
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[
            vhost("ratings", 9080, (
                route_to("ratings", 9080, match=jason,
                         fault=HTTPFaultInjection(abort=FaultAbort(http_status=500, percentage=Percent(100.0)))),
                route_to("ratings", 9080),
            )),
            vhost("reviews", 9080, (
                route_to("reviews", 9080, match=jason,
                         fault=HTTPFaultInjection(delay=FaultDelay(fixed_delay=Duration(2.0), percentage=Percent(100.0)))),
                route_to("reviews", 9080),
            )),
        ],
        clusters=[cluster("ratings", 9080, [("127.0.0.1", upstream.port)]),
                  cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    async with running_proxy(cfg) as rt:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.get("http://ratings:9080/r", headers={"end-user": "jason"})
            assert r.status_code == 500
            assert r.headers["x-meshctl-reason"] == "fault filter abort"
            assert upstream.requests == []
            assert (await c.get("http://ratings:9080/r", headers={"end-user": "ann"})).status_code == 200
            t0 = trio.current_time()
            r = await c.get("http://reviews:9080/v", headers={"end-user": "jason"})
            assert r.status_code == 200 and trio.current_time() - t0 >= 2.0
            t0 = trio.current_time()
            await c.get("http://reviews:9080/v", headers={"end-user": "ann"})
            assert trio.current_time() - t0 < 1.0  # not delayed (the delay is 2 s; slack for a loaded machine)
        assert rt.stats.flags["FI"] == 1 and rt.stats.flags["DI"] == 1


async def test_inbound_authorization_policy_denies_with_403(upstream):
    from meshctl.model.istio import AuthorizationPolicy, Operation, Rule, RuleTo

    lp = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=lp,
                       app_address="127.0.0.1", app_port=upstream.port)
    deny_admin = AuthorizationPolicy(action="DENY", rules=(Rule(to=(RuleTo(operation=Operation(paths=("/admin*",))),)),))
    cfg = config(listeners=[inbound])
    from dataclasses import replace

    cfg = replace(cfg, authorization=(deny_admin,))
    async with running_proxy(cfg) as rt:
        r = await curl("-si", f"http://127.0.0.1:{lp}/admin/users")
        assert r.stdout.startswith(b"HTTP/1.1 403")
        assert b"RBAC: access denied" in r.stdout
        r = await curl("-si", f"http://127.0.0.1:{lp}/public")
        assert r.stdout.startswith(b"HTTP/1.1 200")
        assert rt.stats.flags["RBAC"] == 1
    assert [p for _, p, _ in upstream.requests] == ["/public"]


async def test_outlier_detection_ejects_a_failing_endpoint(upstreams):
    from dataclasses import replace

    from meshctl.model.base import Duration
    from meshctl.model.istio import OutlierDetection, TrafficPolicy
    from meshctl.model.proxyconfig import Endpoint

    good, bad = upstreams("good"), upstreams("bad")
    lp = free_port()
    c = cluster("reviews", 9080, [Endpoint("127.0.0.1", good.port), Endpoint("127.0.0.1", bad.port)])
    c = replace(c, traffic_policy=TrafficPolicy(outlier_detection=OutlierDetection(
        consecutive_5xx_errors=3, interval=Duration(10.0), base_ejection_time=Duration(30.0),
        max_ejection_percent=100)))
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, retries=HTTPRetry(attempts=0)),))],
        clusters=[c],
    )
    statuses = []
    async with running_proxy(cfg) as rt:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as client:
            for _ in range(20):
                r = await client.get("http://reviews:9080/flaky?only=bad&fail=1000")
                statuses.append(r.status_code)
        # the ejection survives a config swap
        rt.apply(replace(cfg, version="v2"))
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as client:
            for _ in range(4):
                assert (await client.get("http://reviews:9080/flaky?only=bad&fail=1000")).status_code == 200
    assert statuses.count(503) == 3  # three strikes on "bad", then it is out
    assert len(bad.requests) == 3


async def test_abandoned_request_releases_the_upstream_connection(upstream):
    """A client that gives up on a slow request: the proxy notices, drops the
    upstream exchange instead of waiting for it to finish."""
    cfg, lp = _simple(upstream, 9080, retries=HTTPRetry(attempts=0))
    async with running_proxy(cfg) as rt:
        s = await trio.open_tcp_stream("127.0.0.1", lp)
        await s.send_all(b"GET http://reviews:9080/slow?ms=20000 HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        await trio.sleep(0.2)
        await s.aclose()
        c = rt.stats.clusters["outbound|9080||reviews.default.svc.cluster.local"]
        with trio.fail_after(8):  # well before the upstream's 20 s (slack for a loaded machine)
            while c.cx_active or rt.stats.listeners["outbound"].cx_active:
                await trio.sleep(0.05)
        assert rt.stats.flags["DC"] == 1


@pytest.mark.parametrize("lb", ["RANDOM", "LEAST_REQUEST"])
async def test_a_retry_goes_to_another_endpoint_than_the_one_that_failed(upstreams, lb):
    # Istio's default retry policy carries Envoy's previous_hosts retry host predicate:
    # with one endpoint always answering 503, the one retry lands on the other every time
    # (without it, a random pick would retry the failing one about half the time)
    from dataclasses import replace

    from meshctl.model.istio import LoadBalancerSettings, TrafficPolicy

    bad, good = upstreams("bad"), upstreams("good")
    lp = free_port()
    c = cluster("reviews", 9080, [("127.0.0.1", bad.port), ("127.0.0.1", good.port)])
    c = replace(c, traffic_policy=TrafficPolicy(load_balancer=LoadBalancerSettings(simple=lb)))
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, retries=HTTPRetry(attempts=1, retry_on="5xx")),))],
        clusters=[c],
    )
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}", timeout=10) as client:
            for i in range(30):
                r = await client.get(f"http://reviews:9080/flaky?only=bad&fail=1000000&key=k{i}")
                assert r.status_code == 200, (i, r.status_code)
                assert r.json()["upstream"] == "good"
    assert len(bad.requests) >= 5  # the failing endpoint did get first tries


async def test_a_tcp_connect_retry_goes_to_another_endpoint_than_the_one_refused():
    # a TCP binding tries to connect up to 3 times; each try avoids the endpoints already
    # tried, so with one endpoint refusing connections every client reaches the other
    # (random picks alone would give up on 1 connection in 8)
    from dataclasses import replace

    from meshctl.model.istio import LoadBalancerSettings, TrafficPolicy

    async def greet(stream):
        await stream.send_all(b"hello from the live one")
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, greet, 0)
        live = listeners[0].socket.getsockname()[1]
        dead = free_port()  # nothing listens: connection refused
        lp = free_port()
        bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                        service="db.default.svc.cluster.local", service_port=5432)
        c = cluster("db", 5432, [("127.0.0.1", dead), ("127.0.0.1", live)], protocol="tcp")
        c = replace(c, traffic_policy=TrafficPolicy(load_balancer=LoadBalancerSettings(simple="RANDOM")))
        async with running_proxy(config(listeners=[bind], clusters=[c])) as rt:
            for i in range(30):
                s = await trio.open_tcp_stream("127.0.0.1", lp)
                got = b""
                with trio.fail_after(5):
                    while d := await s.receive_some():
                        got += d
                await s.aclose()
                assert got == b"hello from the live one", i
            assert rt.stats.clusters["outbound|5432||db.default.svc.cluster.local"].cx_connect_fail >= 3
        n.cancel_scope.cancel()
