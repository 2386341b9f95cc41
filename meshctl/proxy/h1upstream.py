"""The HTTP/1.1 upstream exchange: one try of a request on a pooled keep-alive connection.

``H1Exchange.attempt`` (forward.UpstreamExchange) takes a connection from
the shared keep-alive pool (pool.py), or from the cluster's own limiter when
its DestinationRule sets connectionPool limits (limits.py, which may raise
PoolOverflow), sends the request head and the body (replayed from the
request's BodySource; a body not yet read is streamed by a helper task
while the response is awaited), reads the response head until the per-try
deadline (1xx are relayed), asks the forwarder whether to relay or retry it
(``Attempt.judge``), and streams the response to the client, or relays both
ways after a 101 upgrade.

A connection goes back to the pool only after a complete exchange with
keep-alive; everything else is closed. An upstream may answer before it has
the whole request body (RFC 9112 9.5): its answer is relayed whole, and a
reset or broken pipe the body sender meets afterwards changes nothing. When
the body is not all written by the time the answer is complete (the client's
is still arriving, or the upstream does not read it), the sender stops and the
upstream connection is closed, not reused (as Envoy resets the upstream
request); if the client's body was still arriving, an HTTP/1.1 client is told
``connection: close`` in the answer's head (RFC 9110 10.1.1; http.py closes in
stages). Only a small request (INLINE_BODY_BYTES) is written whole before its
answer is read. A kept-alive connection the upstream
closed before answering is ``Stale`` for idempotent requests (RFC 9110
9.2.2 lets a client retry those once on a new connection). The first try
takes a pooled connection idle for less than pool.PEEK_AFTER as is; every
later try of the request checks the one it takes (MSG_PEEK), so that a
second connection the upstream closed (it closes them all when it drains
or restarts) is left, not tried: it would end the request as a reset (UR).
"""

from __future__ import annotations

import math
from typing import Any, Final

import meshctl.proxy.aio as aio
from ..protocol.events import Data, EndOfMessage, ProtocolError, ResponseHead, Upgraded
from ..protocol.headers import strip_hop_by_hop
from ..protocol.http1 import H1Server
from . import stats as F
from .errors import STREAM_ERRORS, DownstreamGone, PeerGone, send_all
from .forward import RELAYED, STALE, Attempt, Failed, Retried, TryResult
from .identity import upstream_tls
from .pool import UpstreamConn, UpstreamPool
from .request import IDEMPOTENT, Request, raw_error_response, response_headers
from .snapshot import ClusterState
from .sockstream import FastSocketStream
from .dns import upstream_address
from .stream import UpstreamConnectError, relay

__all__ = ["H1Exchange"]


# the largest body written in one go before the answer is read (socket buffers take it
# whether or not the upstream reads): retry_buffer_bytes' default
INLINE_BODY_BYTES: Final = 64 * 1024


class H1Exchange:
    """HTTP/1.1 tries over the runtime's keep-alive pool (or a cluster limiter's)."""

    def __init__(self, rt) -> None:
        self.rt = rt
        # upstream_tls's last answer, and what it was asked about: the endpoint, its
        # cluster and the sidecar's certificate holder (a call into identity.py, an
        # interpreted module, only when one of them changed)
        self._tls_for: tuple[object, object, object] | None = None
        self._tls: Any = None

    def carries(self, rq: Request, cs: ClusterState) -> bool:
        return True  # what HTTP/2 does not carry

    async def attempt(self, a: Attempt) -> TryResult:
        rq, cs, ep = a.rq, a.cs, a.ep
        rt = self.rt
        shared: UpstreamPool = rt.pool
        pool = shared if cs.limiter is None else cs.limiter  # (_pool, with the shared pool in hand)
        holder = getattr(rt, "tls", None)
        last = self._tls_for
        if last is not None and last[0] is ep and last[1] is cs.cluster and last[2] is holder:
            tls = self._tls
        else:
            tls = upstream_tls(rt, cs.cluster, ep)
            self._tls_for = (ep, cs.cluster, holder)
            self._tls = tls
        conn: UpstreamConn | None = None
        address = a.address
        port = a.port
        # a try after another (a retry, or the try again after a Stale one) checks the
        # pooled connection it takes, however young: the try before it may have met an
        # upstream closing its connections (a draining sidecar, a restart), and a second
        # dead connection in one request would be a reset (UR), not retried by default
        check = a.retries > 0 or not rq.stale_ok
        if cs.dns:  # an endpoint given by name (ServiceEntry DNS / DNS_ROUND_ROBIN): one of its addresses
            try:
                address = await upstream_address(address, cs.dns)
            except OSError as dns_err:  # (one name per exception type: compiled code types the variable)
                return Failed("connect-failure", F.UF, f"cannot resolve {a.address!r}: {dns_err}")
        try:
            if a.deadline == math.inf:  # no perTryTimeout: no cancel scope to set up (hot path)
                if pool is shared:  # a warm connection without a coroutine (the common case)
                    clock = rq.clock
                    # (through the typed name: a native call when compiled)
                    conn = shared.reuse(address, port, tls, clock.now() if clock is not None else -1.0, check)
                if conn is None:
                    conn = await pool.acquire(address, port, cs.stats, rq.snap.settings.connect_timeout, tls, check)
            else:
                with aio.move_on_at(a.deadline):
                    conn = await pool.acquire(address, port, cs.stats, rq.snap.settings.connect_timeout, tls, check)
        except UpstreamConnectError as exc:
            return Failed("connect-failure", F.UF, str(exc))
        if conn is None:
            return a.timed_out_connecting()
        return await self._exchange(a, conn, pool, pool is shared)

    async def _exchange(self, a: Attempt, conn: UpstreamConn, pool: Any, shared: bool) -> TryResult:
        """The try on ``conn``, taken from ``pool`` (``shared``: the runtime's keep-alive
        pool, not a cluster limiter's), where it goes back (or is discarded) after it."""
        rq, cs = a.rq, a.cs
        body = rq.body
        client = conn.client
        stream = conn.stream
        ok = False
        try:
            if body is None or (body.finished and body.replayable and body.size <= INLINE_BODY_BYTES):
                # whole request in hand, and small: one write, no helper task (a larger one is
                # sent by the helper while the answer is read: an upstream that answers before
                # reading it would otherwise leave the write blocked, and the answer unread)
                if body is None:
                    out = client.request_head(a.head, end_stream=True)
                else:
                    parts = [client.request_head(a.head, end_stream=not body.chunks)]
                    for c in body.chunks:
                        parts.append(client.data(c))
                    if body.chunks or body.trailers:
                        parts.append(client.end(body.trailers))
                    out = b"".join(parts)
                try:
                    if type(stream) is FastSocketStream:  # (a native call when compiled)
                        await stream.send_all(out)
                    else:
                        await stream.send_all(out)
                except STREAM_ERRORS:
                    pass  # the response read below reports the reset
                result = await self._respond(a, conn)
                ok = result is RELAYED and client.keep_alive
                return result
            # stream the body while reading the response
            res: TryResult | None = None
            failure: list[BaseException] = []
            main_error: list[BaseException] = []
            sent = [False]  # the sender wrote the whole request
            async with aio.open_nursery() as nursery:
                nursery.start_soon(self._send_body, a, conn, failure, nursery.cancel_scope, sent)
                try:
                    res = await self._respond(a, conn)
                except (DownstreamGone, ProtocolError) as exc:
                    # kept out of the nursery, which would wrap it in an ExceptionGroup
                    main_error.append(exc)
                finally:
                    if not sent[0]:
                        # the upstream answered (or failed) before it had the whole body: the
                        # sender is not waited for (an upstream that never reads the rest would
                        # hold the client's connection), and the connection is not reused
                        nursery.cancel_scope.cancel()
            if main_error:
                raise main_error[0]
            if failure:
                err = failure[0]
                if isinstance(err, ProtocolError):
                    rq.keep_alive = False
                    if not rq.response_started:
                        rq.flags.append(F.DPE)
                        await rq.send_down(raw_error_response(err.status, str(err)))
                        rq.status = err.status
                    return RELAYED
                raise err
            if res is None:  # body sender cancelled the try (client gone)
                raise DownstreamGone("client went away")
            if not body.finished:
                rq.keep_alive = False
            ok = res is RELAYED and client.keep_alive and sent[0]
            return res
        finally:
            if ok:
                clock = rq.clock
                if clock is not None and shared:
                    shared_pool: UpstreamPool = pool
                    shared_pool.release(conn, clock.now())  # (a native call when compiled)
                else:
                    pool.release(conn)
            else:
                pool.discard(conn)

    async def _send_body(self, a: Attempt, conn: UpstreamConn, failure: list[BaseException],
                         cancel: aio.CancelScope, sent: list[bool]) -> None:
        client = conn.client
        stream = conn.stream
        body = a.rq.body
        assert body is not None
        cursor = [0]
        try:
            pending = [client.request_head(a.head, end_stream=False)]
            while True:
                if not (body.finished or cursor[0] < len(body.chunks)) and pending:
                    # the next chunk needs I/O: flush what is in hand first
                    await send_all(stream, b"".join(pending))
                    pending = []
                chunk = await body.pull(cursor)
                if chunk is None:
                    pending.append(client.end(body.trailers))
                    await send_all(stream, b"".join(pending))
                    sent[0] = True  # (in the step of the last write: before any answer to it can be read)
                    return
                pending.append(client.data(chunk))
                if len(pending) >= 16:
                    await send_all(stream, b"".join(pending))
                    pending = []
        except DownstreamGone as gone:  # (a PeerGone too: checked first)
            failure.append(gone)
            cancel.cancel()
        except PeerGone:
            return  # upstream closed: the response side reports it
        except ProtocolError as bad:  # (its own name: compiled code types an except variable once)
            failure.append(bad)
            cancel.cancel()

    async def _read_head(self, rq: Request, conn: UpstreamConn, first: object = None) -> ResponseHead | None:
        """The final response head (1xx are relayed to the client); None on reset/EOF.
        ``first``: an event already read (from ``_respond``), else None."""
        reader = conn.reader
        while True:
            if first is not None:
                ev, first = first, None
            else:
                ev = await reader.next()
            if type(ev) is ResponseHead:
                st = ev.status
                if 100 <= st < 200 and st != 101:
                    if st == 100 and not rq.head.expect_continue:
                        continue  # the client did not ask for it
                    await rq.send_down(rq.server.informational(ev))
                    continue
                return ev
            return None

    async def _respond(self, a: Attempt, conn: UpstreamConn) -> TryResult:
        rq = a.rq
        head: ResponseHead | None = None
        timed_out = False
        try:
            if a.deadline == math.inf:
                ev = await conn.reader.next()
                if type(ev) is ResponseHead and (ev.status >= 200 or ev.status == 101):
                    head = ev  # a final head at once (the common case: no _read_head coroutine)
                elif ev is None:
                    head = None
                else:
                    head = await self._read_head(rq, conn, ev)
            else:
                with aio.move_on_at(a.deadline) as scope:
                    head = await self._read_head(rq, conn)
                timed_out = scope.cancelled_caught
        except PeerGone:
            head = None
        except ProtocolError as exc:
            return Failed("reset", F.UPE, str(exc))
        if timed_out:
            return Failed("timeout", F.UT, "per-try timeout")
        body = rq.body
        if head is None:
            if (conn.reused and rq.stale_ok and rq.head.method in IDEMPOTENT and not rq.head.expect_continue
                    and (body is None or body.replayable)):
                # a kept-alive connection the upstream had closed: RFC 9110 9.2.2
                # lets a client retry an idempotent request once on a new one
                return STALE
            return Failed("reset", F.UR, f"{conn.key[0]}:{conn.key[1]} closed the connection")
        status = head.status
        delay = a.judge(status)
        if delay is not None:
            return Retried(status, delay)
        if status == 101:
            await self._upgrade(rq, conn, head)
        else:
            await self._stream_response(rq, conn, head)
        return RELAYED

    async def _stream_response(self, rq: Request, conn: UpstreamConn, head: ResponseHead) -> None:
        server = rq.server
        # an HTTP/1.1 client's codec, through a typed name: native calls when compiled (a
        # generic method call costs ~600 instructions); else h2conn's per-stream adapter
        h1: H1Server | None = server if type(server) is H1Server else None
        headers = response_headers(rq, head.headers)
        body = rq.body
        # an answer before the request body is all read (the upstream answered early) closes
        # the client's connection: said now, in the head, so the client neither reuses the
        # connection nor keeps sending, and the close is in stages (http.py, errors.linger)
        if not rq.keep_alive or self.rt.draining or (body is not None and not body.finished):
            head.keep_alive = False
            rq.keep_alive = False
            headers.append(("connection", "close"))
        head.headers = headers
        rq.response_started = True
        rq.status = head.status
        reader = conn.reader
        out = [h1.response_head(head) if h1 is not None else server.response_head(head)]
        while True:
            ev = reader.buffered()
            if ev is None:
                if out:
                    await rq.send_down(b"".join(out))
                    out = []
                try:
                    ev = await reader.next()
                except (PeerGone, ProtocolError):
                    ev = None
            t = type(ev)
            if t is Data:
                data: bytes = ev.data
                out.append(h1.data(data) if h1 is not None else server.data(data))
                rq.bytes_sent += len(data)
                if rq.kept is not None:  # a mirrored route: the body the shadow's is compared with
                    rq.kept.add(data)
            elif t is EndOfMessage:
                out.append(h1.end(ev.trailers) if h1 is not None else server.end(ev.trailers))
                break
            else:
                # upstream reset mid-body: the client can only learn it from the close
                rq.flags.append(F.UR)
                rq.keep_alive = False
                if out:
                    await rq.send_down(b"".join(out))
                conn.stream.close_now()
                return
        down = rq.down
        try:  # (Request.send_down inlined: one coroutine less per response)
            if type(down) is FastSocketStream:  # (a native call when compiled)
                await down.send_all(b"".join(out))
            else:
                await down.send_all(b"".join(out))
        except STREAM_ERRORS as exc:
            raise DownstreamGone(str(exc)) from None
        if not (h1.keep_alive if h1 is not None else server.keep_alive):
            rq.keep_alive = False

    async def _upgrade(self, rq: Request, conn: UpstreamConn, head: ResponseHead) -> None:
        server = rq.server
        head.headers = strip_hop_by_hop(head.headers, keep_upgrade=True)
        rq.response_started = True
        rq.status = 101
        rq.keep_alive = False
        await rq.send_down(server.response_head(head))
        down_left = server.upgrade_accepted()
        up_left = b""
        ev = conn.reader.buffered()
        if type(ev) is Upgraded:
            up_left = ev.leftover
        try:
            if up_left:
                await rq.send_down(up_left)
            if down_left:
                await send_all(conn.stream, down_left)
            await relay(rq.down, conn.stream)
        except PeerGone:
            pass
        conn.stream.close_now()

