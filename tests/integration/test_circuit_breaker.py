"""DestinationRule connectionPool (circuit breaking) in the proxy, on real sockets.

The upstream here is a small trio HTTP/1.1 server in the test's loop that
answers each request after ``?ms=`` milliseconds with status ``?status=``
and counts the connections it accepts and the requests it reads, so that
what the breaker did shows at the upstream.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from meshctl.loader.resources import load_resources_text
from meshctl.model.base import Duration
from meshctl.model.istio import (
    ConnectionPoolSettings,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPSettings,
    StringMatch,
    TCPSettings,
    TrafficPolicy,
)
from meshctl.pilot.compile import merge_policy

from meshctl.model.proxyconfig import Listener, fqdn

from proxy_testkit import cluster, config, free_port, outbound_listener, route_to, running_proxy, vhost

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"


class SlowUpstream:
    def __init__(self) -> None:
        self.accepts = 0
        self.closed = 0  # connections that ended (the peer closed them, or they broke)
        self.requests: list[str] = []
        self.port = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepts += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                self.requests.append(target)
                q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
                await trio.sleep(int(q.get("ms", "0")) / 1000)
                status = int(q.get("status", "200"))
                body = b"slow upstream\n"
                await stream.send_all(
                    b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, len(body), body)
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed += 1
            await stream.aclose()


@pytest.fixture
async def slow(nursery):
    up = SlowUpstream()
    listeners = await nursery.start(partial(trio.serve_tcp, up._handle, 0, host="127.0.0.1"))
    up.port = listeners[0].socket.getsockname()[1]
    return up


def _pool(*, max_connections=None, connect_timeout=None, pending=None, h2_max=None, per_connection=None,
          max_retries=None, idle_timeout=None) -> ConnectionPoolSettings:
    return ConnectionPoolSettings(
        tcp=TCPSettings(max_connections=max_connections,
                        connect_timeout=Duration(connect_timeout) if connect_timeout is not None else None),
        http=HTTPSettings(http1_max_pending_requests=pending, http2_max_requests=h2_max,
                          max_requests_per_connection=per_connection, max_retries=max_retries,
                          idle_timeout=Duration(idle_timeout) if idle_timeout is not None else None),
    )


def _cfg(port: int, lp: int, pool: ConnectionPoolSettings | None, *, version: str = "v1", retries=None,
         endpoints=None):
    c = cluster("reviews", 9080, endpoints or [("127.0.0.1", port)])
    if pool is not None:
        c = dataclasses.replace(c, traffic_policy=TrafficPolicy(connection_pool=pool))
    return config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, retries=retries),))],
        clusters=[c],
        version=version,
    )


async def _stats(rt) -> str:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{rt.admin_port}/stats")
    return r.text


def _metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in /stats"
    return float(m.group(1))


def _cl(name: str, text: str) -> float:
    return _metric(text, name, f'cluster="{CLUSTER}"')


async def _wait(cond, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


async def _get(lp: int, path: str, out: list | None = None):
    """One request on a connection of its own (raw socket: cheap to open many at once);
    (status, headers, body, seconds)."""
    t0 = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", lp)
    async with stream:
        await stream.send_all(
            f"GET http://reviews:9080{path} HTTP/1.1\r\nhost: reviews:9080\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    res = (int(lines[0].split()[1]), headers, body.decode("latin-1"), trio.current_time() - t0)
    if out is not None:
        out.append(res)
    return res


# ------------------------------------------------------------------ overflow


async def test_over_the_limits_requests_get_503_uo_at_once_and_stats_count_them(slow):
    lp = free_port()
    cfg = _cfg(slow.port, lp, _pool(max_connections=1, pending=1))
    async with running_proxy(cfg) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            n.start_soon(_get, lp, "/?ms=4000", results)
            await _wait(lambda: len(slow.requests) == 1)  # holds the only connection
            for _ in range(4):  # one queues for it, three overflow
                n.start_soon(_get, lp, "/?ms=10", results)
        text = await _stats(rt)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503, 503]
    for status, headers, body, took in results:
        if status == 503:
            assert headers["x-meshctl-reason"] == "upstream overflow"
            assert "http1MaxPendingRequests (1)" in body
            assert took < 2  # answered at once, not after the slow request (4 s); slack for a loaded machine
    # the queued request was handed the first request's connection
    assert slow.accepts == 1 and len(slow.requests) == 2
    assert _cl("meshctl_cluster_upstream_rq_pending_overflow", text) == 3
    assert _cl("meshctl_cluster_upstream_cx_overflow", text) == 1
    assert _metric(text, "meshctl_response_flags_total", 'flag="UO"') == 3
    # Istio's standard metric carries the flag too
    uo = [ln for ln in text.splitlines()
          if ln.startswith("istio_requests_total{") and 'response_flags="UO"' in ln and 'response_code="503"' in ln]
    assert len(uo) == 1 and uo[0].endswith(" 3"), uo
    # nothing left in flight or queued
    assert _cl("meshctl_cluster_upstream_rq_active", text) == 0
    assert _cl("meshctl_cluster_upstream_rq_pending_active", text) == 0


async def test_http2_max_requests_caps_requests_in_flight(slow):
    lp = free_port()
    cfg = _cfg(slow.port, lp, _pool(h2_max=2))
    async with running_proxy(cfg) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            for _ in range(2):  # held long enough that the third surely finds both in flight
                n.start_soon(_get, lp, "/?ms=3000", results)
            await _wait(lambda: len(slow.requests) == 2)
            n.start_soon(_get, lp, "/?ms=0", results)
        text = await _stats(rt)
    assert sorted(r[0] for r in results) == [200, 200, 503]
    over = next(r for r in results if r[0] == 503)
    assert "http2MaxRequests (2)" in over[2]
    assert _cl("meshctl_cluster_upstream_rq_pending_overflow", text) == 1


async def test_without_connection_pool_nothing_overflows(slow):
    lp = free_port()
    cfg = _cfg(slow.port, lp, None)
    async with running_proxy(cfg) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            for _ in range(6):
                n.start_soon(_get, lp, "/?ms=200", results)
        text = await _stats(rt)
    assert [r[0] for r in results] == [200] * 6
    assert _cl("meshctl_cluster_upstream_rq_pending_overflow", text) == 0
    assert 'meshctl_cluster_upstream_rq_active{' not in text  # no gauges for unlimited clusters


# ------------------------------------------------------------------ connections


async def test_max_requests_per_connection_1_opens_a_connection_per_request(slow):
    lp = free_port()
    async with running_proxy(_cfg(slow.port, lp, _pool(per_connection=1))):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            for i in range(5):
                assert (await c.get(f"http://reviews:9080/{i}")).status_code == 200
    assert len(slow.requests) == 5
    assert slow.accepts == 5


async def test_limited_cluster_keeps_connections_alive_across_requests(slow):
    lp = free_port()
    async with running_proxy(_cfg(slow.port, lp, _pool(max_connections=2, pending=10))):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            for i in range(5):
                assert (await c.get(f"http://reviews:9080/{i}")).status_code == 200
    assert slow.accepts == 1


async def test_idle_timeout_closes_idle_upstream_connections(slow):
    lp = free_port()
    async with running_proxy(_cfg(slow.port, lp, _pool(idle_timeout=0.3))):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            assert (await c.get("http://reviews:9080/a")).status_code == 200
            assert (await c.get("http://reviews:9080/b")).status_code == 200
            assert slow.accepts == 1
            # the proxy closes it once idle for 0.3 s: waited for (bounded), not slept on
            await _wait(lambda: slow.closed == 1)
            assert (await c.get("http://reviews:9080/c")).status_code == 200
    assert slow.accepts == 2


async def test_connect_timeout_from_the_destination_rule(slow):
    blackhole, fillers = _blackhole()
    bport = blackhole.getsockname()[1]
    await trio.sleep(0.1)
    lp = free_port()
    cfg = _cfg(slow.port, lp, _pool(connect_timeout=0.25), endpoints=[("127.0.0.1", bport)])
    # the proxy-wide connect timeout far from the rule's, so a loaded machine cannot blur the two
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, connect_timeout=Duration(10.0)))
    try:
        async with running_proxy(cfg):
            status, headers, body, took = await _get(lp, "/")
    finally:
        for s in fillers:
            s.close()
        blackhole.close()
    assert status == 503
    assert headers["x-meshctl-reason"] == "upstream connect failure"
    assert "timed out after 0.25s" in body
    assert took < 4  # the settings' connect timeout (10 s) did not apply


async def test_a_queued_request_that_times_out_leaves_the_queue(slow):
    lp = free_port()
    c = dataclasses.replace(cluster("reviews", 9080, [("127.0.0.1", slow.port)]),
                            traffic_policy=TrafficPolicy(connection_pool=_pool(max_connections=1, pending=1)))
    routes = (  # /waits has a 0.3 s route timeout, the rest none
        route_to("reviews", 9080, timeout=0.3, match=(HTTPMatchRequest(uri=StringMatch(prefix="/waits")),)),
        route_to("reviews", 9080),
    )
    cfg = config(listeners=[outbound_listener(lp)], vhosts=[vhost("reviews", 9080, routes)], clusters=[c])
    async with running_proxy(cfg) as rt:
        async with trio.open_nursery() as n:
            n.start_soon(_get, lp, "/hold?ms=4000")
            await _wait(lambda: len(slow.requests) == 1)
            status, headers, body, took = await _get(lp, "/waits")
            # still queued behind /hold when its time ran out
            assert status == 504 and headers["x-meshctl-reason"] == "upstream timeout"
            assert took < 2  # its 0.3 s, not /hold's 4 s; slack for a loaded machine
            assert _gauge(rt, "waiting") == "0" and _gauge(rt, "active") == "1"
        assert "/waits" not in slow.requests
        assert _gauge(rt, "pending") == "0" and _gauge(rt, "active") == "0"
        # nothing leaked: the cluster still serves, one request at a time on one connection
        for _ in range(3):
            assert (await _get(lp, "/after"))[0] == 200
    assert slow.accepts == 1


async def test_a_failed_connect_lets_the_next_queued_request_open_one():
    blackhole, fillers = _blackhole()
    bport = blackhole.getsockname()[1]
    lp = free_port()
    cfg = _cfg(0, lp, _pool(max_connections=1, pending=5, connect_timeout=0.3), endpoints=[("127.0.0.1", bport)])
    try:
        async with running_proxy(cfg) as rt:
            results: list = []
            async with trio.open_nursery() as n:
                n.start_soon(_get, lp, "/first", results)
                await _wait(lambda: _gauge(rt, "connecting") == "1")
                n.start_soon(_get, lp, "/second", results)
                await _wait(lambda: _gauge(rt, "waiting") == "1")
            assert _gauge(rt, "connections") == "0" and _gauge(rt, "pending") == "0"
    finally:
        for s in fillers:
            s.close()
        blackhole.close()
    assert [r[0] for r in results] == [503, 503]
    assert all("timed out after 0.3s" in r[2] for r in results)
    # the second one waited for the first connect, then tried its own
    assert results[1][3] > 0.5


async def test_a_queued_request_for_another_endpoint_gets_a_connection(upstreams_pair):
    a, b = upstreams_pair
    lp = free_port()
    cfg = _cfg(0, lp, _pool(max_connections=1, pending=1), endpoints=[("127.0.0.1", a.port), ("127.0.0.1", b.port)])
    async with running_proxy(cfg):
        for i in range(4):  # round robin: each request goes to the endpoint the idle connection is not to
            status, _, _, took = await _get(lp, f"/{i}")
            assert status == 200 and took < 2
    assert a.accepts == 2 and b.accepts == 2


@pytest.fixture
async def upstreams_pair(nursery):
    out = []
    for _ in range(2):
        up = SlowUpstream()
        listeners = await nursery.start(partial(trio.serve_tcp, up._handle, 0, host="127.0.0.1"))
        up.port = listeners[0].socket.getsockname()[1]
        out.append(up)
    return out


def _blackhole():
    """A listening socket that never accepts, its backlog filled: further SYNs go unanswered."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    bport = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", bport))
        fillers.append(s)
    return blackhole, fillers


async def test_tcp_max_connections_closes_connections_over_the_limit(nursery):
    async def echo(stream):
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    up_port = listeners[0].socket.getsockname()[1]
    lp = free_port()
    bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                    service=fqdn("db"), service_port=5432)
    c = dataclasses.replace(cluster("db", 5432, [("127.0.0.1", up_port)], protocol="tcp"),
                            traffic_policy=TrafficPolicy(connection_pool=_pool(max_connections=1)))
    async with running_proxy(config(listeners=[bind], clusters=[c])) as rt:

        async def roundtrip(s) -> bytes:
            await s.send_all(b"ping")
            with trio.fail_after(5):
                return await s.receive_some(65536)

        first = await trio.open_tcp_stream("127.0.0.1", lp)
        assert await roundtrip(first) == b"ping"
        second = await trio.open_tcp_stream("127.0.0.1", lp)
        with trio.fail_after(5):  # closed by the proxy without a byte
            try:
                got = await second.receive_some(65536)
            except trio.BrokenResourceError:
                got = b""
        assert got == b""
        await second.aclose()
        assert await roundtrip(first) == b"ping"  # the first is unaffected
        await first.aclose()
        # its slot is free again once it closed
        await _wait(lambda: c.name in rt.snapshot.limiters and rt.snapshot.limiters[c.name].tcp_connections == 0)
        third = await trio.open_tcp_stream("127.0.0.1", lp)
        assert await roundtrip(third) == b"ping"
        await third.aclose()
        text = await _stats(rt)
    assert _metric(text, "meshctl_cluster_upstream_cx_overflow", f'cluster="{c.name}"') == 1
    assert _metric(text, "meshctl_response_flags_total", 'flag="UO"') == 1


# ------------------------------------------------------------------ retries


async def test_max_retries_caps_retries_in_flight_across_requests(slow):
    lp = free_port()
    retry = HTTPRetry(attempts=2, retry_on="5xx")
    async with running_proxy(_cfg(slow.port, lp, _pool(max_retries=1), retries=retry)) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            for _ in range(2):  # tries of 1 s: the two requests' retries overlap even if one starts late
                n.start_soon(_get, lp, "/?ms=1000&status=503", results)
        text = await _stats(rt)
    # both fail in the end, with the upstream's own 503 (a retry not made is no overflow)
    assert [r[0] for r in results] == [503, 503]
    assert all("x-meshctl-reason" not in r[1] for r in results)
    # one request made its two retries, the other none: its retry found the budget taken
    assert len(slow.requests) == 4
    assert _cl("meshctl_cluster_upstream_rq_retry_overflow", text) == 1
    assert _cl("meshctl_cluster_upstream_rq_retry", text) == 2
    assert _cl("meshctl_cluster_upstream_rq_retry_active", text) == 0


async def test_retries_within_the_budget_still_happen(slow):
    lp = free_port()
    retry = HTTPRetry(attempts=2, retry_on="5xx")
    async with running_proxy(_cfg(slow.port, lp, _pool(max_retries=3), retries=retry)) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(_get, lp, "/?ms=100&status=503", results)
        text = await _stats(rt)
    assert len(slow.requests) == 6
    assert _cl("meshctl_cluster_upstream_rq_retry_overflow", text) == 0


# ------------------------------------------------------------------ config swaps


async def test_breaker_survives_config_swaps_and_takes_new_limits(slow):
    lp = free_port()
    pool = _pool(max_connections=1, pending=1)
    async with running_proxy(_cfg(slow.port, lp, pool)) as rt:
        results: list = []
        async with trio.open_nursery() as n:
            n.start_soon(_get, lp, "/hold?ms=4000", results)  # busy through every step below
            await _wait(lambda: len(slow.requests) == 1)
            n.start_soon(_get, lp, "/queued?ms=0", results)
            await _wait(lambda: "1" == _gauge(rt, "pending"))
            # same limits, new version: the counts carry over, so the next request overflows
            rt.apply(_cfg(slow.port, lp, pool, version="v2"))
            status, headers, body, _ = await _get(lp, "/over")
            assert status == 503 and headers["x-meshctl-reason"] == "upstream overflow"
            # raised limits take effect at once: a second connection opens while the first is busy
            rt.apply(_cfg(slow.port, lp, _pool(max_connections=5, pending=5), version="v3"))
            status, *_ = await _get(lp, "/raised")
            assert status == 200
            assert slow.accepts == 2
            # connectionPool removed: back to the shared pool, no limits
            rt.apply(_cfg(slow.port, lp, None, version="v4"))
            status, *_ = await _get(lp, "/unlimited")
            assert status == 200
        text = await _stats(rt)
    assert sorted(r[0] for r in results) == [200, 200]
    assert "/over" not in slow.requests
    assert _cl("meshctl_cluster_upstream_rq_pending_overflow", text) == 1


def _gauge(rt, attr: str) -> str:
    b = rt.stats.cluster(CLUSTER).breaker
    return str(getattr(b, attr)) if b is not None else ""


# ------------------------------------------------------------------ Istio's circuit-breaking task

ISTIO_TASK_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""


def _fortio() -> str | None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "tools" / "fortio.sh"
    tools = Path(os.environ.get("MESHCTL_TOOLS", Path.home() / ".cache" / "meshctl-tools"))
    if (tools / "bin" / "fortio").exists() and script.exists():
        r = subprocess.run([str(script)], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return None


async def test_istio_circuit_breaking_task_with_fortio(slow, proxy_process):
    """Istio's task: fortio -c 3 -qps 0 -n 30 through the client's sidecar (a real
    `meshctl proxy run` process) gets both 200s and 503 overflows, and the sidecar's
    stats count them; outlier detection ejects nobody for overflows."""
    fortio = _fortio()
    if fortio is None:
        pytest.skip("fortio not installed (scripts/tools/fortio.sh)")
    (dr_res,) = load_resources_text(ISTIO_TASK_DR, "destination-rule-reviews-cb.yaml")
    policy = merge_policy(dr_res.spec, None, 9080)
    assert policy.connection_pool.tcp.max_connections == 1
    lp = free_port()
    c = dataclasses.replace(cluster("reviews", 9080, [("127.0.0.1", slow.port)]), traffic_policy=policy)
    cfg = config(listeners=[outbound_listener(lp)],
                 vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))], clusters=[c])
    proc = await trio.to_thread.run_sync(proxy_process, cfg)
    r = await trio.run_process(
        [fortio, "load", "-c", "3", "-qps", "0", "-n", "30", "-loglevel", "Warning",
         "-H", "Host: reviews:9080", f"http://127.0.0.1:{lp}/get?ms=50"],  # held 50 ms: three clients surely overlap on a loaded machine
        capture_stdout=True, capture_stderr=True, check=False,
    )
    out = (r.stdout + r.stderr).decode()
    codes = {int(k): int(v) for k, v in re.findall(r"^Code (\d+) : (\d+)", out, re.M)}
    assert codes.get(200, 0) > 0, out
    assert codes.get(503, 0) > 0, out
    assert codes[200] + codes[503] == 30, out
    async with httpx.AsyncClient() as client:
        text = (await client.get(proc.admin + "/stats")).text
    assert _cl("meshctl_cluster_upstream_rq_pending_overflow", text) == codes[503]
    assert _metric(text, "meshctl_response_flags_total", 'flag="UO"') == codes[503]
    # every request that got through had a connection of its own (maxRequestsPerConnection 1)
    assert slow.accepts == codes[200] == len(slow.requests)
