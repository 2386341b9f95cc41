"""A small network of "hosts" for multi-host tests: Linux network namespaces.

::

    ns <tag>-h1 (10.213.0.1/24, lo)    ns <tag>-h2 (10.213.0.2)    ns <tag>-h3 (10.213.0.3)
           eth0                               eth0                        eth0
             |  veth                            |                           |
    ns <tag>-sw:  h1 ------------------------ br0 ------------------------ h2, h3

Every interface lives in a namespace made here: the hosts' ``eth0`` and the
switch (a bridge in a namespace of its own), so nothing is added to the
machine's own network and all traffic stays inside the test's namespaces.
The subnet exists only inside them. ``link_down(i)`` unplugs host i's cable
at the switch (a partition), ``kill_host(i)`` kills every process in its
namespace. ``close()`` kills every process of every namespace and deletes the
namespaces (their interfaces go with them), on any failure too.

The test process itself stays in the machine's namespace: it runs commands in
a host with ``ip netns exec`` (``run``/``popen``) and talks to a host's sockets
from threads that entered its namespace with setns(2) (``in_host``; a thread's
network namespace is its own, the sockets it opens stay in that namespace).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

SUBNET = "10.213.0"  # 10.213.0.0/24: exists only inside the test's namespaces
CLONE_NEWNET = 0x40000000


class LabUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, no netns support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def why_unavailable() -> str | None:
    """Why this runner cannot make network namespaces, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); this runner is not root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.setns


class NetLab:
    def __init__(self, hosts: int = 3, tag: str | None = None) -> None:
        why = why_unavailable()
        if why:
            raise LabUnavailable(why)
        self.tag = tag or f"mh{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(1, hosts + 1)]
        self.addresses = [f"{SUBNET}.{i}" for i in range(1, hosts + 1)]
        self._pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
        self._made: list[str] = []
        try:
            self._build()
        except subprocess.CalledProcessError as e:
            self.close()
            raise LabUnavailable(f"cannot build the test network: `{' '.join(e.cmd)}`: {e.stderr.strip()}") from None

    # ------------------------------------------------------------ building

    def _build(self) -> None:
        for ns in (self.switch, *self.names):
            _ip("netns", "del", ns, check=False)  # a leftover of a killed run with the same pid
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addresses), start=1):
            port = f"h{i}"
            _ip("link", "add", f"{self.tag}x{i}", "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"{self.tag}x{i}", "name", port)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    # ------------------------------------------------------------ running things in a host

    def netns(self, host: int) -> str:
        return self.names[host - 1]

    def address(self, host: int) -> str:
        return self.addresses[host - 1]

    def argv(self, host: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def run(self, host: int, argv: list[str], *, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"host {host}: {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, host: int, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(self.argv(host, argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **kw)

    def in_host(self, host: int, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn()`` in a thread that lives in host's network namespace."""
        return self.pool(host).submit(fn).result(timeout)

    def pool(self, host: int, workers: int = 8) -> concurrent.futures.ThreadPoolExecutor:
        """Threads in host's network namespace (made once per host)."""
        if host not in self._pools:
            path = f"/var/run/netns/{self.netns(host)}"
            setns = _libc_setns()

            def enter() -> None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    if setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({path})")
                finally:
                    os.close(fd)

            self._pools[host] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"ns-h{host}", initializer=enter)
        return self._pools[host]

    # ------------------------------------------------------------ failures

    def pids(self, host: int) -> list[int]:
        out = _ip("netns", "pids", self.netns(host), check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, host: int) -> int:
        """SIGKILL every process in host's namespace (until none is left); how many were killed."""
        killed: set[int] = set()
        for _ in range(20):
            pids = [p for p in self.pids(host) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return len(killed)

    def link_down(self, host: int) -> None:
        """Unplug host's cable at the switch: nothing goes in or out."""
        _ip("-n", self.switch, "link", "set", f"h{host}", "down")

    def link_up(self, host: int) -> None:
        _ip("-n", self.switch, "link", "set", f"h{host}", "up")

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()
        for i, ns in enumerate(self.names, start=1):
            if ns in self._made:
                self.kill_host(i)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()


def wait_for(what: str, check: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - reported if it never succeeds
            last = e
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g}s (last: {last!r})")
        time.sleep(interval)


