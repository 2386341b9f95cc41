"""A minimal epoll loop and two relays on it, for bench/miniloop.py (compiled with mypyc there).

Not product code: it prices an event loop that is not trio for the proxy's connections.

* ``Loop``: one ``select.epoll``; each socket registered once (level-triggered EPOLLIN, or
  edge-triggered with ``edge=True``), EPOLLOUT added only while a write is blocked;
  callback objects (``Handler.on_event``, a native method call), no coroutines; timers
  in a heap (``call_at``/``Timer.cancel``, lazy deletion) and the clock read once per pass
  while a timer is pending.
* ``ByteRelay``: the shape of hop_bench.py's ``--toy`` relay (one upstream connection per
  downstream one, one read taken as one message, relayed as it comes).
* ``H1Relay``: meshctl's HTTP/1.1 codecs (``H1Server`` downstream, ``H1Client`` upstream,
  imported from the build on sys.path): the request head parsed, an upstream connection
  taken from a keep-alive pool (round robin over the given addresses when a new one is
  needed), the head serialized, the response parsed and re-serialized; a per-request
  deadline checked by a once-a-second sweep (one clock read per request).
"""

from __future__ import annotations

import heapq
import select
import socket
import time
from typing import Any, Callable, Coroutine, Generator

from meshctl.protocol.events import Data, EndOfMessage, RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLET = select.EPOLLET
EPOLLERR_HUP = select.EPOLLERR | select.EPOLLHUP
BUF = 65536


class Timer:
    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when = when
        self.cb = cb
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Handler:
    """A registered socket's owner: the loop calls ``on_event`` with epoll's mask."""

    def on_event(self, ev: int) -> None:
        raise NotImplementedError


class Loop:
    def __init__(self, edge: bool = False) -> None:
        self.ep = select.epoll()
        self.edge = edge
        self.handlers: dict[int, Handler] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self.seq = 0
        self.running = True
        self.passes = 0
        self.events = 0

    def fileno(self) -> int:
        return self.ep.fileno()

    def add(self, fd: int, h: Handler) -> None:
        self.handlers[fd] = h
        self.ep.register(fd, EPOLLIN | EPOLLET if self.edge else EPOLLIN)

    def want_write(self, fd: int, on: bool) -> None:
        base = EPOLLIN | EPOLLET if self.edge else EPOLLIN
        self.ep.modify(fd, base | EPOLLOUT if on else base)

    def remove(self, fd: int) -> None:
        del self.handlers[fd]
        try:
            self.ep.unregister(fd)
        except OSError:
            pass

    def call_at(self, when: float, cb: Callable[[], None]) -> Timer:
        t = Timer(when, cb)
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, t))
        return t

    def run_once(self, timeout: float) -> int:
        """One pass: wait at most ``timeout`` (-1: until an event or the next timer), run the
        ready handlers, then the due timers. Returns the number of events handled."""
        timers = self.timers
        if timers:
            now = time.monotonic()
            delay = timers[0][0] - now
            if delay < 0:
                delay = 0.0
            if timeout < 0 or delay < timeout:
                timeout = delay
        events = self.ep.poll(timeout, 256)
        handlers = self.handlers
        for fd, ev in events:
            h = handlers.get(fd)
            if h is not None:
                h.on_event(ev)
        if timers:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                t = heapq.heappop(timers)[2]
                if not t.cancelled:
                    t.cb()
        self.passes += 1
        n = len(events)
        self.events += n
        return n

    def run(self) -> None:
        while self.running:
            self.run_once(-1)


def _nodelay(s: socket.socket) -> None:
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Stats:
    """When every expected downstream connection has come and gone, the loop stops."""

    def __init__(self, loop: Loop, expect: int) -> None:
        self.loop = loop
        self.expect = expect
        self.accepted = 0
        self.closed = 0

    def conn_closed(self) -> None:
        self.closed += 1
        if self.expect and self.closed >= self.expect:
            self.loop.running = False


class Side(Handler):
    """One socket of a relay: reads go to ``on_data``; writes try the syscall first and
    only a short one keeps the rest and waits for EPOLLOUT."""

    def __init__(self, loop: Loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.out = b""
        self.closed = False
        loop.add(self.fd, self)

    def on_event(self, ev: int) -> None:
        if ev & EPOLLOUT and self.out:
            self._flush()
        if ev & (EPOLLIN | EPOLLERR_HUP):
            while True:
                try:
                    data = self.sock.recv(BUF)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if data:
                    self.on_data(data)
                else:
                    self.on_eof()
                    return
                # level-triggered: the loop comes back if more is there; edge-triggered: read on
                # until a short read (the buffer drained) or EAGAIN
                if not self.loop.edge or len(data) < BUF or self.closed:
                    return

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_eof(self) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            return
        if n < len(data):
            self.out = data[n:]
            self.loop.want_write(self.fd, True)

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.out = self.out[n:]
        if not self.out:
            self.loop.want_write(self.fd, False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove(self.fd)
            self.sock.close()


# ------------------------------------------------------------------ (b) the byte relay


class ByteSide(Side):
    def __init__(self, loop: Loop, sock: socket.socket, stats: Stats | None) -> None:
        super().__init__(loop, sock)
        self.peer: ByteSide | None = None
        self.stats = stats

    def on_data(self, data: bytes) -> None:
        p = self.peer
        if p is not None:
            p.send(data)

    def on_eof(self) -> None:
        self.close()
        p = self.peer
        if p is not None:
            p.close()
        if self.stats is not None:
            self.stats.conn_closed()


class Listener(Handler):
    def __init__(self, loop: Loop, sock: socket.socket, stats: Stats, make: Callable[[socket.socket], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.stats = stats
        self.make = make
        sock.setblocking(False)
        loop.add(sock.fileno(), self)

    def on_event(self, ev: int) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except BlockingIOError:
                return
            _nodelay(s)
            self.stats.accepted += 1
            self.make(s)


def connect_up(addr: tuple[str, int]) -> socket.socket:
    """A blocking connect (loopback: immediate), then non-blocking."""
    u = socket.create_connection(addr)
    _nodelay(u)
    return u


def byte_relay(loop: Loop, lsock: socket.socket, up: tuple[str, int], expect: int) -> Stats:
    stats = Stats(loop, expect)

    def make(s: socket.socket) -> None:
        d = ByteSide(loop, s, stats)
        u = ByteSide(loop, connect_up(up), None)
        d.peer = u
        u.peer = d

    Listener(loop, lsock, stats, make)
    return stats


# ------------------------------------------------ (b') the byte relay as compiled coroutines


class Park:
    """``await park``: the running task waits until its fd is readable (the loop resumes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __await__(self) -> Generator[Any, None, None]:
        yield self


class CoroTask(Handler):
    """A compiled ``async def`` run by the loop: each socket it owns is registered once (level-
    triggered) with the task as its handler; an event on the fd it parked on resumes it."""

    def __init__(self, loop: Loop, coro: Coroutine[Any, Any, None], fds: list[int]) -> None:
        self.loop = loop
        self.coro = coro
        self.fds = fds
        self.waiting = -1
        for fd in fds:
            loop.add(fd, self)
        self.step()

    def step(self) -> None:
        try:
            p: Park = self.coro.send(None)
        except StopIteration:
            for fd in self.fds:
                self.loop.remove(fd)
            return
        self.waiting = p.fd

    def on_event(self, ev: int) -> None:
        self.step()


async def coro_conn(stats: Stats, down: socket.socket, up: socket.socket) -> None:
    """hop_bench.py's toy relay written as trio code would be, parked on Park instead of trio."""
    rd_down = Park(down.fileno())
    rd_up = Park(up.fileno())
    try:
        while True:
            await rd_down
            try:
                data = down.recv(BUF)
            except BlockingIOError:
                continue
            if not data:
                return
            up.send(data)  # (the toy's messages are small: a loopback send takes them whole)
            while True:
                await rd_up
                try:
                    answer = up.recv(BUF)
                    break
                except BlockingIOError:
                    continue
            down.send(answer)
    finally:
        down.close()
        up.close()
        stats.conn_closed()


def coro_relay(loop: Loop, lsock: socket.socket, up: tuple[str, int], expect: int) -> Stats:
    stats = Stats(loop, expect)

    def make(s: socket.socket) -> None:
        u = connect_up(up)
        CoroTask(loop, coro_conn(stats, s, u), [s.fileno(), u.fileno()])

    Listener(loop, lsock, stats, make)
    return stats


# ------------------------------------------------------------------ (c) the HTTP/1.1 relay


class Pool:
    def __init__(self, loop: Loop, ups: list[tuple[str, int]]) -> None:
        self.loop = loop
        self.ups = ups
        self.next = 0
        self.idle: list[UpSide] = []
        self.live: dict[int, H1Down] = {}  # downstream connections, for the deadline sweep

    def take(self) -> UpSide:
        idle = self.idle
        while idle:
            u = idle.pop()
            if not u.closed:
                return u
        addr = self.ups[self.next % len(self.ups)]
        self.next += 1
        return UpSide(self.loop, connect_up(addr), self)

    def sweep(self) -> None:
        now = time.monotonic()
        for d in list(self.live.values()):
            if d.deadline and d.deadline < now:
                d.timeout()
        self.loop.call_at(now + 1.0, self.sweep)


class UpSide(Side):
    def __init__(self, loop: Loop, sock: socket.socket, pool: Pool) -> None:
        super().__init__(loop, sock)
        self.client = H1Client()
        self.pool = pool
        self.down: H1Down | None = None

    def on_data(self, data: bytes) -> None:
        d = self.down
        if d is None:  # bytes on an idle connection: drop it
            self.close()
            return
        client = self.client
        server = d.server
        try:
            events = client.feed(data)
        except Exception:
            self.close()
            d.close()
            return
        out: list[bytes] = []
        done = False
        for ev in events:
            t = type(ev)
            if t is ResponseHead:
                assert isinstance(ev, ResponseHead)
                out.append(server.response_head(ev))
            elif t is Data:
                assert isinstance(ev, Data)
                out.append(server.data(ev.data))
            elif t is EndOfMessage:
                assert isinstance(ev, EndOfMessage)
                out.append(server.end(ev.trailers))
                done = True
        if out:
            d.send(b"".join(out) if len(out) > 1 else out[0])
        if done:
            d.deadline = 0.0
            self.down = None
            if client.keep_alive:
                client.next_exchange()
                self.pool.idle.append(self)
            else:
                self.close()
            if not server.keep_alive:
                d.close()

    def on_eof(self) -> None:
        self.close()
        d = self.down
        if d is not None:
            d.close()


class H1Down(Side):
    def __init__(self, loop: Loop, sock: socket.socket, pool: Pool, stats: Stats) -> None:
        super().__init__(loop, sock)
        self.server = H1Server()
        self.pool = pool
        self.stats = stats
        self.up: UpSide | None = None
        self.parts: list[bytes] = []
        self.head: RequestHead | None = None
        self.deadline = 0.0
        pool.live[self.fd] = self

    def on_data(self, data: bytes) -> None:
        try:
            events = self.server.feed(data)
        except Exception:
            self.close()
            return
        for ev in events:
            t = type(ev)
            if t is RequestHead:
                assert isinstance(ev, RequestHead)
                self.head = ev
                self.deadline = time.monotonic() + 15.0
                taken = self.pool.take()
                taken.down = self
                self.up = taken
            elif t is Data:
                assert isinstance(ev, Data)
                u = self.up
                head = self.head
                if u is not None:
                    if head is not None:
                        self.parts.append(u.client.request_head(head))
                        self.head = None
                    self.parts.append(u.client.data(ev.data))
            elif t is EndOfMessage:
                u = self.up
                head = self.head
                if u is not None:
                    if head is not None:  # no body: the head alone
                        u.send(u.client.request_head(head, end_stream=True))
                        self.head = None
                    else:
                        self.parts.append(u.client.end())
                        u.send(b"".join(self.parts))
                        self.parts = []
        if self.parts and self.up is not None:
            self.up.send(b"".join(self.parts))
            self.parts = []

    def timeout(self) -> None:
        self.send(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.close()

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.pool.live.pop(self.fd, None)
            u = self.up
            if u is not None and u.down is self:
                u.close()
            self.stats.conn_closed()


def h1_relay(loop: Loop, lsock: socket.socket, ups: list[tuple[str, int]], expect: int) -> Stats:
    stats = Stats(loop, expect)
    pool = Pool(loop, ups)
    loop.call_at(time.monotonic() + 1.0, pool.sweep)

    def make(s: socket.socket) -> None:
        H1Down(loop, s, pool, stats)

    Listener(loop, lsock, stats, make)
    return stats


def run_loop(loop: Loop) -> None:
    loop.run()

