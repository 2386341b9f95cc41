"""Real registry servers for the test suite: a Consul dev agent and a Eureka server.

Session-scoped fixtures, registered as a pytest plugin by tests/conftest.py:

- ``consul_agent``: ``consul://127.0.0.1:<port>`` of a ``consul agent -dev``
  on free loopback ports;
- ``zipkin_server``: ``zipkin://127.0.0.1:<port>`` of Maven Central's Zipkin exec jar;
- ``otlp_receiver``: ``http://127.0.0.1:<port>`` of the OpenTelemetry Collector's
  OTLP receiver (scripts/tools/otlp-receiver.sh); ``.out``: the OTLP JSON lines it received;
- ``eureka_server``: ``eureka://127.0.0.1:<port>/eureka`` of the small Spring
  Boot Eureka server built by scripts/tools/eureka.sh.

Each yields a :class:`ServerURL`: a ``str`` (the registry URL, ready for
``open_registry``) that also has ``.http`` (the plain HTTP base URL),
``.stop()``, ``.start()`` and ``.restart()``, so that tests can take the
server away and bring it back on the same port. The binaries are built by
scripts/tools/*.sh on first use (cached in $MESHCTL_TOOLS or
~/.cache/meshctl-tools); a build failure fails the test with the build output.
Servers are stopped (their whole process group killed) at the end of the session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "tools"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the sockets stay bound until all are chosen (free_port
    called twice in a row may hand out the same port twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def build_tool(script: str) -> str:
    """Run scripts/tools/<script> (cached build) and return the path it prints."""
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script)], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/tools/{script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}{proc.stdout[-1000:]}",
            pytrace=False,
        )
    return proc.stdout.strip().splitlines()[-1]


class ServerProcess:
    """A server process in its own process group, restartable with the same command."""

    def __init__(self, name: str, argv: list[str], ready: Callable[[], bool], log_path: Path, start_timeout: float):
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} while starting; log:\n{self._tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.start_timeout:g}s; log:\n{self._tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Reap anything left in the group (e.g. a JVM helper).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


class ServerURL(str):
    """The registry URL of a running test server, with its controls."""

    http: str
    server: ServerProcess

    def __new__(cls, url: str, http: str, server: ServerProcess) -> "ServerURL":
        self = super().__new__(cls, url)
        self.http = http
        self.server = server
        return self

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def restart(self) -> None:
        self.server.stop()
        self.server.start()


def _http_ok(url: str, check: Callable[[bytes], bool] = lambda body: True) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200 and check(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory):
    """A Consul dev agent on free loopback ports; yields its consul:// URL."""
    binary = build_tool("consul.sh")
    workdir = tmp_path_factory.mktemp("consul")
    # Four distinct ports: a serf WAN port equal to the LAN one stops the agent at start.
    http_port, server_port, lan_port, wan_port = free_ports(4)
    argv = [
        binary, "agent", "-dev",
        "-bind=127.0.0.1", "-client=127.0.0.1", "-node=meshctl-test",
        f"-http-port={http_port}", "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
        f"-server-port={server_port}", f"-serf-lan-port={lan_port}", f"-serf-wan-port={wan_port}",
        "-log-level=warn",
    ]  # fmt: skip
    http = f"http://127.0.0.1:{http_port}"
    # Ready once the agent elected itself leader and has synced its own node.
    server = ServerProcess(
        "consul agent",
        argv,
        lambda: _http_ok(f"{http}/v1/status/leader", lambda b: b.strip() not in (b"", b'""'))
        and _http_ok(f"{http}/v1/catalog/nodes", lambda b: b"meshctl-test" in b),
        workdir / "consul.log",
        start_timeout=60,
    )
    server.start()
    try:
        yield ServerURL(f"consul://127.0.0.1:{http_port}", http, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def eureka_server(tmp_path_factory):
    """A standalone Eureka server on a free loopback port; yields its eureka:// URL."""
    jar = build_tool("eureka.sh")
    workdir = tmp_path_factory.mktemp("eureka")
    port = free_port()
    argv = [
        "java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss512k", "-Xmx256m",
        "-jar", jar,
        f"--server.port={port}", "--server.address=127.0.0.1",
        "--eureka.server.eviction-interval-timer-in-ms=500",
    ]  # fmt: skip
    http = f"http://127.0.0.1:{port}/eureka"
    server = ServerProcess(
        "eureka server",
        argv,
        lambda: _http_ok(f"{http}/apps"),
        workdir / "eureka.log",
        start_timeout=120,
    )
    server.start()
    try:
        yield ServerURL(f"eureka://127.0.0.1:{port}/eureka", http, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zipkin_server(tmp_path_factory):
    """A Zipkin server (Maven Central's io.zipkin:zipkin-server exec jar, in-memory
    storage) on a free loopback port; yields its zipkin:// URL (``.http``: its API base)."""
    jar = build_tool("zipkin.sh")
    workdir = tmp_path_factory.mktemp("zipkin")
    port = free_port()
    argv = [
        "java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss512k", "-Xmx256m",
        "-jar", jar, f"--server.port={port}", "--server.address=127.0.0.1",
    ]  # fmt: skip
    http = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        "zipkin server",
        argv,
        lambda: _http_ok(f"{http}/health"),
        workdir / "zipkin.log",
        start_timeout=120,
    )
    server.start()
    try:
        yield ServerURL(f"zipkin://127.0.0.1:{port}", http, server)
    finally:
        server.stop()


class OTLPReceiver(str):
    """The OTLP/HTTP base URL of a running collector OTLP receiver; ``.out`` is the file of
    OTLP JSON lines (one export request a line, as the collector decoded it)."""

    out: Path
    server: ServerProcess

    def __new__(cls, url: str, out: Path, server: ServerProcess) -> "OTLPReceiver":
        self = super().__new__(cls, url)
        self.out = out
        self.server = server
        return self


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def otlp_receiver(tmp_path_factory):
    """The OpenTelemetry Collector's OTLP receiver (otlpreceiver, built from the Go module
    proxy by scripts/tools/otlp-receiver.sh) on a free loopback port, OTLP/HTTP."""
    binary = build_tool("otlp-receiver.sh")
    workdir = tmp_path_factory.mktemp("otlp")
    port = free_port()
    out = workdir / "spans.jsonl"
    server = ServerProcess(
        "otlp receiver",
        [binary, "-http", f"127.0.0.1:{port}", "-out", str(out)],
        lambda: _tcp_open(port),
        workdir / "otlp-receiver.log",
        start_timeout=30,
    )
    server.start()
    try:
        yield OTLPReceiver(f"http://127.0.0.1:{port}", out, server)
    finally:
        server.stop()
