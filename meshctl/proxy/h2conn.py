"""A downstream HTTP/2 connection (h2c prior knowledge): one task per stream.

``serve_http_connection`` (http.py) hands a connection over here when its
first bytes are the HTTP/2 preface. Each request stream runs the listener's
stage chain and the same ``Forwarder`` as HTTP/1.1 requests: the forwarder
only sees a ``Request`` whose ``server`` / ``reader`` / ``down`` are the
per-stream adapters below, so routing, retries, timeouts, faults and
telemetry are shared, and the upstream leg is whatever the cluster speaks
(forward.py runs the tries over h1upstream.py or h2pool.py).

Ordering: the codec returns *all* pending connection bytes from every call,
so the adapters never return those bytes to the forwarder; they append them
at once to one connection output buffer (``_Conn.emit``), which the
connection's one writer task (outbuf.py) sends. Frames thus leave in the order
the codec made them. ``send_down`` sends (``kick``) and waits for the writer
only while more than _HIGH_WATER bytes are unwritten (``_Conn.flush_some``): a
small response is written by its own task when it is the connection's one stream
and the writer is idle (outbuf.py), else sent by the writer with whatever else
the connection's streams emit in the same pass of the scheduler, without its
task waiting for the write; the reading task likewise reads on without waiting
for the writer below that mark.

Flow control, end to end:
* request body: a stream's Data is acked (``ack_received``) only when the
  forwarder pulls the next event, i.e. after the previous chunk went
  upstream; a slow upstream stops the client at its window.
* response body: a stream whose data is queued in the codec (no send
  window) waits for ``WindowUpdated`` before reading more from the upstream;
  past _HIGH_WATER unwritten bytes it waits for the writer, so a client that
  does not read stops the upstream through TCP.

A connection-fatal ``ProtocolError`` writes the codec's GOAWAY, closes the
socket and cancels every stream. ``H2ConnState.drain()`` (called by
``ProxyRuntime.drain``) sends a graceful GOAWAY; the connection closes once
its open streams are done.

Compiled with mypyc (setup.py): the classes are native with typed attributes, so
the per-frame and per-stream calls into the codec (protocol/http2.py, native too)
and between the adapters are direct C calls; ``H2ConnState``, a subclass of
``ConnState``, lives in connstate.py (compiled too). A task waits on a
``Wakeup`` slot of its adapter (outbuf.py), rescheduled directly, not on a
``trio.Event`` made per wait.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Final

import meshctl.proxy.aio as aio
from ..protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, Reset, ResponseHead, header_value
from ..protocol.grpc import (
    GrpcError,
    GrpcStatus,
    MessageCounter,
    grpc_status_for_http,
    is_grpc,
    local_grpc_reply,
    parse_grpc_timeout,
)
from ..protocol.http2 import GoAway, H2Event, H2Limits, H2Server, WindowUpdated
from . import stats as F
from .connstate import ConnState, H2ConnState
from .errors import DownstreamGone, PeerGone, receive_some, send_eof
from .listener import ActiveListener
from .request import Request, send_local
from .sockstream import FastClock
from .outbuf import OutBuffer, Wakeup
from .telemetry import finish_request

log: Final = logging.getLogger("meshctl.proxy")
_INF: Final = math.inf
# stream tasks of a connection kept waiting for its next stream, at most: enough for the
# streams clients keep in flight on one connection (gRPC channels, h2load -m10), since a
# new task costs a trio spawn and a cancel scope (some 40 interpreted calls); an idle one
# holds ~3 KB (tracemalloc, 5,000 idle tasks with their scopes)
_IDLE_TASKS: Final = 32
_HIGH_WATER: Final = 64 * 1024  # bytes emitted and not yet written past which a stream waits for the writer

__all__ = ["serve_h2_connection", "H2ConnState", "h2_limits"]


def h2_limits(snap: Any) -> H2Limits:
    """The codec limits for a downstream connection, from the proxy settings."""
    s = snap.settings
    return H2Limits(
        max_header_list_size=max(1024, int(s.max_request_headers_kb) * 1024),
        max_headers=max(1, int(s.max_headers)),
    )


class _StreamServer:
    """What the forwarder calls ``rq.server`` for one stream: codec calls whose
    bytes go to the connection buffer (return value always b"").

    For a gRPC request, a non-200 response (a local 503/504/404, or an
    upstream's) becomes a trailers-only gRPC reply (``local_grpc_reply``, the
    status mapped from HTTP) and the body after it is dropped, as gRPC clients
    expect their errors."""

    __slots__ = ("c", "sid", "grpc", "swallow", "grpc_status", "msgs", "ended", "keep_alive")

    def __init__(self, c: _Conn, sid: int, grpc: bool = False) -> None:
        self.c = c
        self.sid = sid
        self.grpc = grpc
        self.swallow = False
        self.grpc_status = ""  # what the client was told, for telemetry's grpc_response_status
        self.msgs: MessageCounter | None = MessageCounter() if grpc else None  # gRPC: response messages, for telemetry
        self.ended = False  # the response's end was handed to the codec
        self.keep_alive = True  # (an HTTP/2 stream never closes its connection)

    def response_head(self, head: ResponseHead, *, end_stream: bool = False) -> bytes:
        c = self.c
        if self.grpc and head.status >= 300:
            reason = header_value(head.headers, "x-meshctl-reason") or f"HTTP status {head.status}"
            gh, _ = local_grpc_reply(grpc_status_for_http(head.status), reason)
            rid = header_value(head.headers, "x-request-id")
            if rid:
                gh.headers.append(("x-request-id", rid))
            self.grpc_status = header_value(gh.headers, "grpc-status") or ""
            c.emit(c.h2.response_head(self.sid, gh, end_stream=True))
            self.swallow = self.ended = True
            return b""
        if self.grpc:  # a trailers-only reply carries grpc-status in the head
            self.grpc_status = header_value(head.headers, "grpc-status") or self.grpc_status
        c.emit(c.h2.response_head(self.sid, head, end_stream=end_stream))
        self.ended = end_stream
        return b""

    def informational(self, head: ResponseHead) -> bytes:
        if head.status == 100 or 102 <= head.status < 200:
            self.c.emit(self.c.h2.response_head(self.sid, head))
        return b""

    def data(self, data: bytes) -> bytes:
        if not self.swallow:
            msgs = self.msgs
            if msgs is not None:
                try:
                    msgs.feed(data)
                except GrpcError:  # not gRPC framing after all: no longer counted
                    self.msgs = None
            c = self.c
            c.emit(c.h2.data(self.sid, data))
        return b""

    def end(self, trailers: Any = ()) -> bytes:
        if not self.swallow:
            tl = list(trailers)
            if self.grpc:
                self.grpc_status = header_value(tl, "grpc-status") or self.grpc_status
            c = self.c
            c.emit(c.h2.end(self.sid, tl))
            self.ended = True
        return b""

    def abort(self, reason: str) -> None:
        """The response cannot be completed (upstream reset mid-body): reset the stream."""
        self.c.emit(self.c.h2.reset(self.sid, reason))
        self.c.kick()

    def upgrade_accepted(self) -> bytes:  # pragma: no cover - an h2 request never asks for an upgrade
        raise DownstreamGone("HTTP/1.1 upgrade cannot be relayed on an HTTP/2 stream")


class _StreamReader:
    """The request body events of one stream, in the EventReader interface
    (``peek``/``next``/``buffered``/``pos``). Data is acked to the codec when
    the next event is asked for: the previous one has been passed on."""

    __slots__ = ("c", "sid", "events", "pos", "acked", "wake", "eof", "msgs", "grpc")

    def __init__(self, c: _Conn, sid: int, grpc: bool) -> None:
        self.c = c
        self.sid = sid
        self.grpc = grpc  # the request's content-type is gRPC's
        self.events: list[Any] = []
        self.pos = 0
        self.acked = 0  # events before this index are acked
        self.wake = Wakeup()  # next() waits for an event
        self.eof = False
        self.msgs: MessageCounter | None = MessageCounter() if grpc else None  # gRPC: request messages, for telemetry

    def push(self, ev: Any) -> None:
        msgs = self.msgs
        if msgs is not None and isinstance(ev, Data):
            try:
                msgs.feed(ev.data)
            except GrpcError:  # not gRPC framing after all: no longer counted
                self.msgs = None
        self.events.append(ev)
        self.wake.set()

    def _ack(self) -> None:
        events = self.events
        pos = self.pos
        if pos > self.acked:
            n = 0
            for i in range(self.acked, min(pos, len(events))):
                ev = events[i]
                if isinstance(ev, Data):
                    n += len(ev.data)
            self.acked = pos
            if n:
                c = self.c
                c.emit(c.h2.ack_received(self.sid, n))
                c.kick()  # the WINDOW_UPDATE goes out now, not with the next write
        if pos and pos >= len(events):
            events.clear()
            self.pos = self.acked = 0

    def buffered(self) -> Any:
        self._ack()
        if self.pos < len(self.events):
            ev = self.events[self.pos]
            self.pos += 1
            return ev
        return None

    def peek(self) -> Any:
        if self.pos < len(self.events):
            return self.events[self.pos]
        return None

    async def next(self) -> Any:
        self._ack()
        while self.pos >= len(self.events):
            if self.eof:
                return None
            await self.wake.wait()
            self._ack()
        ev = self.events[self.pos]
        self.pos += 1
        return ev


class _StreamDown:
    """``rq.down`` for one stream: ``send_all`` flushes the connection buffer
    and then waits while this stream's data sits in the codec for window."""

    __slots__ = ("c", "sid", "window")

    def __init__(self, c: _Conn, sid: int) -> None:
        self.c = c
        self.sid = sid
        self.window = Wakeup()  # send_all waits for send window

    def wake(self) -> None:
        """The stream may send again (window, reset, connection gone)."""
        self.window.set()

    @property
    def peer_id(self) -> str | None:
        """The verified mTLS peer of the connection (identity.SecureStream), for authz/telemetry."""
        return getattr(self.c.stream, "peer_id", None)

    @property
    def principal(self) -> str | None:
        return getattr(self.c.stream, "principal", None)

    @property
    def sni(self) -> str | None:
        """The server name the client's TLS ClientHello carried (None: plaintext or no SNI)."""
        return getattr(self.c.stream, "sni", None)

    async def send_all(self, data: bytes) -> None:
        c = self.c
        if data:
            # raw HTTP/1 bytes (an error page for a broken HTTP/1 body) have no place here
            c.emit(c.h2.reset(self.sid, "raw bytes for an HTTP/2 stream"))
            await c.flush()
            raise DownstreamGone("stream reset")
        await c.flush_some()
        h2 = c.h2
        while h2.queued(self.sid) > 0:
            if c.dead:
                raise DownstreamGone("connection closed")
            c.blocked[self.sid] = self
            try:
                await self.window.wait()
            finally:
                c.blocked.pop(self.sid, None)
            await c.flush()


class _Conn(OutBuffer):
    __slots__ = ("rt", "al", "client_ip", "h2", "streams", "blocked", "nursery", "state", "draining", "lstats",
                 "write_failed", "idle", "clock")  # stream, dead, out, emitted, written, wake, progress: OutBuffer's

    def __init__(self, rt: Any, al: ActiveListener, stream: Any, client_ip: str, lstats: Any) -> None:
        self.rt = rt
        self.al = al
        self.client_ip = client_ip
        self.clock = FastClock(aio.current_clock())  # (trio.current_time() is three interpreted calls)
        self.h2 = H2Server(h2_limits(rt.snapshot), now=self.clock.now)
        self._init_out(stream)
        self.streams: dict[int, tuple[aio.CancelScope, _StreamReader, _StreamDown]] = {}
        self.blocked: dict[int, _StreamDown] = {}  # streams waiting for send window
        self.write_failed = False  # a write to the socket failed (not: the client closed after reading)
        self.nursery: aio.Nursery | None = None
        self.state: H2ConnState | None = None
        self.draining = False
        self.lstats = lstats
        # stream tasks waiting for a stream (_next_stream), each with its cancel scope
        self.idle: list[tuple[aio.Task, aio.CancelScope]] = []

    async def flush(self) -> None:
        """Wait until everything emitted so far is written to the socket; DownstreamGone
        when it cannot be (not when the client closed after everything reached it: a
        gRPC client closing its channel after its last answer is no DC of that call)."""
        target = self.emitted
        await self.wait_written()
        if self.dead and (self.write_failed or self.written < target):
            raise DownstreamGone("connection closed")

    async def flush_some(self) -> None:
        """What a stream calls once it has emitted: ``flush()`` when more than _HIGH_WATER
        bytes are not written yet, else only ``kick`` (write inline, or wake the writer) and
        go on (DownstreamGone if the connection is gone with bytes unwritten). Waiting for each write cost the
        stream's task one more trio step per response, for bytes that the writer sends
        with everything else emitted in the same pass anyway."""
        if self.dead or self.emitted - self.written > _HIGH_WATER:
            await self.flush()  # (dead: returns at once, or raises for what was not written)
        else:
            self.kick()

    async def writer(self) -> None:
        try:
            await self.write_loop()
        except PeerGone as exc:
            self.write_error(exc)

    def write_error(self, exc: PeerGone) -> None:
        """A write to the socket failed (the writer's, or a stream's inline one: outbuf.py)."""
        self.write_failed = True
        self.kill()

    def solo(self) -> bool:
        return len(self.streams) <= 1

    def kill(self) -> None:
        """The connection is over: cancel every stream."""
        if self.dead:
            return
        self.dead = True
        self._progress()
        for scope, reader, down in self.streams.values():
            scope.cancel()
            reader.eof = True
            reader.wake.set()
            down.wake()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def start_drain(self) -> None:
        if self.draining or self.dead:
            return
        self.draining = True
        self.emit(self.h2.goaway())
        if self.nursery is not None:
            self.nursery.start_soon(self._drain_flush)

    async def _drain_flush(self) -> None:
        try:
            await self.flush()
        except DownstreamGone:
            return
        if not self.streams:
            self.kill()

    def _stream_done(self, sid: int) -> None:
        self.streams.pop(sid, None)
        if not self.streams:
            if self.draining:
                self.kill()
            elif self.state is not None:
                self.state.deadline = self.clock.now() + self.rt.snapshot.settings.idle_timeout

    # ------------------------------------------------------------ reading
    async def read_loop(self, first: bytes) -> None:
        h2 = self.h2
        self.emit(h2.initiate())
        data = first
        stream = self.stream
        while True:
            try:
                events = h2.feed(data) if data else h2.feed_eof()
            except ProtocolError as exc:
                self.rt.stats.flag(F.DPE)
                log.info("HTTP/2 connection from %s closed: %s", self.client_ip, exc)
                self.emit(h2.data_to_send())
                try:
                    await self.flush()
                except DownstreamGone:
                    pass
                self.kill()
                await self._linger()
                return
            self.emit(h2.data_to_send())
            for ev in events:
                self._dispatch(ev)
            if self.blocked:
                for sid, d in list(self.blocked.items()):
                    if h2.queued(sid) == 0:  # sent, or the stream is gone: no WindowUpdated then
                        d.wake()
            if data and not h2.closed:
                # (the stream tasks' responses may still be unwritten: reading on does not
                # wait for them unless much is, which stops a peer that does not read)
                await self.flush_some()
            else:
                await self.flush()  # everything out before the connection ends
            if not data or self.dead:
                self.kill()
                return
            if h2.closed and not self.streams:
                self.kill()
                return
            data = await receive_some(stream)

    async def _linger(self) -> None:
        """After a GOAWAY for an error: half-close and read what the peer still
        sends (briefly), so closing does not turn into a TCP reset that could
        destroy the GOAWAY before the peer reads it."""
        stream = self.stream
        with aio.CancelScope(shield=True), aio.move_on_after(1.0):  # kill() cancelled the nursery
            try:
                if hasattr(stream, "send_eof"):  # plain sockets; a TLS stream may have one too
                    await send_eof(stream)
                while await receive_some(stream):
                    pass
            except PeerGone:
                pass

    def _dispatch(self, ev: H2Event) -> None:
        if isinstance(ev, Data):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s[1].push(ev)
        elif isinstance(ev, EndOfMessage):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                reader = s[1]
                reader.push(ev)
                reader.eof = True
        elif isinstance(ev, RequestHead):
            sid = ev.stream_id
            reader = _StreamReader(self, sid, is_grpc(ev.headers))
            down = _StreamDown(self, sid)
            if self.state is not None:
                self.state.deadline = _INF
            if self.idle:  # a task whose stream is done takes this one (no new task)
                task, scope = self.idle.pop()
                self.streams[sid] = (scope, reader, down)
                aio.reschedule_value(task, (ev, reader, down))  # (evloop: no outcome.Value made)
            else:
                assert self.nursery is not None  # set before the first frame is read
                scope = aio.CancelScope()
                self.streams[sid] = (scope, reader, down)
                # (named: trio names a task by its function's module and qualname, which a
                # compiled method lacks, and falls back to repr() of the bound method)
                self.nursery.start_soon(self._stream_task, ev, scope, reader, down, name="h2 stream")
        elif isinstance(ev, WindowUpdated):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s[2].wake()
        elif isinstance(ev, Reset):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                # the client abandoned the stream (or the codec refused it): cancel its work
                reader = s[1]
                reader.push(ev)
                reader.eof = True
                s[2].wake()
                s[0].cancel()
        elif isinstance(ev, GoAway):
            log.debug("client %s sent GOAWAY (last stream %d)", self.client_ip, ev.last_stream_id)

    # ------------------------------------------------------------ one stream
    async def _stream_task(self, head: RequestHead, scope: aio.CancelScope, reader: _StreamReader,
                           down: _StreamDown) -> None:
        """Serve a stream, then the next ones the connection opens: a task whose stream is
        done waits for the next (up to _IDLE_TASKS of them), since starting a trio task per
        stream cost more than the rest of this module's work for a gRPC call. The
        connection's end cancels the waiting ones with the rest of its nursery.

        ``scope`` is the task's, not a stream's: a client's RST_STREAM cancels it (the
        task's stream is then the reset one), and the task ends with that stream. One
        scope for all of a task's streams, since entering a trio.CancelScope costs some
        twenty interpreted calls."""
        task = aio.current_task()
        with scope:
            while True:
                await self._serve_stream(head, scope, reader, down)
                # (a reset after the stream's last checkpoint: _next_stream's wait raises
                # Cancelled at once, and the task ends. scope.cancel_called is not asked
                # here: for an active scope it reads trio's clock, three interpreted calls)
                if self.dead or self.draining or len(self.idle) >= _IDLE_TASKS:
                    return
                head, reader, down = await self._next_stream(task, scope)

    async def _next_stream(self, task: aio.Task, scope: aio.CancelScope) -> Any:
        """Wait until _dispatch hands this task a new stream: (head, reader, down)."""
        idle = self.idle
        entry = (task, scope)
        idle.append(entry)

        def abort(_: Any) -> aio.Abort:
            if entry in idle:
                idle.remove(entry)
            return aio.Abort.SUCCEEDED

        return await aio.wait_task_rescheduled(abort)

    async def _serve_stream(self, head: RequestHead, scope: aio.CancelScope, reader: _StreamReader,
                            down: _StreamDown) -> None:
        rt = self.rt
        sid = head.stream_id
        al = self.al
        listener = al.spec
        grpc = reader.grpc
        server = _StreamServer(self, sid, grpc)
        rq = Request(head, listener, rt.snapshot, rt, self.client_ip, server, reader, down)
        rq.clock = self.clock
        since = self.clock.now()
        deadline = _INF
        if grpc:
            gt = header_value(head.headers, "grpc-timeout")
            if gt is not None:
                try:
                    deadline = since + parse_grpc_timeout(gt)
                except GrpcError as exc:
                    log.info("stream %d: %s (ignored)", sid, exc)
        try:
            nxt = reader.peek()
            if isinstance(nxt, EndOfMessage):
                reader.pos += 1
                rq.body_done = True
            try:
                reply = None
                for decide, stage in al.steps_for(rq.snap):
                    # a stage with a synchronous decide() runs without a coroutine (request.Stage)
                    reply = decide(rq) if decide is not None else await stage.on_request(rq)
                    if reply is not None:
                        break
                if reply is not None:
                    await send_local(rq, reply)
                elif deadline == _INF:
                    await rt.forwarder.run(rq)  # (and the route's mirrors: forward.py)
                else:
                    # grpc-timeout is the request's deadline (the route timeout may be shorter);
                    # a gRPC call with a deadline is mirrored too
                    with aio.move_on_at(deadline) as dl:
                        await rt.forwarder.run(rq)
                    if dl.cancelled_caught:
                        rq.flags.append(F.UT)
                        if rq.response_started:
                            self.emit(self.h2.reset(sid, "grpc-timeout"))
                        else:
                            gh, _ = local_grpc_reply(GrpcStatus.DEADLINE_EXCEEDED, "grpc-timeout exceeded")
                            rq.status = 200
                            rq.response_started = True
                            server.response_head(gh, end_stream=True)  # (records grpc-status 4 for telemetry)
                body = rq.body
                if body is not None and not body.finished and not rq.response_started:
                    self.emit(self.h2.reset(sid, "request body not consumed"))
                await self.flush_some()
            except PeerGone:
                rq.flags.append(F.DC)
            except ValueError as exc:  # a response the codec cannot carry (101, bad header value)
                log.info("stream %d: cannot relay the response on HTTP/2: %s", sid, exc)
                rq.flags.append(F.UPE)
                self.emit(self.h2.reset(sid, str(exc)))
                try:
                    await self.flush()
                except DownstreamGone:
                    pass
        except aio.Cancelled:
            # the task's scope (_stream_task) is cancelled: the client reset this stream. The
            # connection's end (dead) cancels the nursery too: nothing is recorded then
            if not scope.cancel_called or self.dead:
                raise
            if F.DC not in rq.flags:
                rq.flags.append(F.DC)  # (nothing to send)
            self._finish(rq, head, since)
            raise
        finally:
            if not self.dead:
                # a stream this task did not finish (error, cancel) must not stay open in the
                # codec, holding the client and the connection window; a no-op when it is done
                self.emit(self.h2.reset(sid, "stream task ended"))
                self.kick()
            self._stream_done(sid)
        self._finish(rq, head, since)

    def _finish(self, rq: Request, head: RequestHead, since: float) -> None:
        """A stream's request is over: its counters, telemetry and log line."""
        if rq.status:
            self.lstats.response(rq.status)
        finish_request(rq, since, self.clock.now(), time.time())
        rt = self.rt
        flags = rq.flags
        if flags:
            for f in flags:
                rt.stats.flag(f)
            if flags[0] != F.DC:
                log.info("%s %s %s -> %d %s %s (h2)", self.al.spec.name, head.method, head.authority + head.path,
                         rq.status, ",".join(flags), rq.detail)


async def serve_h2_connection(rt: Any, active_listener: Any, stream: Any, client_ip: str, first: bytes,
                              base: ConnState, lstats: Any) -> None:
    """Serve one downstream HTTP/2 connection whose first bytes (``first``,
    starting with the preface) were already read. Returns when it is closed
    (the caller closes the socket). Never raises for network or protocol trouble."""
    c = _Conn(rt, active_listener, stream, client_ip, lstats)
    state = H2ConnState(base, c)
    c.state = state
    state.deadline = aio.current_time() + rt.snapshot.settings.idle_timeout
    rt.conns.discard(base)
    rt.conns.add(state)
    try:
        async with aio.open_nursery() as nursery:
            c.nursery = nursery
            if rt.draining:
                c.start_drain()
            nursery.start_soon(c.writer)
            try:
                await c.read_loop(first)
            except PeerGone:
                c.kill()
            if not c.dead:
                c.kill()
    finally:
        rt.conns.discard(state)
