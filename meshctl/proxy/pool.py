"""Keep-alive pools of upstream HTTP/1.1 connections, one idle list per endpoint.

Pools are keyed by (address, port), not by cluster or config version, so a
config swap keeps warm connections. An idle connection is checked with the
backend's ``is_alive`` (a non-blocking MSG_PEEK on sockets) before reuse (the
peer may have closed it) and dropped after ``idle_timeout``. New connections
come from the runtime's network backend (backend.py).

``EventReader`` is the read edge of every HTTP/1.1 stream: it feeds the codec
and maps the stream's library exceptions to errors.PeerGone.
"""

from __future__ import annotations

from typing import Any, Final

import meshctl.proxy.aio as aio
from ..protocol.events import EndOfMessage
from ..protocol.http1 import H1Client, H1Codec, Limits
from .backend import NetworkBackend, SocketBackend
from .errors import STREAM_ERRORS, PeerGone
from .stats import ClusterStats
from .sockstream import FastSocketStream
from .stream import UpstreamConnectError

SOCKETS = SocketBackend()  # the default backend: real sockets


PEEK_AFTER = 0.5  # seconds idle after which a pooled connection is checked before reuse


class EventReader:
    """Pulls codec events off a stream, one at a time, feeding the codec on demand."""

    __slots__ = ("stream", "fast", "codec", "events", "pos", "eof", "ack_partial")

    def __init__(self, stream: Any, codec: H1Codec) -> None:
        self.stream = stream
        # the plain socket stream, called natively when compiled (the others: TLS, memory
        # streams in tests, through a generic call)
        self.fast: FastSocketStream | None = stream if type(stream) is FastSocketStream else None
        self.codec = codec
        self.events: list[Any] = []
        self.pos = 0
        self.eof = False
        # An upstream stream in quick-ACK mode: ACK at once only when a read leaves the
        # message incomplete (the rest may be held back until the peer sees our ACK).
        # A whole response needs no ACK of its own: the next request carries it, and
        # an ACK after each one would be a packet and a syscall more per request.
        self.ack_partial: bool = getattr(stream, "quickack", False)
        if self.ack_partial:
            stream.quickack = False  # the socket stream's own (stream.py), found above

    def buffered(self) -> Any:
        """The next event if one is already decoded, else None (never blocks)."""
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
        """The next event; None at a clean EOF. Raises ProtocolError from the codec
        and PeerGone when the stream is gone."""
        while True:
            if self.pos < len(self.events):
                ev = self.events[self.pos]
                self.pos += 1
                return ev
            if self.eof:
                return None
            fast = self.fast
            data: Any
            try:
                if fast is not None:
                    data = await fast.receive_some()
                else:
                    data = await self.stream.receive_some()
            except STREAM_ERRORS as exc:
                raise PeerGone(str(exc) or type(exc).__name__) from None
            if data:
                if fast is not None:
                    events = self.codec.feed(data)  # bytes: a native call when compiled
                else:
                    # memory streams and trio's SSLStream hand over bytearrays, which a
                    # compiled native call refuses as bytes; the generic call takes them
                    codec: Any = self.codec
                    events = codec.feed(data)
                self.events = events
                if self.ack_partial and not (events and type(events[-1]) is EndOfMessage):
                    self.stream.ack_now()
            else:
                self.eof = True
                self.events = self.codec.feed_eof()
            self.pos = 0


# Idle connections kept per endpoint. Every idle connection was needed once: there were that
# many requests to the endpoint at one moment. Closing those above a small cap (128, until
# December 2026) only to open them again at the next burst churned: an h2 client with 16
# connections x 10 streams through a pair opened ~350 upstream connections a second (their
# TIME_WAITs filled most of the loopback's ephemeral ports), and pair_h2.sh's HTTP/2 pair
# fell to 0.18 of nginx's rps, 0.74 with this cap (bench/README.md). 1,024 is Envoy's
# default for a cluster's max_connections; idle ones still go after the pool's idle timeout.
MAX_IDLE_PER_ENDPOINT: Final = 1024


class UpstreamConn:
    __slots__ = ("stream", "client", "reader", "key", "stats", "idle_since", "reused", "counted")

    def __init__(self, stream: Any, client: H1Client, key: tuple, stats: ClusterStats) -> None:
        self.stream = stream
        self.client = client
        self.reader = EventReader(stream, client)
        self.key = key
        self.stats = stats
        self.idle_since = 0.0
        self.reused = False
        self.counted = True  # still included in stats.cx_active


class UpstreamPool:
    def __init__(self, *, limits: Limits | None, max_idle_per_endpoint: int = MAX_IDLE_PER_ENDPOINT,
                 backend: NetworkBackend | None = None) -> None:
        self.limits = limits
        self.backend: NetworkBackend = backend if backend is not None else SOCKETS
        self.max_idle = max_idle_per_endpoint
        self.idle: dict[tuple[Any, ...], list[UpstreamConn]] = {}  # (address, port[, tls key])
        self.idle_timeout = 60.0

    async def acquire(self, address: str, port: int, stats: ClusterStats, connect_timeout: float,
                      tls=None, check: bool = False) -> UpstreamConn:
        """A pooled idle connection if a live one exists, else a new one.
        ``tls`` (identity.UpstreamTLS, None for plaintext) secures new
        connections and is part of the pool key, so plain and mTLS
        connections to one address never mix. ``check``: as for ``reuse``.
        Raises UpstreamConnectError (including on connect timeout and on a
        failed TLS handshake or peer identity check)."""
        conn = self.reuse(address, port, tls, -1.0, check)
        if conn is not None:
            return conn
        key = (address, port) if tls is None else (address, port, tls.key)
        with aio.move_on_after(connect_timeout):
            try:
                stream = await self.backend.connect(address, port)
            except UpstreamConnectError:
                stats.cx_connect_fail += 1
                raise
            if tls is not None:
                try:
                    stream = await tls.wrap(stream, address, port)
                except UpstreamConnectError:
                    stats.cx_connect_fail += 1
                    raise
            stats.cx_active += 1
            stats.cx_total += 1
            client = H1Client(self.limits) if self.limits is not None else H1Client()  # None: before the first config
            return UpstreamConn(stream, client, key, stats)
        stats.cx_connect_fail += 1
        raise UpstreamConnectError(address, port, f"timed out after {connect_timeout:g}s")

    def reuse(self, address: str, port: int, tls=None, now: float = -1.0,
              check: bool = False) -> UpstreamConn | None:
        """A pooled idle connection that is (as far as is known) alive, else None;
        never waits (``acquire`` without the connect: the forwarder's common case).
        ``now``: the trio clock's time if the caller has it (else it is asked).
        ``check``: check even a connection idle for a moment (a request's tries after
        its first: the one before may have met an upstream closing its connections)."""
        idle = self.idle.get((address, port) if tls is None else (address, port, tls.key))
        if idle:
            if now < 0:
                now = aio.current_time()
            while idle:
                conn = idle.pop()
                age = now - conn.idle_since
                # a connection idle for a moment is taken as is (a stale one is
                # retried once for idempotent requests, see forward.py);
                # an older one costs one MSG_PEEK syscall to check
                if age < self.idle_timeout and ((age < PEEK_AFTER and not check)
                                                or self.backend.is_alive(conn.stream)):
                    conn.reused = True
                    return conn
                self._close(conn)
        return None

    def release(self, conn: UpstreamConn, now: float = -1.0) -> None:
        """Give back a connection whose exchange completed with keep-alive.
        ``now``: the trio clock's time if the caller has it (else it is asked)."""
        client = conn.client
        reader = conn.reader
        if conn.stream.closed or not client.keep_alive or reader.pos < len(reader.events):
            self._close(conn)
            return
        client.next_exchange()  # (reset_for_next without checking keep_alive again)
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = []
        elif len(idle) >= self.max_idle:
            self._close(conn)
            return
        conn.idle_since = now if now >= 0 else aio.current_time()
        idle.append(conn)

    def discard(self, conn: UpstreamConn) -> None:
        self._close(conn)

    def _close(self, conn: UpstreamConn) -> None:
        conn.stream.close_now()
        conn.client.release()  # (freed with the connection, not by the cyclic GC: http1.release)
        if conn.counted:
            conn.counted = False
            conn.stats.cx_active -= 1

    def close_all(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                self._close(c)
        self.idle.clear()

    def sweep(self) -> None:
        """Drop idle connections past idle_timeout (called periodically)."""
        now = aio.current_time()
        for key, conns in list(self.idle.items()):
            keep = []
            for c in conns:
                if now - c.idle_since < self.idle_timeout and self.backend.is_alive(c.stream):
                    keep.append(c)
                else:
                    self._close(c)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
