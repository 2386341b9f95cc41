"""Shared helpers for integration tests: real sockets, real processes.

- ``free_port()``: a port nothing listens on right now.
- ``Upstream``: a small real HTTP/1.1 server (stdlib http.server in a thread,
  independent of meshctl's codec) with endpoints that echo, stream, fail,
  stall, reset and upgrade, and that counts connections and requests.
- ``running_proxy(cfg)``: ProxyRuntime in the test's trio loop (real sockets).
- ``ProxyProcess`` / the ``proxy_process`` fixture: ``meshctl proxy run`` as a
  real child process, started and waited for on /ready.
- ``config(...)``: build a ProxyConfig for tests from plain values.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from meshctl.model.base import Duration, FrozenDict
from meshctl.model.istio import (
    Destination,
    HTTPRetry,
    HTTPRoute,
    HTTPRouteDestination,
    PortSelector,
)
from meshctl.model.proxyconfig import (
    Cluster,
    Endpoint,
    Listener,
    ProxyConfig,
    RouteTable,
    Settings,
    VirtualHost,
    Workload,
    cluster_name,
    fqdn,
)

MESHCTL = str(Path(sys.executable).parent / "meshctl")

# Test modules import these helpers as ``proxy_testkit``: a unique name that
# cannot collide with another directory's conftest module.
sys.modules.setdefault("proxy_testkit", sys.modules[__name__])


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ upstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.owner.lock:
            self.server.owner.connections += 1

    # -- body helpers

    def _body_chunks(self):
        te = (self.headers.get("transfer-encoding") or "").lower()
        if te == "chunked":
            while True:
                line = self.rfile.readline()
                if not line:  # the client went away mid-body
                    return
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    if not data:
                        return
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            n = int(self.headers.get("content-length") or 0)
            while n:
                data = self.rfile.read(min(n, 1 << 20))
                if not data:
                    return
                n -= len(data)
                yield data

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-upstream", self.server.owner.name)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- dispatch

    def _handle(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with owner.lock:
            owner.requests.append((self.command, self.path, [(k.lower(), v) for k, v in self.headers.items()]))
        route = url.path
        if route == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            self.connection.close()
            return
        if route == "/then-close":
            # answer with keep-alive, then close the idle connection shortly after
            sock = self.connection

            def shut() -> None:
                sock.shutdown(socket.SHUT_RDWR)
                owner.closed_idle.set()

            threading.Timer(int(q.get("ms", "100")) / 1000, shut).start()
        if route == "/slow" and q.get("only", owner.name) == owner.name:
            time.sleep(int(q.get("ms", "1000")) / 1000)
        if route == "/flaky" and q.get("only", owner.name) == owner.name:
            key = q.get("key", "k")
            with owner.lock:
                owner.hits[key] = owner.hits.get(key, 0) + 1
                n = owner.hits[key]
            if n <= int(q.get("fail", "1")):
                for _ in self._body_chunks():
                    pass
                self._send(503, b"failing on purpose\n")
                return
        if route == "/say":  # answers ?text=..., or ?<its name>=... when given (v2 answering another body)
            self._send(200, q.get(owner.name, q.get("text", "")).encode())
            return
        if route == "/ws" and (self.headers.get("upgrade") or "").lower() == "websocket":
            self.send_response(101)
            self.send_header("upgrade", "websocket")
            self.send_header("connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            sock = self.connection
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(b"echo:" + data)
            sock.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        if route == "/download":
            n = int(q.get("n", "0"))
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            if self.command == "HEAD":
                return
            block = b"d" * (1 << 20)
            while n:
                k = min(n, len(block))
                self.wfile.write(block[:k] if k < len(block) else block)
                n -= k
            return
        if route == "/upload":
            total = 0
            for c in self._body_chunks():
                total += len(c)
            self._send(200, json.dumps({"received": total}).encode(), "application/json")
            return
        if route == "/stream-echo":
            # echo each request chunk back as a response chunk as soon as it arrives
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for c in self._body_chunks():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b"".join(self._body_chunks())
        info = {
            "upstream": owner.name,
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        self._send(200, json.dumps(info).encode(), "application/json")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "Upstream"

    def handle_error(self, request, client_address) -> None:
        # A client (the proxy) going away mid-response is what several tests do on
        # purpose. The handler thread can outlive its test, and socketserver's report
        # printed then would land half in one test's captured output and half on the
        # terminal (a lone "Traceback (most recent call last):" in a CI log).
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class Upstream:
    """A real HTTP/1.1 server on 127.0.0.1 in a background thread."""

    def __init__(self, name: str = "up", address: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list = []
        self.hits: dict[str, int] = {}
        self.closed_idle = threading.Event()  # /then-close shut its connection down
        self._srv = _Server((address, port), _Handler)
        self._srv.owner = self
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


@pytest.fixture
def upstreams():
    made: list[Upstream] = []

    def make(name: str = "up", address: str = "127.0.0.1", port: int = 0) -> Upstream:
        u = Upstream(name, address, port)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


@pytest.fixture
def upstream(upstreams) -> Upstream:
    return upstreams("up")


# ------------------------------------------------------------------ configs


def route_to(host: str, port: int, *, subsets: dict[str | None, int] | None = None, timeout: float | None = None,
             retries: HTTPRetry | None = None, **extra) -> HTTPRoute:
    subsets = subsets or {None: 100}
    dests = tuple(
        HTTPRouteDestination(
            destination=Destination(host=fqdn(host), subset=s, port=PortSelector(number=port)),
            weight=w if len(subsets) > 1 else None,
        )
        for s, w in subsets.items()
    )
    return HTTPRoute(route=dests, timeout=Duration(timeout) if timeout is not None else None, retries=retries, **extra)


def vhost(host: str, port: int, routes: tuple[HTTPRoute, ...]) -> VirtualHost:
    f = fqdn(host)
    return VirtualHost(name=f"{f}:{port}", domains=(host, f"{host}:{port}", f, f"{f}:{port}"), routes=routes)


def cluster(host: str, port: int, endpoints: list[tuple[str, int]] | list[Endpoint], subset: str | None = None,
            protocol: str = "http") -> Cluster:
    eps = tuple(e if isinstance(e, Endpoint) else Endpoint(address=e[0], port=e[1]) for e in endpoints)
    name = cluster_name(fqdn(host), port, subset)
    return Cluster(name=name, service=fqdn(host), port=port, subset=subset, protocol=protocol, endpoints=eps)


def config(*, listeners: list[Listener], vhosts: list[VirtualHost] = (), clusters: list[Cluster] = (),
           version: str = "v1", settings: Settings | None = None) -> ProxyConfig:
    return ProxyConfig(
        version=version,
        workload=Workload(name="test-0", service="test", labels=FrozenDict(app="test")),
        listeners=tuple(listeners),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=tuple(vhosts))),
        clusters=FrozenDict({c.name: c for c in clusters}),
        settings=settings or Settings(connect_timeout=Duration(1.0), drain_timeout=Duration(5.0)),
    )


def registry_only(cfg: ProxyConfig) -> ProxyConfig:
    """``cfg`` with Istio's outboundTrafficPolicy REGISTRY_ONLY: an unknown host is a
    local 502 (NR) instead of passing through (proxy/egress.py)."""
    from dataclasses import replace

    return replace(cfg, settings=replace(cfg.settings, outbound_traffic_policy="REGISTRY_ONLY"))


def outbound_listener(port: int, name: str = "outbound") -> Listener:
    return Listener(name=name, direction="outbound", address="127.0.0.1", port=port, route_table="outbound")


# ------------------------------------------------------------------ proxies


@asynccontextmanager
async def running_proxy(cfg: ProxyConfig, **kw):
    """ProxyRuntime serving ``cfg`` inside the test's trio loop."""
    from meshctl.proxy.runtime import ProxyRuntime

    rt = ProxyRuntime(**kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(rt.run, cfg, admin_port=0, handle_signals=False))
        try:
            yield rt
        finally:
            rt.drain()


def write_config(cfg: ProxyConfig, path: Path) -> Path:
    from meshctl.loader.proxyconfig import dump_proxy_config

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dump_proxy_config(cfg), indent=1))
    os.replace(tmp, path)
    return path


def sidecar_env(loop: str | None = None) -> dict[str, str]:
    """The environment of a sidecar child process: this one's, with MESHCTL_PROXY_LOOP set to
    ``loop``, else to MESHCTL_TEST_PROXY_LOOP if that is set (the children then run on that loop,
    while this process stays on trio); ``loop="default"``: the variable unset (the sidecar's default)."""
    env = dict(os.environ)
    if loop == "default":
        env.pop("MESHCTL_PROXY_LOOP", None)
        return env
    loop = loop or env.get("MESHCTL_TEST_PROXY_LOOP")
    if loop:
        env["MESHCTL_PROXY_LOOP"] = loop
    return env


class ProxyProcess:
    """``meshctl proxy run`` as a child process."""

    def __init__(self, cfg: ProxyConfig, workdir: Path, loop: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = write_config(cfg, workdir / "proxy.json")
        self.admin_port = free_port()
        self.log_path = workdir / "proxy.log"
        self._log = open(self.log_path, "wb")
        self.state_dir = workdir / "state"  # its admin /config, /mirror, /traces answer this mesh credential
        self.proc = subprocess.Popen(
            [MESHCTL, "proxy", "run", "--config", str(self.config_path), "--admin-port", str(self.admin_port),
             "--state-dir", str(self.state_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**sidecar_env(loop), **(env or {})},
        )
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        deadline = time.monotonic() + 60  # a process start-up: generous for a loaded machine
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.admin + "/ready", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy not ready after 60s: {self.log()}")
            time.sleep(0.05)

    @property
    def auth(self) -> dict[str, str]:
        """The ``Authorization`` header with the mesh credential, for admin /config, /mirror, /traces."""
        return {"authorization": "Bearer " + (self.state_dir / "auth" / "mesh.token").read_text().strip()}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def proxy_process():
    made: list[ProxyProcess] = []
    tmp = tempfile.TemporaryDirectory()

    def start(cfg: ProxyConfig, name: str = "p", loop: str | None = None,
              env: dict[str, str] | None = None) -> ProxyProcess:
        d = Path(tmp.name) / f"{name}{len(made)}"
        d.mkdir()
        p = ProxyProcess(cfg, d, loop, env)
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()
    tmp.cleanup()


async def curl(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run curl with the given arguments; returns the completed process (stdout/stderr as bytes)."""
    return await trio.run_process(["curl", "-sS", "--max-time", "20", *args], capture_stdout=True,
                                  capture_stderr=True, check=check)


def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send raw bytes, read until the peer closes (or timeout). Returns (bytes, closed_by_peer)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    s.sendall(data)
    out = b""
    closed = False
    try:
        while True:
            d = s.recv(65536)
            if not d:
                closed = True
                break
            out += d
    except (socket.timeout, ConnectionResetError):
        closed = isinstance(sys.exc_info()[1], ConnectionResetError)
    s.close()
    return out, closed
