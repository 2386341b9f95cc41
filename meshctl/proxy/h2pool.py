"""Upstream HTTP/2: multiplexed connections per endpoint, and one try of a request on them.

When a cluster speaks HTTP/2 (``Cluster.protocol`` http2/grpc, a
DestinationRule ``h2UpgradePolicy: UPGRADE``, or ``useClientProtocol`` with an
HTTP/2 client; ``wants_h2``) the forwarder (forward.py) runs its tries with
``H2Exchange`` here instead of the HTTP/1.1 one (h1upstream.py). The exchange
only carries the try: deadlines, retries, the retry budget and outlier
reports are the forwarder's, the same as for HTTP/1.1. The downstream side is
unchanged: ``rq.server`` is an H1Server or an h2conn stream adapter, and both
take the same calls.

``H2Pool`` keeps a few connections per (endpoint, TLS) key; a request takes a
stream on the first connection with room (``can_open_stream``, and at most
``maxConcurrentStreams`` from the DestinationRule), opening another
connection only when all are full. ``http2MaxRequests`` caps the cluster's
requests in flight (over it: 503 UO, as Envoy's circuit breaker). Each
connection has a reader task (in the runtime's connection nursery) that feeds
the codec and routes events to streams, and a writer task that writes the
socket (a request alone on its connection is written by its own task when the
writer is idle: outbuf.py), so frames leave in codec order and a cancelled
request never leaves half a frame behind.

Flow control: upstream Data is acked (``ack_received``) after it was written
downstream; request body is read from the client only while the upstream
stream has send window. A refused stream (REFUSED_STREAM, above GOAWAY) is
a ``refused-stream`` failure: retried when the policy allows.

Compiled with mypyc (setup.py): native classes with typed attributes, so the
calls into the codec (protocol/http2.py) and the request (request.py) are direct
C calls. Per try, no task switch beyond the ones the exchange needs: a pooled
connection with room is taken without waiting, the request is not waited for
until written (a connection that dies resets its streams), and without a
perTryTimeout no cancel scope is made.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import meshctl.proxy.aio as aio
from ..protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, Reset, ResponseHead
from ..protocol.grpc import grpc_status_from
from ..protocol.http1 import H1Server
from ..protocol.http2 import GoAway, H2Client, H2Event, H2Limits, H2Reset, WindowUpdated, h1_head_to_h2
from . import stats as F
from .backend import NetworkBackend
from .errors import DownstreamGone, PeerGone, receive_some
from .forward import RELAYED, Attempt, Failed, Retried, TryResult
from .identity import upstream_tls
from .limits import PoolOverflow
from .outbuf import OutBuffer, Wakeup
from .request import Request, response_headers
from .snapshot import ClusterState
from .dns import upstream_address
from .protocols import _http_settings, wants_h2
from .stream import UpstreamConnectError

log: Final = logging.getLogger("meshctl.proxy")
_INF: Final = math.inf

__all__ = ["H2Pool", "H2Upstream", "H2Exchange", "wants_h2"]


class _UpStream:
    """One request's stream on an upstream connection: its response events."""

    __slots__ = ("sid", "events", "pos", "wake", "window", "done")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.events: list[Any] = []
        self.pos = 0
        self.wake = Wakeup()  # next() waits for an event
        self.window = Wakeup()  # the body waits for send window
        self.done = False  # a final event (end or reset) arrived

    def push(self, ev: Any) -> None:
        self.events.append(ev)
        self.wake.set()

    def may_send(self) -> None:
        """The body may be sent on (window, or the connection is gone)."""
        self.window.set()

    def buffered(self) -> Any:
        if self.pos < len(self.events):
            ev = self.events[self.pos]
            self.pos += 1
            return ev
        return None

    async def next(self) -> Any:
        while self.pos >= len(self.events):
            self.events.clear()
            self.pos = 0
            await self.wake.wait()
        ev = self.events[self.pos]
        self.pos += 1
        return ev


class H2Upstream(OutBuffer):
    """One multiplexed upstream HTTP/2 connection."""

    __slots__ = ("pool", "key", "stats", "client", "streams", "scope", "reason", "idle_since")

    def __init__(self, pool: H2Pool, stream: Any, key: tuple[Any, ...], stats: Any) -> None:
        self.pool = pool
        self.key = key
        self.stats = stats
        self.client = H2Client(H2Limits(), now=aio.current_time)
        self.streams: dict[int, _UpStream] = {}
        self._init_out(stream)
        self.scope = aio.CancelScope()
        self.reason = ""
        self.idle_since: float = aio.current_time()

    # ------------------------------------------------------------ writing
    def emit(self, data: bytes) -> None:
        """Queue ``data`` and send it at once (``kick``: inline, or by the writer)."""
        super().emit(data)
        self.kick()

    async def flush(self) -> None:
        """Wait until everything emitted is written; PeerGone when the connection died."""
        await self.wait_written()
        if self.dead:
            raise PeerGone(self.reason or "upstream HTTP/2 connection closed")

    def put(self, data: bytes) -> None:
        """Queue ``data`` without waking the writer: the caller kicks before it parks or
        returns, so that a lone request's bytes may be written inline (outbuf.py)."""
        super().emit(data)

    def put_whole_body(self, sid: int, chunks: list[bytes], trailers: list[tuple[str, str]]) -> None:
        """Queue a request body already read whole (its HEADERS went without END_STREAM, there
        being a body or trailers): END_STREAM on the last DATA frame when there are no
        trailers, not on an empty DATA frame of its own (a frame and 9 bytes less per request;
        RFC 9113 6.1). ``kick()`` sends it."""
        client = self.client
        last = len(chunks) - 1
        for i, c in enumerate(chunks):
            self.put(client.data(sid, c, end_stream=i == last and not trailers))
        if trailers:
            self.put(client.end(sid, trailers))

    async def _writer(self) -> None:
        try:
            await self.write_loop()
        except PeerGone as exc:
            self.write_error(exc)

    def write_error(self, exc: PeerGone) -> None:
        """A write to the socket failed (the writer's, or a request's inline one: outbuf.py)."""
        self._die(f"write failed: {exc}")

    def solo(self) -> bool:
        return len(self.streams) <= 1

    # ------------------------------------------------------------ life
    @property
    def usable(self) -> bool:
        return not self.dead and self.client.can_open_stream

    def open(self, head: RequestHead, end_stream: bool) -> _UpStream:
        sid, out = self.client.request(head, end_stream=end_stream)
        st = _UpStream(sid)
        self.streams[sid] = st
        self.put(out)  # (the caller kicks)
        return st

    def finish(self, st: _UpStream, *, abort: bool) -> None:
        """The request is over: reset the stream if it is still open upstream."""
        if self.streams.pop(st.sid, None) is None:
            return
        if not self.streams:
            self.idle_since = aio.current_time()
        if abort and not self.dead:
            self.emit(self.client.reset(st.sid, "request abandoned"))
        if self.dead or (self.client.closed and not self.streams):
            self._die("")

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.reason = reason
        self._progress()
        for st in self.streams.values():
            st.push(Reset(reason or "upstream HTTP/2 connection closed", st.sid))
            st.may_send()
        self.pool._forget(self)
        self.scope.cancel()

    async def run(self, task_status: aio.TaskStatus[None] = aio.TASK_STATUS_IGNORED) -> None:
        """Reader and writer; returns when the connection is over (socket closed)."""
        try:
            with self.scope:
                async with aio.open_nursery() as n:
                    n.start_soon(self._writer)
                    self.emit(self.client.initiate())
                    task_status.started()
                    await self._read()
                    n.cancel_scope.cancel()
        finally:
            self._die(self.reason)
            self.stream.close_now()
            self.stats.cx_active -= 1

    async def _read(self) -> None:
        client = self.client
        while True:
            try:
                data = await receive_some(self.stream)
            except PeerGone as exc:
                self.reason = f"read failed: {exc}"
                return
            try:
                events = client.feed(data) if data else client.feed_eof()
            except ProtocolError as exc:
                log.info("upstream %s:%d HTTP/2 error: %s", self.key[0], self.key[1], exc)
                self.emit(client.data_to_send())
                with aio.move_on_after(1):
                    try:
                        await self.flush()
                    except PeerGone:
                        pass
                self.reason = str(exc)
                return
            self.emit(client.data_to_send())
            for ev in events:
                if isinstance(ev, WindowUpdated):
                    st = self.streams.get(ev.stream_id)
                    if st is not None:
                        st.may_send()
                elif isinstance(ev, GoAway):
                    self.pool._forget(self)  # no new streams here; open ones finish
                    if not self.streams:
                        self.reason = "upstream sent GOAWAY"
                        return
                else:
                    st = self.streams.get(_stream_of(ev))
                    if st is not None:
                        st.push(ev)
            for st in self.streams.values():
                if st.window.waiting and client.queued(st.sid) == 0:
                    st.may_send()
            if not data:
                self.reason = "upstream closed the connection"
                return


def _stream_of(ev: H2Event) -> int:
    """The stream an event of the codec belongs to (0: the connection)."""
    if isinstance(ev, (ResponseHead, Data, EndOfMessage, Reset, RequestHead, WindowUpdated)):
        return ev.stream_id
    return 0


class H2Pool:
    """Upstream HTTP/2 connections by (address, port, tls key)."""

    def __init__(self, nursery: aio.Nursery, backend: NetworkBackend) -> None:
        self.nursery = nursery
        self.backend = backend
        self.conns: dict[tuple[Any, ...], list[H2Upstream]] = {}
        self.connecting: dict[tuple[Any, ...], aio.Lock] = {}
        self.inflight: dict[str, int] = {}  # cluster name -> requests in flight (http2MaxRequests)

    async def sweeper(self, rt: Any, every: float = 5.0) -> None:
        """Close connections idle (no stream) longer than the pool's idle timeout."""
        while True:
            limit = rt.pool.idle_timeout if rt.pool is not None else 60.0
            await aio.sleep(min(every, max(0.05, limit / 2)))
            now = aio.current_time()
            for lst in list(self.conns.values()):
                for c in list(lst):
                    if not c.streams and now - c.idle_since > limit:
                        c.reason = "idle"
                        c._die("idle")

    def _forget(self, conn: H2Upstream) -> None:
        lst = self.conns.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)
            if not lst:
                del self.conns[conn.key]

    def ready(self, address: str, port: int, tls: Any, max_streams: int | None) -> H2Upstream | None:
        """A connection with room for one more stream that is open already (no waiting), or None."""
        return self._pick((address, port) if tls is None else (address, port, tls.key), max_streams)

    def _pick(self, key: tuple[Any, ...], max_streams: int | None) -> H2Upstream | None:
        lst = self.conns.get(key)
        if lst is None:
            return None
        for c in lst:
            if c.usable and (max_streams is None or len(c.streams) < max_streams):
                return c
        return None

    async def acquire(self, address: str, port: int, stats: Any, connect_timeout: float, tls: Any = None,
                      max_streams: int | None = None) -> H2Upstream:
        """A connection with room for one more stream. Raises UpstreamConnectError."""
        key: tuple[Any, ...] = (address, port) if tls is None else (address, port, tls.key)
        c = self._pick(key, max_streams)
        if c is not None:
            return c
        lock = self.connecting.setdefault(key, aio.Lock())
        async with lock:
            c = self._pick(key, max_streams)
            if c is not None:
                return c
            with aio.move_on_after(connect_timeout):
                try:
                    stream = await self.backend.connect(address, port)
                    if tls is not None:
                        stream = await tls.wrap(stream, address, port)
                except UpstreamConnectError:
                    stats.cx_connect_fail += 1
                    raise
                stats.cx_active += 1
                stats.cx_total += 1
                c = H2Upstream(self, stream, key, stats)
                await self.nursery.start(c.run)
                self.conns.setdefault(key, []).append(c)
                return c
            stats.cx_connect_fail += 1
            raise UpstreamConnectError(address, port, f"timed out after {connect_timeout:g}s")


class H2Exchange:
    """HTTP/2 tries (forward.UpstreamExchange) over the runtime's H2Pool."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.pool: H2Pool | None = None

    def carries(self, rq: Request, cs: ClusterState) -> bool:
        return wants_h2(rq, cs)

    def open_request(self, cs: ClusterState) -> tuple[H2Pool, int | None]:
        """One request to ``cs`` starts (a try, or a shadow: mirror.py): the pool, and the
        cluster's maxConcurrentStreams per connection (None: the server's). The request
        counts against the cluster's http2MaxRequests until ``request_done``; past it,
        PoolOverflow (503 UO for a try; a shadow is dropped)."""
        pool = self._pool()
        hs = _http_settings(cs.cluster)
        max_streams = hs.max_concurrent_streams if hs is not None and hs.max_concurrent_streams else None
        max_rq = hs.http2_max_requests if hs is not None and hs.http2_max_requests else None
        name = cs.name
        n = pool.inflight.get(name, 0)
        if max_rq is not None and n >= max_rq:
            raise PoolOverflow(name, "rq", f"http2MaxRequests {max_rq} reached")
        pool.inflight[name] = n + 1
        return pool, max_streams

    @staticmethod
    def request_done(pool: H2Pool, cs: ClusterState) -> None:
        n = pool.inflight[cs.name] - 1
        if n:
            pool.inflight[cs.name] = n
        else:
            del pool.inflight[cs.name]

    def _pool(self) -> H2Pool:
        """The HTTP/2 pool (made on first use, in the runtime's connection nursery)."""
        p = self.pool
        if p is None:
            rt = self.rt
            p = self.pool = H2Pool(rt._conn_nursery, rt.backend)
            rt._conn_nursery.start_soon(p.sweeper, rt)
        return p

    async def attempt(self, a: Attempt) -> TryResult:
        """One try of the request on an upstream HTTP/2 stream."""
        pool, max_streams = self.open_request(a.cs)
        try:
            return await self._attempt(a, pool, max_streams)
        finally:
            self.request_done(pool, a.cs)

    async def _attempt(self, a: Attempt, pool: H2Pool, max_streams: int | None) -> TryResult:
        rq, cs, ep = a.rq, a.cs, a.ep
        settings = rq.snap.settings
        conn: H2Upstream | None = None
        address: str = ep.address
        if cs.cluster.dns:  # an endpoint given by name (ServiceEntry DNS / DNS_ROUND_ROBIN): one of its addresses
            try:
                address = await upstream_address(address, cs.cluster.dns)
            except OSError as exc:
                return Failed("connect-failure", F.UF, f"cannot resolve {ep.address!r}: {exc}")
        try:
            tls = upstream_tls(self.rt, cs.cluster, ep, h2=True)
            conn = pool.ready(address, ep.port, tls, max_streams)  # the common case: no task switch, no scope
            if conn is None:
                with aio.move_on_at(a.deadline):
                    conn = await pool.acquire(address, ep.port, cs.stats, settings.connect_timeout, tls, max_streams)
        except UpstreamConnectError as exc:
            return Failed("connect-failure", F.UF, str(exc))
        if conn is None:
            return a.timed_out_connecting()
        head = h1_head_to_h2(a.head)
        head.scheme = "http"
        te = [v for k, v in rq.head.headers if k == "te"]
        if any("trailers" in v.lower() for v in te) and not any(k == "te" for k, _ in head.headers):
            head.headers.append(("te", "trailers"))
        body = rq.body
        st: _UpStream | None = None
        try:
            whole = body is None or (body.finished and body.replayable)
            st = conn.open(head, end_stream=body is None or (whole and not body.chunks and not body.trailers))
            if body is not None and whole:
                conn.put_whole_body(st.sid, body.chunks, body.trailers)
            if whole or body is None:  # body is None makes whole true: this only narrows body for mypy
                return await self._respond(a, conn, st)
            failure: list[BaseException] = []
            main_error: list[Exception] = []
            result: TryResult | None = None
            async with aio.open_nursery() as nursery:
                nursery.start_soon(self._send_body, rq, conn, st, failure, nursery.cancel_scope)
                try:
                    result = await self._respond(a, conn, st)
                except Exception as exc:
                    # kept out of the nursery, which would wrap it in an ExceptionGroup that the
                    # callers' ``except DownstreamGone``/``PeerGone`` do not catch (a client that
                    # closed right after the last response bytes then crashed its connection's
                    # task and lost the stream's telemetry)
                    main_error.append(exc)
                    nursery.cancel_scope.cancel()
                else:
                    if not body.finished:
                        nursery.cancel_scope.cancel()
            if main_error:
                raise main_error[0]
            if failure:
                raise failure[0]
            assert result is not None
            if not body.finished:
                rq.keep_alive = False
            return result
        finally:
            if st is not None:
                # a stream still open upstream is reset: the response did not end it, or it
                # ended while the request body was still being sent (an early answer: RFC 9113
                # 8.1; the codec ignores the reset if the upstream has reset the stream itself)
                conn.finish(st, abort=not st.done or (body is not None and not body.finished))

    @staticmethod
    async def _send_body(rq: Request, conn: H2Upstream, st: _UpStream, failure: list[BaseException],
                         cancel: aio.CancelScope) -> None:
        client = conn.client
        body = rq.body
        assert body is not None
        cursor = [0]
        try:
            while True:
                chunk = await body.pull(cursor)
                if chunk is None:
                    conn.emit(client.end(st.sid, body.trailers))
                    await conn.flush()
                    return
                conn.emit(client.data(st.sid, chunk))
                await conn.flush()
                while client.queued(st.sid) > 0 and not conn.dead and not st.done:
                    await st.window.wait()
        except DownstreamGone as exc:  # (a PeerGone too: checked first)
            failure.append(exc)
            cancel.cancel()
        except PeerGone:
            return  # the upstream connection is gone: the response side reports it
        except ProtocolError as exc:
            failure.append(exc)
            cancel.cancel()

    @staticmethod
    async def _read_head(rq: Request, st: _UpStream) -> Any:
        while True:
            ev = await st.next()
            if isinstance(ev, ResponseHead):
                if 100 <= ev.status < 200:
                    if ev.status == 100 and not rq.head.expect_continue:
                        continue
                    await rq.send_down(rq.server.informational(ev))
                    continue
                return ev
            return ev  # a Reset (or an unexpected event)

    async def _respond(self, a: Attempt, conn: H2Upstream, st: _UpStream) -> TryResult:
        rq = a.rq
        # no waiting for the request to be written (written now if the writer is idle and this
        # is the connection's one stream, else the writer sends it with what else is emitted
        # in this turn): if the connection dies first, the stream gets a Reset
        conn.kick()
        head: Any = None
        if a.deadline == _INF:  # no perTryTimeout: no cancel scope
            head = await self._read_head(rq, st)
        else:
            with aio.move_on_at(a.deadline) as scope:
                head = await self._read_head(rq, st)
            if scope.cancelled_caught:
                return Failed("timeout", F.UT, "per-try timeout")
        if not isinstance(head, ResponseHead):
            st.done = True  # nothing to reset
            if isinstance(head, H2Reset) and head.refused:
                return Failed("refused-stream", F.UR, f"{conn.key[0]}:{conn.key[1]} refused the stream")
            reason = head.reason if isinstance(head, Reset) else "no response"
            return Failed("reset", F.UR, f"{conn.key[0]}:{conn.key[1]}: {reason}")
        status = head.status
        grpc = grpc_status_from(head.headers) if status == 200 else None
        delay = a.judge(status, grpc or None)  # the retry budget applies here as on HTTP/1.1
        if delay is not None:
            return Retried(status, delay)
        await self._stream_response(rq, conn, st, head)
        return RELAYED

    async def _stream_response(self, rq: Request, conn: H2Upstream, st: _UpStream, head: ResponseHead) -> None:
        server = rq.server
        client = conn.client
        headers = response_headers(rq, head.headers)
        h1_down = type(server) is H1Server
        body = rq.body
        # an answer before the request body is all read closes an HTTP/1.1 client's
        # connection, said in the head (h1upstream._stream_response; http.py)
        if h1_down and (not rq.keep_alive or self.rt.draining or (body is not None and not body.finished)):
            rq.keep_alive = False
            headers.append(("connection", "close"))
        resp = ResponseHead(head.status, headers, "", "1.1" if h1_down else "2", rq.keep_alive)
        rq.response_started = True
        rq.status = head.status
        nxt = st.events[st.pos] if st.pos < len(st.events) else None
        if isinstance(nxt, EndOfMessage) and not nxt.trailers:
            # a head that ended the stream (gRPC trailers-only): keep it one HEADERS frame with END_STREAM
            st.pos += 1
            st.done = True
            await rq.send_down(server.response_head(resp, end_stream=True))
            if not server.keep_alive:
                rq.keep_alive = False
            return
        out: list[bytes] = [server.response_head(resp)]
        acked = 0
        while True:
            ev = st.buffered()
            if ev is None:
                if out:
                    await rq.send_down(b"".join(out))
                    out = []
                if acked:
                    conn.put(client.ack_received(st.sid, acked))
                    conn.kick()
                    acked = 0
                ev = await st.next()
            if isinstance(ev, Data):
                data = ev.data
                out.append(server.data(data))
                rq.bytes_sent += len(data)
                if rq.kept is not None:  # a mirrored route: the body the shadow's is compared with
                    rq.kept.add(data)
                acked += len(data)
            elif isinstance(ev, EndOfMessage):
                out.append(server.end(ev.trailers))
                st.done = True
                break
            else:
                # upstream reset mid-body: the client must see the response is cut short
                rq.flags.append(F.UR)
                rq.keep_alive = False
                st.done = True
                if out:
                    await rq.send_down(b"".join(out))
                abort = getattr(server, "abort", None)
                if abort is not None:
                    abort("upstream reset the stream")
                return
        await rq.send_down(b"".join(out))
        if not server.keep_alive:
            rq.keep_alive = False
