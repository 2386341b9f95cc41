"""The proxy's request path over the memory network backend (proxy/testing.py):
retries, per-try timeouts, the retry budget, circuit-breaker overflow and drain,
with no sockets and no sleeps (pytest-trio's autojump_clock is
MockClock(autojump_threshold=0): the clock jumps whenever every task waits).

The upstreams are small apps in the test, over the backend's memory streams:
an HTTP/1.1 one (raw bytes) and an HTTP/2 one (the h2 library), both answering
``?ms=`` later with ``?status=`` and counting the requests they read.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshctl.model.base import Duration, FrozenDict
from meshctl.model.istio import (
    ConnectionPoolSettings,
    Destination,
    HTTPRetry,
    HTTPRoute,
    HTTPRouteDestination,
    HTTPSettings,
    PortSelector,
    TCPSettings,
    TrafficPolicy,
)
from meshctl.model.proxyconfig import (
    Cluster,
    Endpoint,
    Listener,
    ProxyConfig,
    RouteTable,
    Settings,
    VirtualHost,
    Workload,
    cluster_name,
)
from meshctl.proxy.runtime import ProxyRuntime
from meshctl.proxy.stream import UpstreamConnectError
from meshctl.proxy.testing import MemoryBackend, request_heads

HOST = "reviews.default.svc.cluster.local"
CLUSTER = cluster_name(HOST, 9080)
APP = ("10.0.0.1", 9080)
PROXY = ("127.0.0.1", 15001)


def _query(target: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}


class H1App:
    """HTTP/1.1 keep-alive upstream: answers ``?ms=`` later with ``?status=``."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.connections = 0

    async def __call__(self, stream) -> None:
        self.connections += 1
        async for head in request_heads(stream):
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            self.requests.append(target)
            q = _query(target)
            await trio.sleep(int(q.get("ms", "0")) / 1000)
            body = b"from the app\n"
            await stream.send_all(b"HTTP/1.1 %s X\r\ncontent-length: %d\r\n\r\n%s"
                                  % (q.get("status", "200").encode(), len(body), body))


class H2App:
    """HTTP/2 (prior knowledge) upstream, on the h2 library: the same endpoints."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def __call__(self, stream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        lock = trio.Lock()

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        async def answer(sid: int, target: str) -> None:
            q = _query(target)
            await trio.sleep(int(q.get("ms", "0")) / 1000)
            conn.send_headers(sid, [(":status", q.get("status", "200")), ("content-length", "0")],
                              end_stream=True)
            await flush()

        async with trio.open_nursery() as n:
            await flush()
            while True:
                data = await stream.receive_some()
                if not data:
                    n.cancel_scope.cancel()
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        target = dict(ev.headers)[":path"]
                        self.requests.append(target)
                        n.start_soon(answer, ev.stream_id, target)
                await flush()


def _config(*, protocol: str = "http", retries: HTTPRetry | None = None,
            pool: ConnectionPoolSettings | None = None, endpoints=(APP,)) -> ProxyConfig:
    tp = TrafficPolicy(connection_pool=pool) if pool is not None else None
    cl = Cluster(name=CLUSTER, service=HOST, port=9080, protocol=protocol, traffic_policy=tp,
                 endpoints=tuple(Endpoint(address=a, port=p) for a, p in endpoints))
    route = HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=HOST, port=PortSelector(number=9080))),),
                      retries=retries or HTTPRetry(attempts=0))
    vh = VirtualHost(name=f"{HOST}:9080", domains=("reviews", "reviews:9080", HOST, f"{HOST}:9080"), routes=(route,))
    return ProxyConfig(
        version="v1",
        workload=Workload(name="productpage-0", service="productpage"),
        listeners=(Listener(name="outbound", direction="outbound", address=PROXY[0], port=PROXY[1],
                            route_table="outbound"),),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(vh,))),
        clusters=FrozenDict({CLUSTER: cl}),
        settings=Settings(connect_timeout=Duration(1.0), drain_timeout=Duration(5.0)),
    )


@asynccontextmanager
async def _proxy(cfg: ProxyConfig, app, backend: MemoryBackend | None = None):
    backend = backend or MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        backend.serve(*APP, app, nursery)
        await nursery.start(partial(rt.run, cfg, handle_signals=False))
        try:
            yield rt, backend
        finally:
            rt.drain()


async def _get(backend: MemoryBackend, path: str, out: list | None = None, *, close: bool = True):
    """One request on a connection of its own; (status, headers, seconds on the trio clock)."""
    t0 = trio.current_time()
    stream = await backend.connect(*PROXY)
    conn = "connection: close\r\n" if close else ""
    await stream.send_all(f"GET http://reviews:9080{path} HTTP/1.1\r\nhost: reviews:9080\r\n{conn}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:])}
    res = (int(head[0].split()[1]), headers, trio.current_time() - t0)
    await stream.aclose()
    if out is not None:
        out.append(res)
    return res


def _cs(rt):
    return rt.stats.cluster(CLUSTER)


# ------------------------------------------------------------------ retries


async def test_a_503_is_retried_and_the_second_try_answers(autojump_clock):
    class Flaky(H1App):
        async def __call__(self, stream):
            if not self.requests:  # the first request only
                self.requests.append("first")
                await stream.receive_some()
                await stream.send_all(b"HTTP/1.1 503 X\r\ncontent-length: 0\r\n\r\n")
                return
            await super().__call__(stream)

    app = Flaky()
    async with _proxy(_config(retries=HTTPRetry(attempts=2, retry_on="5xx")), app) as (rt, backend):
        status, headers, _ = await _get(backend, "/")
    assert status == 200
    assert app.requests == ["first", "/"]
    assert _cs(rt).rq_retry == 1


async def test_connect_failure_is_retried_on_the_other_endpoint_then_given_up_as_503_uf(autojump_clock):
    app = H1App()
    dead = ("10.0.0.9", 9080)  # nothing serves it: refused
    cfg = _config(retries=HTTPRetry(attempts=1, retry_on="connect-failure"), endpoints=(dead,))
    async with _proxy(cfg, app) as (rt, backend):
        status, headers, _ = await _get(backend, "/")
    assert status == 503 and headers["x-meshctl-reason"] == "upstream connect failure"
    assert backend.connects.count(dead) == 2  # the try and its one retry
    assert rt.stats.flags["UF"] == 1


async def test_per_try_timeout_cuts_a_stalled_try_and_the_retry_answers(autojump_clock):
    class StallOnce(H1App):
        async def __call__(self, stream):
            if not self.requests:
                self.requests.append("stalled")
                await stream.receive_some()
                await trio.sleep(60)
                return
            await super().__call__(stream)

    app = StallOnce()
    retry = HTTPRetry(attempts=1, per_try_timeout=Duration(2.0), retry_on="5xx")
    async with _proxy(_config(retries=retry), app) as (rt, backend):
        status, _, took = await _get(backend, "/")
    assert status == 200
    assert app.requests == ["stalled", "/"]
    assert 2.0 <= took < 2.5  # the per-try timeout, plus at most one backoff (25 ms)


async def test_per_try_timeout_without_retries_left_is_504_ut(autojump_clock):
    retry = HTTPRetry(attempts=1, per_try_timeout=Duration(1.0), retry_on="5xx")
    async with _proxy(_config(retries=retry), H1App()) as (rt, backend):
        status, headers, took = await _get(backend, "/?ms=5000")
    assert status == 504 and headers["x-meshctl-reason"] == "upstream timeout"
    assert 2.0 <= took < 2.5  # two tries of one second each
    assert rt.stats.flags["UT"] == 1


# ------------------------------------------------------------------ the retry budget (http.maxRetries)


@pytest.mark.parametrize("protocol,app_class", [("http", H1App), ("http2", H2App)])
async def test_the_retry_budget_caps_retries_in_flight_for_both_upstream_protocols(autojump_clock, protocol,
                                                                                   app_class):
    app = app_class()
    cfg = _config(protocol=protocol, retries=HTTPRetry(attempts=2, retry_on="5xx"),
                  pool=ConnectionPoolSettings(http=HTTPSettings(max_retries=1)))
    async with _proxy(cfg, app) as (rt, backend):
        results: list = []
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(_get, backend, "/?ms=300&status=503", results)
        lim = rt.snapshot.limiters[CLUSTER]
        assert not lim.retry_holders and lim.breaker.retries == 0  # every hold released
    assert [r[0] for r in results] == [503, 503]  # the upstream's own 503s
    assert len(app.requests) == 4  # one request retried twice, the other's retry found no budget
    assert _cs(rt).rq_retry == 2 and _cs(rt).rq_retry_overflow == 1


# ------------------------------------------------------------------ circuit breaking


async def test_over_the_connection_limits_a_request_overflows_at_once_with_503_uo(autojump_clock):
    app = H1App()
    pool = ConnectionPoolSettings(tcp=TCPSettings(max_connections=1),
                                  http=HTTPSettings(http1_max_pending_requests=1))
    async with _proxy(_config(pool=pool), app) as (rt, backend):
        results: list = []
        async with trio.open_nursery() as n:
            n.start_soon(_get, backend, "/hold?ms=1000", results)
            await trio.sleep(0.1)  # it holds the only connection
            n.start_soon(_get, backend, "/queued", results)  # waits for that connection
            await trio.sleep(0.1)
            n.start_soon(_get, backend, "/over", results)  # finds the queue full
    by_status = sorted((r[0], r[1].get("x-meshctl-reason", "")) for r in results)
    assert by_status == [(200, ""), (200, ""), (503, "upstream overflow")]
    over = [r for r in results if r[0] == 503][0]
    assert over[2] < 0.5  # answered at once, not after the held request
    assert app.connections == 1 and app.requests == ["/hold?ms=1000", "/queued"]
    assert rt.stats.flags["UO"] == 1


# ------------------------------------------------------------------ drain


async def test_drain_lets_the_busy_request_finish_closes_idle_connections_and_stops(autojump_clock):
    backend = MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    app = H1App()
    results: list = []
    async with trio.open_nursery() as outer:
        backend.serve(*APP, app, outer)
        async with trio.open_nursery() as n:
            await n.start(partial(rt.run, _config(), handle_signals=False))
            idle = await backend.connect(*PROXY)  # a kept-alive client between requests
            await idle.send_all(b"GET http://reviews:9080/ HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
            got = b""
            while b"from the app" not in got:
                got += await idle.receive_some()
            n.start_soon(_get, backend, "/slow?ms=2000", results)
            await trio.sleep(0.5)  # the slow request is at the upstream
            t0 = trio.current_time()
            rt.drain()
            assert await idle.receive_some() == b""  # idle: closed at once
            with pytest.raises(UpstreamConnectError, match="refused"):
                await backend.connect(*PROXY)  # the listener is closed: no new connections
        # rt.run returned: the busy request finished first, with its response
        outer.cancel_scope.cancel()
    assert [r[0] for r in results] == [200]
    assert results[0][1]["connection"] == "close"
    assert 1.4 < trio.current_time() - t0 < 2.0


# ------------------------------------------------------------------ a client that hangs up


async def test_a_request_whose_client_hung_up_is_abandoned_through_the_backend(autojump_clock):
    app = H1App()
    async with _proxy(_config(), app) as (rt, backend):
        stream = await backend.connect(*PROXY)
        await stream.send_all(b"GET http://reviews:9080/?ms=30000 HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        await stream.send_eof()  # the client gives up while the upstream works
        t0 = trio.current_time()
        assert await stream.receive_some() == b""  # closed without an answer...
        took = trio.current_time() - t0
    assert 1.0 <= took < 1.6  # ...by the watchdog, once the request is older than CLIENT_GONE_AFTER
    assert app.requests == ["/?ms=30000"]
    assert rt.stats.flags["DC"] >= 1


# ------------------------------------------------------------------ codecs freed with their connections


class ClosingH1App(H1App):
    """Answers each request with ``connection: close``: the proxy's pool discards the connection."""

    async def __call__(self, stream) -> None:
        self.connections += 1
        async for head in request_heads(stream):
            self.requests.append(head.split(b"\r\n", 1)[0].split(b" ")[1].decode())
            await stream.send_all(b"HTTP/1.1 200 X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            return


async def test_the_codecs_of_closed_connections_are_freed_with_them_not_left_to_the_cyclic_gc(autojump_clock):
    # llhttp's parser holds its codec's bound methods: a codec its connection did not
    # release waits for the cyclic GC, with all it holds (http1.release)
    import gc

    def codecs_in_garbage() -> int:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            n = sum(1 for o in gc.garbage if type(o).__name__ in ("H1Server", "H1Client"))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return n

    app = ClosingH1App()
    gc.collect()
    gc.disable()
    try:
        async with _proxy(_config(), app) as (rt, backend):
            for i in range(3):  # each on a connection of its own, both legs closed after it
                status, _, _ = await _get(backend, f"/{i}")
                assert status == 200
            await trio.sleep(1)  # (the proxy's side of the last connection ends)
            assert app.connections == 3 and rt.stats.listener("outbound").cx_total == 3
            assert codecs_in_garbage() == 0
    finally:
        gc.enable()


# ------------------------------------------------------------------ how many idle connections are kept


@pytest.mark.parametrize("limits", [None, ConnectionPoolSettings(tcp=TCPSettings(max_connections=1000))],
                         ids=["shared-pool", "cluster-limiter"])
async def test_a_burst_of_200_concurrent_requests_finds_its_200_connections_again(autojump_clock, limits):
    # the connections a burst needed stay idle for the next one: closing those above a cap
    # (it was 128) and opening them again churned ports into TIME_WAIT at every burst
    app = H1App()
    async with _proxy(_config(pool=limits), app) as (rt, backend):
        for burst in range(2):
            results: list = []
            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(_get, backend, f"/b{burst}-{i}?ms=50", results)
            assert [r[0] for r in results] == [200] * 200
            assert app.connections == 200, burst
    assert len(app.requests) == 400 and _cs(rt).cx_total == 200


# ------------------------------------------------------------------ pooled connections the upstream closed


class ClosesIdleOnce(H1App):
    """Keep-alive upstream that, on its first connections, closes each one a moment after
    answering (a sidecar that drains, a server that restarts): the proxy's pool still holds
    them idle, too young (pool.PEEK_AFTER) to be checked before reuse. Later connections stay."""

    def __init__(self, closing: int) -> None:
        super().__init__()
        self.closing = closing  # how many of the first connections close when idle

    async def __call__(self, stream) -> None:
        self.connections += 1
        closes = self.connections <= self.closing
        async for head in request_heads(stream):
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            self.requests.append(target)
            await trio.sleep(int(_query(target).get("ms", "0")) / 1000)
            await stream.send_all(b"HTTP/1.1 200 X\r\ncontent-length: 2\r\n\r\nok")
            if closes:
                await trio.sleep(0.05)
                return  # (closed by the backend)


@pytest.mark.parametrize("limits", [None, ConnectionPoolSettings(tcp=TCPSettings(max_connections=8))],
                         ids=["shared-pool", "cluster-limiter"])
async def test_a_second_dead_pooled_connection_in_one_request_is_not_an_upstream_reset(autojump_clock, limits):
    # two idle connections to the upstream, both closed by it; the first try finds one dead
    # (Stale: tried again at once), the try after it must not take the other on trust: it
    # was a 503 UR (a reset, which the default retryOn does not retry) for a GET the upstream
    # never saw
    from meshctl.proxy.pool import PEEK_AFTER

    app = ClosesIdleOnce(closing=2)
    async with _proxy(_config(pool=limits), app) as (rt, backend):
        results: list = []
        async with trio.open_nursery() as n:  # two at once: two pooled connections
            n.start_soon(_get, backend, "/a?ms=10", results)
            n.start_soon(_get, backend, "/b?ms=10", results)
        assert [r[0] for r in results] == [200, 200] and app.connections == 2
        await trio.sleep(0.1)  # both closed by the upstream, still young in the pool
        assert 0.1 < PEEK_AFTER
        status, headers, _ = await _get(backend, "/c")
    assert (status, headers.get("x-meshctl-reason")) == (200, None)
    assert sorted(app.requests) == ["/a?ms=10", "/b?ms=10", "/c"]  # the dead connections saw no "/c"
    assert app.connections == 3  # the third on a new connection
    assert rt.stats.flags["UR"] == 0


async def test_a_young_pooled_connection_is_taken_on_trust_unless_the_caller_asks_for_a_check(autojump_clock):
    from meshctl.protocol.http1 import H1Client
    from meshctl.proxy.pool import PEEK_AFTER, UpstreamConn, UpstreamPool
    from meshctl.proxy.stats import ClusterStats
    from meshctl.proxy.testing import memory_connection

    pool = UpstreamPool(limits=None, backend=MemoryBackend())
    stats = ClusterStats(CLUSTER)
    pairs = [memory_connection() for _ in range(2)]
    for ours, _ in pairs:
        stats.cx_active += 1
        conn = UpstreamConn(ours, H1Client(), APP, stats)
        conn.idle_since = trio.current_time()
        pool.idle.setdefault(APP, []).append(conn)
    for _, theirs in pairs:
        theirs.close_now()  # the upstream closed both
    await trio.sleep(PEEK_AFTER / 2)
    trusted = pool.reuse(*APP)  # the first try's way: no syscall for a connection this young
    assert trusted is not None and trusted.stream is pairs[1][0]
    assert pool.reuse(*APP, check=True) is None  # a later try's: the dead one is closed, not handed out
    assert pairs[0][0].closed and stats.cx_active == 1 and not pool.idle[APP]
