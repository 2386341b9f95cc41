"""What every stage and the forwarder share about one request, and the local replies.

``Request``        one request in flight: its head, listener, snapshot, downstream
                   codec (``server``), reader and stream (``down``), and what the
                   stages decided (route, cluster, flags, status ...)
``LocalReply``     an answer made here instead of upstream (a stage's verdict,
                   a failure: 503 UH, 504 UT ...), sent by ``send_local``
``BodySource``     the downstream request body, replayable for retries while it
                   fits the retry buffer
``ConnState``      one downstream connection as the runtime's watchdog and
                   drain see it
``Stage``          what a stage of the chain is (stages.py holds them)

Nothing here imports the connection loops (http.py, h2conn.py) or the
forwarder (forward.py): they all import this module.
"""

from __future__ import annotations

import math
import random
from typing import Any, Final, Protocol

import meshctl.proxy.aio as aio
from ..core.authz import RequestAuth
from ..core.route import Forward, apply_header_ops
from ..model.base import HeaderList
from ..model.proxyconfig import Endpoint, Listener
from ..protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, ResponseHead
from ..protocol.grpc import grpc_status_for_http, is_grpc, local_grpc_reply
from ..protocol.headers import strip_hop_by_hop
from . import stats as F
from .connstate import ConnState  # noqa: F401  (its home is connstate.py; re-exported for the connection loops)
from .errors import STREAM_ERRORS, DownstreamGone, PeerGone
from .snapshot import ClusterState, Snapshot
from .sockstream import FastClock

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_REASON_PHRASES = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class LocalReply:
    """An answer made by the proxy itself (a stage's verdict or a failure), sent by ``send_local``."""

    __slots__ = ("status", "body", "headers", "flag")

    def __init__(self, status: int, body: bytes = b"", headers: HeaderList | None = None,
                 flag: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.flag = flag


def failure_reply(flag: str, status: int, detail: str = "") -> LocalReply:
    reason = F.REASONS.get(flag, flag)
    body = (reason + (f": {detail}" if detail else "") + "\n").encode()
    return LocalReply(
        status, body, [("content-type", "text/plain"), ("x-meshctl-reason", reason)], flag
    )


def raw_error_response(status: int, message: str) -> bytes:
    """An error response built without the codec (its state is unusable after a parse error)."""
    body = (message + "\n").encode("latin-1", "replace")
    phrase = _REASON_PHRASES.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


# ------------------------------------------------------------------ request context


class Request:
    """What the stages share about one request."""

    __slots__ = (
        "head", "listener", "snap", "rt", "client_ip", "server", "reader", "down",
        "headers", "request_id", "forward", "cluster", "flags", "body_done", "body",
        "response_started", "status", "keep_alive", "detail", "start", "stale_ok",
        "endpoint", "bytes_sent", "peer",  # telemetry: picked endpoint, response body bytes, source (inbound)
        "kept",  # a mirrored route's primary response (headers, body up to a cap) for mirror comparisons (mirror.py)
        "auth",  # the end user from a verified JWT (jwt_stage), for authz
        "trace",  # the spans of a sampled request (tracing.py); None when not sampled
        "grpc_status",  # a gRPC local reply's grpc-status (send_local), for telemetry over HTTP/1.1 too
        "clock",  # the downstream connection's sockstream.FastClock, None: ask trio.current_time()
    )

    def __init__(self, head: RequestHead, listener: Listener, snap: Snapshot, rt: Any, client_ip: str,
                 server: Any, reader: Any, down: Any) -> None:
        # server: the downstream codec (H1Server, or h2conn's per-stream adapter); reader: its
        # EventReader (or adapter); down: the downstream stream (or adapter)
        self.head = head
        self.listener = listener
        self.snap = snap
        self.rt = rt
        self.client_ip = client_ip
        self.server = server
        self.reader = reader
        self.down = down
        self.headers = head.headers
        self.request_id = ""
        self.forward: Forward | None = None
        self.cluster: ClusterState | None = None
        self.flags: list[str] = []
        self.body_done = False
        self.body: BodySource | None = None
        self.response_started = False
        self.status = 0
        self.keep_alive = head.keep_alive
        self.detail = ""
        self.start = 0.0
        self.stale_ok = True
        self.endpoint: Endpoint | None = None
        self.bytes_sent = 0
        self.peer: Any = None  # telemetry.Peer of the source (inbound), None when unknown
        self.kept: KeptResponse | None = None
        self.auth: RequestAuth | None = None
        self.trace: tuple | None = None
        self.grpc_status = ""
        self.clock: FastClock | None = None

    def body_read(self) -> bool:
        """Whether the client's request body has been read to its end (``body_done``: there
        was none, or it was read without a BodySource)."""
        body = self.body
        return self.body_done or (body is not None and body.finished)

    async def send_down(self, data: bytes) -> None:
        """Write to the client; raises DownstreamGone when it is gone."""
        try:
            await self.down.send_all(data)
        except STREAM_ERRORS as exc:
            raise DownstreamGone(str(exc)) from None


KEPT_BODY_LIMIT = 1 << 20  # a mirrored primary's response body kept for comparison (mirror.py), at most


class KeptResponse:
    """A mirrored route's primary response as the upstream sent it, for `meshctl
    mirror diff` (mirror.py): its headers, and its body chunks while the body
    stays within KEPT_BODY_LIMIT (references to the chunks already read, no copy;
    the digest is computed later by the shadow's task, off the request path)."""

    __slots__ = ("headers", "chunks", "size", "whole")

    def __init__(self) -> None:
        self.headers: list = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.whole = True

    def add(self, data: bytes) -> None:
        if self.whole:
            self.size += len(data)
            if self.size > KEPT_BODY_LIMIT:
                self.whole = False
                self.chunks = []
            else:
                self.chunks.append(data)


class Stage(Protocol):
    """A stage of the chain (stages.py). One that never waits may also have a
    synchronous ``decide(rq)`` with the same result as ``on_request``: the HTTP/1.1
    loop calls it directly (no coroutine per stage and request)."""

    name: str

    async def on_request(self, rq: Request) -> LocalReply | None: ...


# ------------------------------------------------------------------ request body


class BodySource:
    """The downstream request body, readable once per try.

    While it fits in ``limit`` bytes every chunk is kept, so a retry can replay
    it; past the limit the buffer is dropped and ``replayable`` turns False.
    """

    __slots__ = ("reader", "limit", "chunks", "size", "replayable", "finished", "trailers", "deadline")

    def __init__(self, reader: Any, limit: int, deadline: float = math.inf) -> None:
        # reader: an EventReader (HTTP/1.1) or h2conn's per-stream reader: the same next()/peek()/pos
        self.reader = reader
        self.deadline = deadline  # Envoy's request_timeout: the whole body by then, else 408
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.replayable = True
        self.finished = False
        self.trailers: list = []

    def _take(self, ev) -> bytes | None:
        if type(ev) is Data:
            data = ev.data
            if self.replayable:
                self.size += len(data)
                if self.size > self.limit:
                    self.replayable = False
                    self.chunks = []
                else:
                    self.chunks.append(data)
            return data
        if type(ev) is EndOfMessage:
            self.finished = True
            self.trailers = ev.trailers
            return None
        raise DownstreamGone("client reset the request mid-body")

    def prefill(self) -> None:
        """Consume body events the codec already decoded (no I/O)."""
        reader = self.reader
        while not self.finished:
            ev = reader.peek()
            if ev is None or type(ev) not in (Data, EndOfMessage):
                return
            if type(ev) is Data and self.size + len(ev.data) > self.limit:
                return  # past the replay buffer: left for pull(), which streams it (nothing dropped)
            reader.pos += 1
            self._take(ev)

    async def pull(self, cursor: list[int]) -> bytes | None:
        """The next chunk for the try owning ``cursor``; None at the end."""
        i = cursor[0]
        if i < len(self.chunks):
            cursor[0] = i + 1
            return self.chunks[i]
        if self.finished:
            return None
        try:
            if self.deadline == math.inf:
                ev = await self.reader.next()
            else:
                ev = None
                with aio.move_on_at(self.deadline) as late:
                    ev = await self.reader.next()
                if late.cancelled_caught:
                    raise ProtocolError("request timeout: the request body did not arrive in time "
                                        "(settings.requestTimeout)", 408)
        except PeerGone as exc:
            raise DownstreamGone(f"client connection lost mid-body: {exc}") from None
        if ev is None:
            raise DownstreamGone("client closed the connection mid-body")
        data = self._take(ev)
        cursor[0] = len(self.chunks)
        return data



def response_headers(rq: Request, headers: HeaderList) -> HeaderList:
    """An upstream response's headers as the client gets them, whatever the protocol
    on either side: hop-by-hop fields dropped, the route's header operations applied."""
    headers = strip_hop_by_hop(headers)
    fwd = rq.forward
    if fwd is not None:
        if rq.kept is not None:  # a mirrored route (egress.on_forward): keep what the shadow is compared on
            rq.kept.headers = headers
        for ops in fwd.response_ops:
            headers = apply_header_ops(headers, ops)
    return headers


def grpc_local_reply(reply: LocalReply) -> LocalReply:
    """A local reply to a gRPC request (content-type application/grpc), as Envoy
    answers one: HTTP 200, trailers-only, grpc-status mapped from the HTTP status
    (401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504
    UNAVAILABLE ...), grpc-message the reply's text; its other headers
    (www-authenticate, retry-after, x-request-id ...) kept."""
    message = reply.body.decode("utf-8", "replace").strip() or f"HTTP status {reply.status}"
    head, _ = local_grpc_reply(grpc_status_for_http(reply.status), message)
    keep = [h for h in reply.headers if h[0] != "content-type" and h[0] != "content-length"]
    return LocalReply(200, b"", head.headers + keep, reply.flag)


async def send_local(rq: Request, reply: LocalReply) -> None:
    server = rq.server
    status = reply.status  # what telemetry and the access log see, for a gRPC reply too
    if status >= 300 and is_grpc(rq.headers):
        reply = grpc_local_reply(reply)
        rq.grpc_status = str(grpc_status_for_http(status))
    headers = list(reply.headers)
    body = reply.body
    if not any(k == "content-length" for k, _ in headers):
        headers.append(("content-length", str(len(body))))
    if rq.request_id:
        headers.append(("x-request-id", rq.request_id))
    if rq.rt.draining:
        rq.keep_alive = False
    head = ResponseHead(status=reply.status, headers=headers, keep_alive=rq.keep_alive)
    if reply.flag:
        rq.flags.append(reply.flag)
    rq.status = status
    rq.response_started = True
    if not rq.keep_alive:
        headers.append(("connection", "close"))
    is_head = rq.head.method == "HEAD"
    parts = [server.response_head(head, end_stream=not body or is_head)]
    if body and not is_head:
        parts.append(server.data(body))
        parts.append(server.end())
        rq.bytes_sent = len(body)
    await rq.send_down(b"".join(parts))
    if not server.keep_alive:
        rq.keep_alive = False



# a UUID version 4 (RFC 9562): 122 random bits; the version nibble 4, the variant bits 10.
# The variant digit by the random one at its place: its two low bits kept, the two high set to 10.
_VARIANT: Final[dict[str, str]] = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_request_id(rand: random.Random) -> str:
    """A random UUID4 for x-request-id (as Envoy makes them), from the injected random source.
    The digits come from bytes.hex(), not "%032x" (str formatting costs ~1,000 instructions
    more); version and variant are set on the digits (a literal 4, one dict look-up), not
    with two masks on the 128-bit integer (a new integer object each): the same id for
    the same random bits."""
    h = rand.getrandbits(128).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"

