"""The retry budget (DestinationRule ``http.maxRetries``) covers HTTP/2 upstreams
exactly as it covers HTTP/1.1 ones: one forwarder decides every retry, whatever
the upstream protocol (issue 12: HTTP/2 5xx retries used to escape the budget).

The upstream is a small HTTP/2 (h2c prior knowledge) server on the h2 library
in the test's trio loop, answering ``?ms=`` later with ``?status=``, and
counting the requests it reads.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshctl.model.istio import ConnectionPoolSettings, HTTPRetry, HTTPSettings, TrafficPolicy

from proxy_testkit import cluster, config, free_port, outbound_listener, route_to, running_proxy, vhost

CLUSTER = "outbound|9090||grpcsvc.default.svc.cluster.local"


class SlowH2App:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        lock = trio.Lock()

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        async def answer(sid: int, target: str) -> None:
            q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            await trio.sleep(int(q.get("ms", "0")) / 1000)
            conn.send_headers(sid, [(":status", q.get("status", "200"))], end_stream=True)
            await flush()

        try:
            async with trio.open_nursery() as n:
                await flush()
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        n.cancel_scope.cancel()
                        return
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            target = dict(ev.headers)[":path"]
                            self.requests.append(target)
                            n.start_soon(answer, ev.stream_id, target)
                    await flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.fixture
async def slow_h2(nursery):
    app = SlowH2App()
    listeners = await nursery.start(partial(trio.serve_tcp, app.handle, 0, host="127.0.0.1"))
    app.port = listeners[0].socket.getsockname()[1]
    return app


def _cfg(port: int, lp: int, max_retries: int):
    c = cluster("grpcsvc", 9090, [("127.0.0.1", port)], protocol="http2")
    pool = ConnectionPoolSettings(http=HTTPSettings(max_retries=max_retries))
    c = dataclasses.replace(c, traffic_policy=TrafficPolicy(connection_pool=pool))
    retry = HTTPRetry(attempts=2, retry_on="5xx")
    return config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("grpcsvc", 9090, (route_to("grpcsvc", 9090, retries=retry),))],
        clusters=[c],
    )


async def _get(lp: int, path: str, out: list) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", lp)
    async with stream:
        await stream.send_all(
            f"GET http://grpcsvc:9090{path} HTTP/1.1\r\nhost: grpcsvc:9090\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    out.append(int(data.split(b" ", 2)[1]))


def _counter(rt, name: str) -> int:
    return getattr(rt.stats.cluster(CLUSTER), name)


async def test_http2_upstream_5xx_retries_count_against_max_retries(slow_h2):
    lp = free_port()
    async with running_proxy(_cfg(slow_h2.port, lp, max_retries=1)) as rt:
        results: list[int] = []
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(_get, lp, "/?ms=300&status=503", results)
        # both end with the upstream's own 503
        assert results == [503, 503]
        # one request made its two retries; the other's first retry found the budget taken
        assert len(slow_h2.requests) == 4
        assert _counter(rt, "rq_retry") == 2
        assert _counter(rt, "rq_retry_overflow") == 1


async def test_http2_upstream_retries_within_the_budget_still_happen(slow_h2):
    lp = free_port()
    async with running_proxy(_cfg(slow_h2.port, lp, max_retries=3)) as rt:
        results: list[int] = []
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(_get, lp, "/?ms=100&status=503", results)
        assert results == [503, 503]
        assert len(slow_h2.requests) == 6
        assert _counter(rt, "rq_retry_overflow") == 0
