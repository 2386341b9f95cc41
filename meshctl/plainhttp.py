"""A small HTTP/1.1 client on h11 and trio for a sidecar's calls to its control plane.

A sidecar talks to Pilot (register, long-poll for config, NACK) and Citadel
(certificate signing and renewal) over plain http:// with JSON bodies, and to
nothing else. httpx does that too, but costs every sidecar ~1.6 MB of RSS for
features these calls never use (HTTP/2, proxies, cookies, auth flows, TLS), so
the sidecar uses this: h11 (the parser httpx itself is built on, and the one
meshctl/httpapi.py serves these APIs with) over one kept-alive TCP connection.

- ``http://`` only: an https:// URL is an ``HTTPError`` (the control plane
  serves plain HTTP on loopback or a private network; see meshctl/loopback.py).
- Errors mirror httpx's names for what callers handle: ``HTTPError`` for any
  failure to get an answer (connect, reset, timeout, malformed response),
  ``HTTPStatusError`` (with ``.response``) from ``Response.raise_for_status()``.
- ``timeout`` bounds connecting, sending and each wait for the answer's next
  bytes; ``read_timeout=None`` waits for the answer without limit (a long-poll).
- A kept-alive connection the server closed meanwhile is noticed before any
  byte of an answer, and the request is sent once more on a new connection.
"""

from __future__ import annotations

import json as _json
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio

MAX_RESPONSE = 256 * 1024 * 1024  # bytes: a config for a very large mesh stays far below


class HTTPError(Exception):
    """No usable answer: the message says why."""


class HTTPStatusError(HTTPError):
    def __init__(self, message: str, response: "Response") -> None:
        super().__init__(message)
        self.response = response


class Response:
    __slots__ = ("status_code", "headers", "content", "url")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes, url: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.url = url

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return _json.loads(self.content)  # ValueError (JSONDecodeError) when it is not JSON

    def raise_for_status(self) -> None:
        if not 200 <= self.status_code < 300:
            raise HTTPStatusError(f"HTTP {self.status_code} from {self.url}", self)


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class PlainHTTPClient:
    def __init__(self, *, timeout: float = 10.0, read_timeout: float | None = -1.0,
                 headers: dict[str, str] | None = None) -> None:
        self.timeout = timeout
        self.read_timeout = timeout if read_timeout is not None and read_timeout < 0 else read_timeout
        self.headers = dict(headers or {})
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self._where: tuple[str, int] | None = None

    async def __aenter__(self) -> "PlainHTTPClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def get(self, url: str, *, params: dict[str, str] | None = None) -> Response:
        return await self.request("GET", url, params=params)

    async def put(self, url: str, *, json: Any = None) -> Response:
        return await self.request("PUT", url, json=json)

    async def post(self, url: str, *, json: Any = None) -> Response:
        return await self.request("POST", url, json=json)

    async def request(self, method: str, url: str, *, json: Any = None,
                      params: dict[str, str] | None = None) -> Response:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise HTTPError(f"{url}: only http:// URLs are supported here")
        try:
            port = parts.port or 80
        except ValueError:
            raise HTTPError(f"{url}: bad port") from None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if params:
            target += ("&" if parts.query else "?") + urlencode(params)
        body = _json.dumps(json).encode() if json is not None else b""
        headers = [("host", parts.netloc), ("accept", "application/json"), ("content-length", str(len(body))),
                   *self.headers.items()]
        if json is not None:
            headers.append(("content-type", "application/json"))
        req = h11.Request(method=method, target=target, headers=headers)
        where = (parts.hostname, port)
        for attempt in (0, 1):
            reused = await self._connect(where)
            try:
                return await self._exchange(req, body, url)
            except _Stale:
                await self.aclose()
                if attempt or not reused:
                    raise HTTPError(f"{url}: the server closed the connection without answering") from None
            except BaseException:
                await self.aclose()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self, where: tuple[str, int]) -> bool:
        """Make sure a connection to ``where`` is open; whether it is a kept-alive one."""
        if self._stream is not None and self._conn is not None and self._where == where \
                and self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE:
            return True
        await self.aclose()
        try:
            with trio.fail_after(self.timeout):
                self._stream = await trio.open_tcp_stream(*where)
        except trio.TooSlowError:
            raise HTTPError(f"http://{where[0]}:{where[1]}: connect timed out after {self.timeout}s") from None
        except OSError as exc:
            raise HTTPError(f"http://{where[0]}:{where[1]}: cannot connect ({exc.strerror or exc})") from None
        self._conn = h11.Connection(h11.CLIENT)
        self._where = where
        return False

    async def _exchange(self, req: h11.Request, body: bytes, url: str) -> Response:
        stream, conn = self._stream, self._conn
        assert stream is not None and conn is not None
        started = False  # a byte of the answer came
        try:
            with trio.fail_after(self.timeout):
                data = conn.send(req) or b""
                if body:
                    data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
            status, headers, chunks, size = 0, {}, [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(self.read_timeout if self.read_timeout is not None else float("inf")):
                        got = await stream.receive_some(65536)
                    if not got and not started:
                        raise _Stale
                    started = True
                    conn.receive_data(got)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE:
                        raise HTTPError(f"{url}: answer larger than {MAX_RESPONSE} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise HTTPError(f"{url}: the server closed the connection mid-answer")
        except trio.TooSlowError:
            raise HTTPError(f"{url}: no answer within {self.timeout if not started else self.read_timeout}s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not started:
                raise _Stale from None
            raise HTTPError(f"{url}: connection failed ({exc})") from None
        except h11.ProtocolError as exc:
            raise HTTPError(f"{url}: malformed answer ({exc})") from None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()  # kept alive for the next request
        else:
            await self.aclose()
        return Response(status, headers, b"".join(chunks), url)
