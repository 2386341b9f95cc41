"""Shared plumbing for the Bookinfo example services (standard library only).

Each service is a tiny routing table on top of ``http.server``:

* ``App`` maps (method, path regex) to a handler ``fn(req, match) -> Response``;
* ``serve()`` parses ``--port``/``PORT`` (default 9080), binds 127.0.0.1,
  prints ``<name> listening on http://127.0.0.1:<port>`` to stderr (so a
  launcher that passes port 0 can learn the real port) and logs one line per
  request to stderr;
* ``call()`` makes an outbound GET with ``urllib`` through an opener built
  with ``ProxyHandler()``, which reads ``HTTP_PROXY``/``http_proxy`` and
  ``NO_PROXY``/``no_proxy`` from the environment. That is how the mesh gets
  in between without the services knowing about it.

The services talk HTTP/1.1 with keep-alive and always send Content-Length,
so a sidecar can keep its upstream connections open.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

DEFAULT_PORT = 9080

# Headers a service must copy from its inbound request to the requests it
# makes, so that traces join up and header-based routing (end-user, cookie)
# keeps working one hop further down. Names as Istio's Bookinfo documents them.
TRACE_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
)
CONTEXT_HEADERS = ("user-agent", "cookie", "authorization", "jwt")


# --------------------------------------------------------------------------
# requests and responses


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-cased names; first value wins
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def cookies(self) -> dict[str, str]:
        raw = self.headers.get("cookie")
        if not raw:
            return {}
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return {}
        return {k: m.value for k, m in jar.items()}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(obj: object, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json")


def html_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "text/html; charset=utf-8")


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(302, b"", "text/plain; charset=utf-8", [("Location", location), *(headers or [])])


def forward_headers(req: Request, names: tuple[str, ...]) -> dict[str, str]:
    """The subset of ``req``'s headers named in ``names`` (those present)."""
    return {n: req.headers[n] for n in names if n in req.headers}


Handler = Callable[[Request, "re.Match[str]"], Response]


class App:
    """A routing table: first (method, regex) whose regex fully matches wins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.routes.append((method, re.compile(pattern), fn))
            return fn

        return deco

    def dispatch(self, req: Request) -> Response:
        allowed: list[str] = []
        for method, rx, fn in self.routes:
            m = rx.fullmatch(req.path)
            if m is None:
                continue
            if method != req.method:
                allowed.append(method)
                continue
            return fn(req, m)
        if allowed:
            return Response(405, b"method not allowed\n", headers=[("Allow", ", ".join(allowed))])
        return Response(404, f"{self.name}: no route for {req.path}\n".encode())


# --------------------------------------------------------------------------
# outbound calls


@dataclass
class Upstream:
    """Outcome of one outbound call. ``status`` is None when no HTTP response
    arrived (connect error, timeout, reset); ``error`` then says why."""

    status: int | None
    body: bytes = b""
    error: str = ""

    def json(self) -> object | None:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


_opener: urllib.request.OpenerDirector | None = None


def opener() -> urllib.request.OpenerDirector:
    """One opener per process. ``ProxyHandler()`` with no argument reads the
    proxy settings from the environment when it is built."""
    global _opener
    if _opener is None:
        _opener = urllib.request.build_opener(urllib.request.ProxyHandler())
    return _opener


def call(url: str, headers: dict[str, str], timeout: float) -> Upstream:
    """GET ``url``; never raises for network or HTTP errors."""
    req = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with opener().open(req, timeout=timeout) as resp:
            return Upstream(resp.status, resp.read())
    except urllib.error.HTTPError as e:
        try:
            body = e.read()
        except (OSError, http.client.HTTPException):
            body = b""
        return Upstream(e.code, body, f"HTTP {e.code} from {url}")
    except urllib.error.URLError as e:
        return Upstream(None, b"", f"cannot reach {url}: {e.reason}")
    except (OSError, http.client.HTTPException, ValueError) as e:
        # TimeoutError while reading, connection reset, malformed response...
        return Upstream(None, b"", f"call to {url} failed: {type(e).__name__}: {e}")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SystemExit(f"{name}={raw!r} must be a positive number of seconds")
    return value


def service_url(svc: str, override_env: str) -> str:
    """Base URL of another Bookinfo service: ``<SVC>_URL`` if set, else
    ``http://<SVC_HOSTNAME or svc><SERVICES_DOMAIN>:<SVC_SERVICE_PORT or 9080>``."""
    url = os.environ.get(override_env)
    if url:
        return url.rstrip("/")
    up = svc.upper()
    host = os.environ.get(f"{up}_HOSTNAME", svc)
    domain = os.environ.get("SERVICES_DOMAIN", "")
    if domain and not domain.startswith("."):
        domain = "." + domain
    port = os.environ.get(f"{up}_SERVICE_PORT", str(DEFAULT_PORT))
    return f"http://{host}{domain}:{port}"


# --------------------------------------------------------------------------
# the server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in one write anyway
    timeout = 300  # seconds an idle keep-alive connection may hold a thread
    app: App  # set on the subclass made by serve()

    def _handle(self) -> None:
        start = time.monotonic()
        path, _, query = self.path.partition("?")
        if path.startswith("http://") or path.startswith("https://"):
            # absolute-form (we were addressed as a proxy): keep the path part
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            headers.setdefault(k.lower(), v)
        body = b""
        if "transfer-encoding" in headers:
            resp = Response(411, b"chunked request bodies are not supported; send Content-Length\n")
            self.close_connection = True
        else:
            try:
                length = int(headers.get("content-length", "0") or "0")
            except ValueError:
                length = -1
            if length < 0 or length > 1 << 20:
                resp = Response(400, b"bad Content-Length\n")
                self.close_connection = True
            else:
                body = self.rfile.read(length) if length else b""
                method = "GET" if self.command == "HEAD" else self.command
                req = Request(method, path, query, headers, body)
                try:
                    resp = self.app.dispatch(req)
                except Exception as e:  # a bug in a handler: answer 500, keep serving
                    msg = f"{self.app.name}: internal error: {type(e).__name__}: {e}"
                    sys.stderr.write(msg + "\n")
                    resp = Response(500, (msg + "\n").encode())
        self._send(resp)
        ms = (time.monotonic() - start) * 1000
        sys.stderr.write(
            f'{self.app.name} {self.client_address[0]} "{self.command} {self.path}" '
            f"{resp.status} {len(resp.body)} {ms:.1f}ms\n"
        )
        sys.stderr.flush()

    def _send(self, resp: Response) -> None:
        self.send_response_only(resp.status)
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for k, v in resp.headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # end of head and the body in a single write
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(resp.body)
        self.flush_headers()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # protocol errors from http.server; requests are logged by _handle
        sys.stderr.write(f"{self.app.name} {self.client_address[0]} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(app: App, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=app.name, description=f"Bookinfo {app.name} service")
    parser.add_argument("--port", type=int, default=None, help="port (default: $PORT or 9080; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)
    port = args.port
    if port is None:
        raw = os.environ.get("PORT", str(DEFAULT_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise SystemExit(f"{app.name}: PORT={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SystemExit(f"{app.name}: port {port} is out of range 0-65535")

    handler = type(f"{app.name}Handler", (_Handler,), {"app": app})
    try:
        server = _Server((args.host, port), handler)
    except OSError as e:
        raise SystemExit(f"{app.name}: cannot listen on {args.host}:{port}: {e.strerror or e}") from None

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, bound = server.server_address[:2]
    sys.stderr.write(f"{app.name} listening on http://{host}:{bound}\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
