"""A small HTTP/1.1 client on h11 for a sidecar's calls to its control plane
and collectors.

A sidecar talks to Pilot (register, long-poll for config, NACK), Citadel
(certificate signing and renewal) and Mixer (quota asks) over plain http://
with JSON bodies, and sends spans to a collector and checks to an external
authorizer. httpx does that too, but costs every sidecar ~1.6 MB of RSS for
features these calls never use (HTTP/2, proxies, cookies, auth flows), and
runs on trio only (through anyio), so the sidecar uses this: h11 (the parser
httpx itself is built on, and the one meshctl/httpapi.py serves these APIs
with) over one kept-alive TCP connection.

- It runs on trio by default. ``runtime`` and ``connect`` put it on another
  runtime with trio's API: the sidecar passes its own (proxy/ctlhttp.py), so the
  client runs on whichever runtime the data plane runs on (proxy/aio.py).
  ``runtime`` is a module with ``fail_after``, ``CancelScope``, ``TooSlowError``
  and the stream exceptions ``BrokenResourceError`` and ``ClosedResourceError``;
  ``connect(scheme, host, port)`` returns a connected stream (raising OSError)
  and decides which schemes it serves (trio's default: http). trio is imported
  only when no runtime is given: a sidecar on evloop imports none.
- Errors mirror httpx's names for what callers handle: ``HTTPError`` for any
  failure to get an answer (connect, reset, timeout, malformed response),
  ``HTTPStatusError`` (with ``.response``) from ``Response.raise_for_status()``.
- ``timeout`` bounds connecting, sending and each wait for the answer's next
  bytes; ``read_timeout=None`` waits for the answer without limit (a long-poll).
- A kept-alive connection the server closed meanwhile is noticed before any
  byte of an answer, and the request is sent once more on a new connection.
- ``json=`` sends a JSON body and asks for JSON (``accept``); ``content=`` with
  ``headers=`` sends exactly those headers (plus ``host`` and
  ``content-length`` when they are not among them) and that body.
"""

from __future__ import annotations

import json as _json
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import h11

if TYPE_CHECKING:
    import trio

MAX_RESPONSE = 256 * 1024 * 1024  # bytes: a config for a very large mesh stays far below


class HTTPError(Exception):
    """No usable answer: the message says why."""


class HTTPStatusError(HTTPError):
    def __init__(self, message: str, response: "Response") -> None:
        super().__init__(message)
        self.response = response


class Response:
    __slots__ = ("status_code", "headers", "header_list", "content", "url")

    def __init__(self, status_code: int, header_list: list[tuple[str, str]], content: bytes, url: str) -> None:
        self.status_code = status_code
        self.header_list = header_list  # (lower-case name, value), repeated names kept, in order
        self.headers = dict(header_list)  # the last value of each name
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


Connect = Callable[[str, str, int], Awaitable[Any]]


async def _trio_connect(scheme: str, host: str, port: int) -> trio.SocketStream:
    import trio

    if scheme != "http":
        raise HTTPError(f"{scheme}://{host}:{port}: only http:// URLs are supported here")
    return await trio.open_tcp_stream(host, port)


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class PlainHTTPClient:
    def __init__(self, *, timeout: float = 10.0, read_timeout: float | None = -1.0,
                 headers: dict[str, str] | None = None, runtime: ModuleType | None = None,
                 connect: Connect | None = None) -> None:
        self.timeout = timeout
        self.read_timeout = timeout if read_timeout is not None and read_timeout < 0 else read_timeout
        self.headers = dict(headers or {})
        if runtime is None:
            import trio as runtime
        self._rt: Any = runtime
        self._open: Connect = connect if connect is not None else _trio_connect
        self._stream: Any = None  # a trio.abc.Stream
        self._conn: h11.Connection | None = None
        self._where: tuple[str, str, int] | None = None

    async def __aenter__(self) -> "PlainHTTPClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            with self._rt.CancelScope(shield=True):
                await stream.aclose()

    async def get(self, url: str, *, params: dict[str, str] | None = None) -> Response:
        return await self.request("GET", url, params=params)

    async def put(self, url: str, *, json: Any = None) -> Response:
        return await self.request("PUT", url, json=json)

    async def post(self, url: str, *, json: Any = None, content: bytes | None = None,
                   headers: list[tuple[str, str]] | None = None) -> Response:
        return await self.request("POST", url, json=json, content=content, headers=headers)

    async def request(self, method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None,
                      content: bytes | None = None, headers: list[tuple[str, str]] | None = None) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPError(f"{url}: not an http:// URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise HTTPError(f"{url}: bad port") from None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if params:
            target += ("&" if parts.query else "?") + urlencode(params)
        body = _json.dumps(json).encode() if json is not None else (content or b"")
        given = headers if headers is not None else [("accept", "application/json")]
        names = {k.lower() for k, _ in given}
        sent = [("host", parts.netloc)] if "host" not in names else []
        sent += given
        if "content-length" not in names:
            sent.append(("content-length", str(len(body))))
        sent += [kv for kv in self.headers.items() if kv[0].lower() not in names]
        if json is not None:
            sent.append(("content-type", "application/json"))
        req = h11.Request(method=method, target=target, headers=sent)
        where = (parts.scheme, parts.hostname, port)
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

    async def _connect(self, where: tuple[str, str, int]) -> bool:
        """Make sure a connection to ``where`` is open; whether it is a kept-alive one."""
        if self._stream is not None and self._conn is not None and self._where == where \
                and self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE:
            return True
        await self.aclose()
        scheme, host, port = where
        try:
            with self._rt.fail_after(self.timeout):
                self._stream = await self._open(scheme, host, port)
        except self._rt.TooSlowError:
            raise HTTPError(f"{scheme}://{host}:{port}: connect timed out after {self.timeout}s") from None
        except OSError as exc:
            raise HTTPError(f"{scheme}://{host}:{port}: cannot connect ({exc.strerror or exc})") from None
        self._conn = h11.Connection(h11.CLIENT)
        self._where = where
        return False

    async def _exchange(self, req: h11.Request, body: bytes, url: str) -> Response:
        stream, conn = self._stream, self._conn
        assert stream is not None and conn is not None
        started = False  # a byte of the answer came
        try:
            with self._rt.fail_after(self.timeout):
                data = conn.send(req) or b""
                if body:
                    data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
            status, headers, chunks, size = 0, [], [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with self._rt.fail_after(self.read_timeout if self.read_timeout is not None else float("inf")):
                        got = await stream.receive_some(65536)
                    if not got and not started:
                        raise _Stale
                    started = True
                    conn.receive_data(got)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE:
                        raise HTTPError(f"{url}: answer larger than {MAX_RESPONSE} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise HTTPError(f"{url}: the server closed the connection mid-answer")
        except self._rt.TooSlowError:
            raise HTTPError(f"{url}: no answer within {self.timeout if not started else self.read_timeout}s") from None
        except (OSError, self._rt.BrokenResourceError, self._rt.ClosedResourceError) as exc:
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
