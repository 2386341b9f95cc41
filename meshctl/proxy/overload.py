"""Overload: a connection limit per listener, and one log line per condition.

Rules (Envoy's listener connection limit and overload manager, simplified):

* Each listener serves at most ``limit`` connections at once: Settings
  ``max_connections``, or when 0, a default derived from the open-file limit
  (RLIMIT_NOFILE): half of what is left after ``RESERVED_FDS`` (each
  downstream connection may need an upstream one), so the proxy stops taking
  connections before it runs out of descriptors.
* A connection over the limit is accepted and refused: on an HTTP listener it
  gets ``503`` with ``x-meshctl-reason: overload: connection limit`` and
  ``connection: close`` (its request is read first, briefly, so the close does
  not reset the answer away; an HTTP/2 client, prior knowledge, gets the 503 on
  its first stream and a GOAWAY, so gRPC reports UNAVAILABLE with the reason
  instead of a broken connection); on a TCP listener, or an inbound one that may
  speak TLS (mTLS STRICT or PERMISSIVE), it is closed. The default limit also
  caps all listeners together. At most
  ``MAX_REFUSING`` refusals are in progress; past that, new ones are closed at once.
* accept() failing with EMFILE/ENFILE/ENOBUFS/ENOMEM pauses accepting for
  ``ACCEPT_PAUSE`` s (the kernel keeps the rest in the backlog). No tracebacks.
* Each condition is logged once when it starts ("... refusing connections")
  and once when it ends (with how many were refused), and at most once per
  ``LOG_EVERY`` s while it lasts, never once per connection.
"""

from __future__ import annotations

import errno
import logging
import resource
from typing import Any

import meshctl.proxy.aio as aio
from ..protocol.detect import PREFACE
from .errors import PeerGone, receive_some, send_all, send_eof

log = logging.getLogger("meshctl.proxy")

RESERVED_FDS = 100  # listeners, admin, logs, config, Pilot/Mixer/Citadel clients, headroom
MIN_LIMIT = 16
MAX_REFUSING = 64
REFUSE_READ_TIMEOUT = 0.5
ACCEPT_PAUSE = 0.1
LOG_EVERY = 60.0
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})



class Refusal:
    """A whole connection refused with one answer: ``status``, an ``x-meshctl-reason``
    header and a text body, as HTTP/1.1 or on an HTTP/2 client's first stream."""

    __slots__ = ("status", "phrase", "reason", "body")

    def __init__(self, status: int, phrase: str, reason: str, body: str) -> None:
        self.status, self.phrase, self.reason, self.body = status, phrase, reason, body.encode()

    def h1(self) -> bytes:
        return (f"HTTP/1.1 {self.status} {self.phrase}\r\ncontent-type: text/plain\r\n"
                f"x-meshctl-reason: {self.reason}\r\ncontent-length: {len(self.body)}\r\n"
                "connection: close\r\n\r\n").encode() + self.body

    def h2(self, server: Any, stream_id: int) -> bytes:
        """The answer on ``stream_id`` of an HTTP/2 connection (an H2Server), then GOAWAY."""
        from ..protocol.events import ResponseHead

        head = ResponseHead(self.status, [("content-type", "text/plain"), ("x-meshctl-reason", self.reason),
                                          ("content-length", str(len(self.body)))])
        return (server.response_head(stream_id, head) + server.data(stream_id, self.body, end_stream=True)
                + server.goaway(graceful=False))


REFUSAL = Refusal(503, "Service Unavailable", "overload: connection limit", "overload: listener connection limit\r\n")


def default_connection_limit(nofile: int | None = None) -> int:
    """Connections per listener when settings.max_connections is 0."""
    if nofile is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(MIN_LIMIT, (nofile - RESERVED_FDS) // 2)


class Condition:
    """An overload condition logged once when it starts, rate-limited while it
    lasts, and once when it ends."""

    __slots__ = ("what", "on", "count", "logged_at")

    def __init__(self, what: str) -> None:
        self.what = what
        self.on = False
        self.count = 0
        self.logged_at = -1e18

    def hit(self, now: float, detail: str) -> None:
        self.count += 1
        if not self.on or now - self.logged_at >= LOG_EVERY:
            log.warning("%s: %s (logged once per %gs while it lasts)", self.what, detail, LOG_EVERY)
            self.logged_at = now
        self.on = True

    def clear(self) -> None:
        if self.on:
            log.warning("%s: over (%d refused)", self.what, self.count)
            self.on = False
            self.count = 0


async def refuse(stream: Any, http: bool, answer: Refusal = REFUSAL) -> None:
    """Answer a connection over the limit (HTTP: 503 after a brief read) and close it.
    ``stream`` is what the network backend accepted (backend.py); ``answer``: another
    refusal (peercheck.py's 403). An HTTP/2 client (prior knowledge) is answered on
    its first stream."""
    try:
        if http:
            out = answer.h1()
            with aio.move_on_after(REFUSE_READ_TIMEOUT):
                got = b""
                while b"\r\n\r\n" not in got and len(got) < 65536:
                    d = await receive_some(stream)
                    if not d:
                        break
                    got += d
                if got.startswith(PREFACE):
                    out = await _h2_answer(stream, got, answer)
            if out:
                with aio.move_on_after(REFUSE_READ_TIMEOUT):
                    await send_all(stream, out)
                    if hasattr(stream, "send_eof"):
                        await send_eof(stream)
    except (PeerGone, OSError):
        pass
    finally:
        stream.close_now()


async def _h2_answer(stream: Any, got: bytes, answer: Refusal) -> bytes:
    """Read an HTTP/2 client's first request head and answer it with ``answer``
    (b"": the client sent no request, or broke the protocol: just close)."""
    from ..protocol.events import ProtocolError, RequestHead
    from ..protocol.http2 import H2Server

    server = H2Server()
    out = server.initiate()  # our SETTINGS: the first frame a server sends
    seen = 0
    while True:
        try:
            events = server.feed(got)
        except ProtocolError:
            return b""
        for ev in events:
            if type(ev) is RequestHead and ev.stream_id:
                return out + answer.h2(server, ev.stream_id)
        seen += len(got)
        if seen >= 65536:
            return b""
        got = await receive_some(stream)
        if not got:
            return b""
