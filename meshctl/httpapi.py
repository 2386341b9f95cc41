"""A small HTTP/1.1 server for the control plane's JSON APIs (Pilot, Mixer).

Not on the data path, so it favours simplicity: h11 (already a dependency of
httpx) does the parsing, one trio task per connection, keep-alive honoured.
Handlers are plain async functions ``(Request) -> Response``; a handler may
wait (long-poll), and a GET's is cancelled if the client closes the connection
meanwhile (other methods change state: they run to their end).

Bounded, since any local process can connect (``Limits``): a request head must
arrive within ``header_timeout`` (an idle keep-alive connection waits at most
``idle_timeout`` for the next one), a body within ``body_timeout``; at most
``max_connections`` at once (past it, the oldest connection that has not sent
a request head yet is closed for the newcomer, so a flood of unfinished heads
cannot lock the mesh's own clients out; only when every connection is busy
does the newcomer get 503); and each
endpoint has a small body limit (``body_limit(method, path)``, 413 above it,
refused from Content-Length before any byte of the body is read).

Errors are JSON ``{"error": message, "reason": code}``; a request without a
valid credential gets 401 (with ``WWW-Authenticate: Bearer``), one whose
credential may not do what it asks gets 403 (meshctl/credentials.py).
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11
import trio

if TYPE_CHECKING:
    from .credentials import Caller

log = logging.getLogger("meshctl.http")

MAX_BODY = 64 * 1024  # default per-request body limit; endpoints that need more say so


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    idle_timeout: float = 60.0  # a kept-alive connection waiting for its next request
    body_timeout: float = 15.0  # from the end of the head to the end of the body
    max_connections: int = 512
    max_head: int = 16 * 1024
    body_limit: "Callable[[str, str], int] | None" = None  # (method, path) -> bytes; default MAX_BODY

    def limit_for(self, method: str, path: str) -> int:
        return MAX_BODY if self.body_limit is None else self.body_limit(method, path)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = ""

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"request body is not JSON: {e}") from None


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    # an async iterator of bytes sent as they come (chunked), for server-sent events; then body is unused
    stream: Any = None

    @classmethod
    def json(cls, obj: Any, status: int = 200, *, compact: bool = False) -> "Response":
        text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
        return cls(status, (text + "\n").encode(), [("content-type", "application/json")])

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> "Response":
        return cls(status, text.encode(), [("content-type", content_type)])


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or _REASONS.get(status, "error")


_REASONS = {400: "bad-request", 401: "unauthenticated", 403: "forbidden", 404: "not-found", 408: "timeout",
            413: "too-large", 503: "unavailable"}


def error_response(e: HTTPError) -> Response:
    resp = Response.json({"error": str(e), "reason": e.reason}, e.status)
    if e.status == 401:
        resp.headers.append(("www-authenticate", 'Bearer realm="meshctl"'))
    return resp


def authenticate(req: Request, mesh_secret: str) -> "Caller":
    """The caller ``req`` proves (credentials.authenticate), or HTTPError 401."""
    from .credentials import Unauthenticated, authenticate as check

    try:
        return check(req.headers.get("authorization"), mesh_secret)
    except Unauthenticated as e:
        raise HTTPError(401, f"{req.method} {req.path}: {e}") from None


Handler = Callable[[Request], Awaitable[Response]]


async def serve(handler: Handler, host: str, port: int, *, limits: Limits | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled. ``task_status.started`` gets the bound port."""
    lim = limits or Limits()
    cap = _fd_bounded(lim.max_connections)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    slots: dict[int, _Slot] = {}  # open connections, oldest first
    over_cap_logged = [0.0]
    seq = [0]

    async def one(stream: trio.SocketStream) -> None:
        if len(slots) >= cap:
            # Evict the oldest connection still waiting for a request head (an attacker's
            # unfinished head, or an idle keep-alive); refuse only when every one is busy.
            victim = next((sl for sl in slots.values() if sl.waiting), None)
            now = trio.current_time()
            if now - over_cap_logged[0] > 10.0:  # one line per condition, not per connection
                over_cap_logged[0] = now
                log.warning("%d connections open (the cap): %s", len(slots),
                            "closing the oldest ones that sent no request" if victim else "refusing new ones with 503")
            if victim is None:
                await _refuse(stream)
                return
            victim.evict()
        seq[0] += 1
        key = seq[0]
        slot = slots[key] = _Slot()
        try:
            with slot.scope:  # cancelled by an eviction; _connection closes the stream either way
                await _connection(stream, handler, lim, slot)
        finally:
            slots.pop(key, None)

    await trio.serve_listeners(one, listeners)


def _fd_bounded(cap: int) -> int:
    """The connection cap, kept under the process's descriptor limit (with room for
    files, the registry and the over-cap connections being refused)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return cap
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(16, min(cap, soft - 128))


class _Slot:
    """One open connection: whether it waits for a request head (evictable), and how to end it."""

    __slots__ = ("scope", "waiting")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.waiting = True

    def evict(self) -> None:
        self.waiting = False
        self.scope.cancel()


async def _refuse(stream: trio.SocketStream) -> None:
    body = b'{"error": "too many connections to the control plane", "reason": "overloaded"}\n'
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    with trio.move_on_after(1) as cs:
        cs.shield = True
        try:
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await stream.aclose()


async def _connection(stream: trio.SocketStream, handler: Handler, lim: Limits | None = None,
                      slot: _Slot | None = None) -> None:
    lim = lim or Limits()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=lim.max_head)
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        peer = ""
    try:
        while True:
            try:
                if slot is not None:
                    slot.waiting = True
                req = await _read_request(stream, conn, peer, lim, slot)
            except HTTPError as e:  # too large, too slow: answer and close
                await _send(stream, conn, error_response(e))
                await _linger(stream)
                return
            if req is None:
                return
            if req.method == "GET":  # (reads, long polls among them: nothing half done if cut short)
                resp = await _answer_unless_gone(stream, handler, req)
                if resp is None:
                    return  # the client closed while its request was handled
            else:
                resp = await _answer(handler, req)  # a change runs to its end, whoever still waits for it
            await _send(stream, conn, resp)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, h11.LocalProtocolError):
        return
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()


async def _answer(handler: Handler, req: Request) -> Response:
    try:
        return await handler(req)
    except HTTPError as e:
        return error_response(e)
    except Exception as e:  # a bug in a handler answers 500 and is logged, never kills the server
        from .credentials import Forbidden

        if isinstance(e, Forbidden):
            return error_response(HTTPError(403, f"{req.method} {req.path}: {e}"))
        log.exception("handler failed for %s %s", req.method, req.path)
        return Response.json({"error": f"internal error: {e}", "reason": "internal"}, 500)


async def _answer_unless_gone(stream: trio.SocketStream, handler: Handler, req: Request) -> Response | None:
    """The handler's answer to ``req``; None when the client closes its side first, the
    handler cancelled (a long poll whose proxy died would otherwise stay in Pilot for its
    whole wait, and count as that proxy being seen: supervisor/registration.py). Bytes
    arriving meanwhile (a pipelined request) end the watch: they are read after the answer."""
    answer: list[Response] = []

    async def watch(scope: trio.CancelScope) -> None:
        try:
            if await stream.socket.recv(1, socket.MSG_PEEK):
                return
        except OSError:
            pass  # reset: gone as well
        scope.cancel()

    async with trio.open_nursery() as n:
        n.start_soon(watch, n.cancel_scope)
        answer.append(await _answer(handler, req))
        n.cancel_scope.cancel()
    return answer[0] if answer else None


async def _linger(stream: trio.SocketStream, seconds: float = 1.0, most: int = 1 << 20) -> None:
    """Half-close and discard what the client still sends (briefly), so closing with
    unread bytes does not reset the connection before the client reads our answer."""
    with trio.move_on_after(seconds):
        try:
            await stream.send_eof()
            got = 0
            while got < most:
                data = await stream.receive_some(65536)
                if not data:
                    break
                got += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _send(stream: trio.SocketStream, conn: h11.Connection, resp: Response) -> None:
    if resp.stream is not None:
        await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=resp.headers)))
        async for chunk in resp.stream:
            await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    headers = [("content-length", str(len(resp.body)))] + resp.headers
    if resp.status in (408, 413) or conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
        headers.append(("connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=resp.status, headers=headers))
    except h11.LocalProtocolError:  # the client's request was not even a head: h11 will not answer it
        reason = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}.get(resp.status, "")
        await stream.send_all(b"".join([f"HTTP/1.1 {resp.status} {reason}\r\n".encode()] + [
            f"{k}: {v}\r\n".encode("latin-1") for k, v in headers] + [b"\r\n", resp.body]))
        return
    await stream.send_all(data)
    await stream.send_all(conn.send(h11.Data(data=resp.body)) + conn.send(h11.EndOfMessage()))


async def _read_request(stream: trio.SocketStream, conn: h11.Connection, peer: str,
                        lim: Limits | None = None, slot: _Slot | None = None) -> Request | None:
    lim = lim or Limits()
    head: h11.Request | None = None
    body = bytearray()
    limit = MAX_BODY
    # Phase 1: wait (idle_timeout) for the first byte of the next request, unless h11 has some.
    deadline = trio.current_time() + lim.idle_timeout
    started = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:  # a bad request line or header (a control byte, ...)
            raise HTTPError(400, f"malformed request: {e}", "bad-request") from None
        if event is h11.NEED_DATA:
            with trio.move_on_at(deadline) as cs:
                data = await stream.receive_some(65536)
            if cs.cancelled_caught:
                if head is None and not started:
                    return None  # idle keep-alive connection: close it quietly
                what = "request head" if head is None else "request body"
                raise HTTPError(408, f"{what} not received in time", "timeout")
            conn.receive_data(data)
            if not data and head is None:
                return None
            if not started and head is None:
                started = True
                deadline = trio.current_time() + lim.header_timeout
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
            if slot is not None:
                slot.waiting = False  # a request is under way: not evicted for newcomers
            target = head.target.decode("latin-1")
            limit = lim.limit_for(head.method.decode(), urlsplit(target).path)
            names = {k for k, _ in head.headers}
            if b"transfer-encoding" in names and b"content-length" in names:  # RFC 9112 6.3: ambiguous framing
                raise HTTPError(400, "request has both Transfer-Encoding and Content-Length: its body length is "
                                     "ambiguous (RFC 9112 section 6.3); send one of them", "bad-request")
            for k, v in head.headers:
                if k == b"content-length" and int(v) > limit:
                    raise HTTPError(413, f"request body of {int(v)} bytes is over the limit of {limit} for "
                                         f"{head.method.decode()} {urlsplit(target).path}", "too-large")
            deadline = trio.current_time() + lim.body_timeout
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise HTTPError(413, f"request body is over the limit of {limit} bytes", "too-large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("latin-1")
            parts = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode(), parts.path, query, headers, bytes(body), peer)
