"""A small HTTP/1.1 server for the control plane's JSON APIs (Pilot, Mixer).

Not on the data path, so it favours simplicity: h11 (already a dependency of
httpx) does the parsing, one trio task per connection, keep-alive honoured.
Handlers are plain async functions ``(Request) -> Response``; a handler may
wait (long-poll) and is cancelled if the client goes away.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger("meshctl.http")

MAX_BODY = 16 * 1024 * 1024


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

    @classmethod
    def json(cls, obj: Any, status: int = 200, *, compact: bool = False) -> "Response":
        text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
        return cls(status, (text + "\n").encode(), [("content-type", "application/json")])

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> "Response":
        return cls(status, text.encode(), [("content-type", content_type)])


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Request], Awaitable[Response]]


async def serve(handler: Handler, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled. ``task_status.started`` gets the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    await trio.serve_listeners(lambda s: _connection(s, handler), listeners)


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        peer = ""
    try:
        while True:
            req = await _read_request(stream, conn, peer)
            if req is None:
                return
            try:
                resp = await handler(req)
            except HTTPError as e:
                resp = Response.json({"error": str(e)}, e.status)
            except Exception as e:  # a bug in a handler answers 500 and is logged, never kills the server
                log.exception("handler failed for %s %s", req.method, req.path)
                resp = Response.json({"error": f"internal error: {e}"}, 500)
            headers = [("content-length", str(len(resp.body)))] + resp.headers
            await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=resp.body)) + conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, h11.LocalProtocolError):
        return
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()


async def _read_request(stream: trio.SocketStream, conn: h11.Connection, peer: str) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data and head is None:
                return None
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("latin-1")
            parts = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode(), parts.path, query, headers, bytes(body), peer)
