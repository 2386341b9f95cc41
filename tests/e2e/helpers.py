"""Helpers for end-to-end tests: a tiny app, a load generator, process handling."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HELLO_APP = Path(__file__).with_name("hello_app.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_next_block = itertools.count()


def mesh_ports() -> tuple[str, int]:
    """A fresh block of 100 ports: ``settings.portRange`` for a mesh, and one spare
    port above that range for its ingress gateway.

    The blocks lie in 22000-32699: below Linux's ephemeral range (32768-60999), so no
    client socket of any process on the machine takes a planned port between the plan
    and the bind, and above meshctl's default range (21000-21999), so a developer's own
    mesh is left alone. Each call gives the next block; the first one depends on the
    pid, so two test runs side by side differ.
    """
    block = (os.getpid() * 13 + next(_next_block)) % 107
    base = 22000 + block * 100
    return f"{base}-{base + 98}", base + 99


BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"


def bookinfo_workdir(work: Path) -> int:
    """Copy the Bookinfo example into ``work`` with ports of its own; returns the
    ingress gateway's port."""
    shutil.copytree(BOOKINFO / "apps", work / "apps", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(BOOKINFO / "rules", work / "rules")
    port_range, gw_port = mesh_ports()
    text = (BOOKINFO / "mesh.yaml").read_text()
    assert "portRange: 21000-21999" in text and "{80: 8080}" in text, "examples/bookinfo/mesh.yaml changed its ports"
    text = text.replace("portRange: 21000-21999", f"portRange: {port_range}").replace("{80: 8080}", f"{{80: {gw_port}}}")
    (work / "mesh.yaml").write_text(text)
    return gw_port


def meshctl_popen(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    e = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    e.update(env or {})
    p = subprocess.Popen([sys.executable, "-m", "meshctl", *args], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=e, start_new_session=True)
    out.close()
    return p


def meshctl_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, timeout=timeout, env=e)
    if r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def start_hello(port: int, version: str, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    p = subprocess.Popen([sys.executable, str(HELLO_APP), str(port), version], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    wait_port(port)
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_http(port: int, path: str = "/ready", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(port, path)
            if 200 <= status < 300:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"127.0.0.1:{port}{path} not ready after {timeout}s")


def http_get(port: int, target: str, host: str = "localhost", timeout: float = 5.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    bodies: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for s, n in self.statuses.items() if s >= 500)


class LoadGenerator:
    """Keep-alive HTTP/1.1 GETs at a fixed total rate from a few threads, counting
    every status and every error (a reset, a timeout, a malformed response)."""

    def __init__(self, port: int, url: str, rps: float, connections: int = 5) -> None:
        self.port, self.url, self.rps, self.connections = port, url, rps, connections
        self.result = LoadResult()
        self.marks: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "LoadGenerator":
        for i in range(self.connections):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def total_so_far(self) -> int:
        """Requests done (answered or failed) so far, read while the load runs."""
        with self._lock:
            return self.result.total

    def mark(self) -> None:
        """End a phase of the test (warm-up, a restart, an outage...): see ran_in_every_phase."""
        self.marks.append(self.total_so_far())

    def ran_in_every_phase(self) -> bool:
        """Requests were done in every phase (up to each mark, and from the last mark to the end):
        the load really ran throughout. Counted per phase, not as a rate, which a loaded machine
        would decide (the suite asserted "more than N requests" before, and slow runs failed it)."""
        ends = [*self.marks, self.total_so_far()]
        return all(b > a for a, b in zip([0, *ends], ends))

    def _record(self, status: int | None, body: bytes = b"", error: str = "") -> None:
        with self._lock:
            if status is None:
                self.result.errors.append(error)
            else:
                self.result.statuses[status] += 1
                self.result.bodies[body.strip()[:40]] += 1

    def _run(self, i: int) -> None:
        interval = self.connections / self.rps
        next_at = time.monotonic() + interval * i / self.connections
        sock = None
        buf = b""
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                sock.sendall(f"GET {self.url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("connection closed before a response")
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                length = 0
                close = False
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                    if k.strip().lower() == b"connection" and v.strip().lower() == b"close":
                        close = True
                while len(buf) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("connection closed mid-body")
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                self._record(status, body)
                if close:
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError) as e:
                self._record(None, error=f"{e.__class__.__name__}: {e}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()
