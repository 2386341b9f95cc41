"""``FastSocketStream``: the plain-socket stream of every HTTP/1.1 leg, compiled with mypyc.

A socket stream that tries the syscall first (see shared/PERFORMANCE.md).
trio's own ``SocketStream.receive_some`` yields to the scheduler on every
call, even when bytes are already waiting. In a proxy hop that doubles the
trips through epoll. ``FastSocketStream`` calls ``recv`` / ``send`` on the
non-blocking socket directly and only
parks (``trio.lowlevel.wait_readable`` / ``wait_writable``) when the kernel
says ``EAGAIN``. Every park is a cancellation point; to stay fair to other
connections, and to deliver cancellation to a task that never has to park,
it also runs an explicit ``trio.lowlevel.checkpoint()`` every
``checkpoint_every`` calls.

It is a native class when compiled (setup.py's COMPILED), so it cannot inherit
the stream ABCs (mypyc compiles no class with an ABCMeta base as native): it is
registered as a virtual ``aio.HalfCloseableStream`` instead, which is what
``isinstance`` checks see, and it has every method of one (``__aenter__`` /
``__aexit__`` included). TLS wraps it (stream.py's TLSSocketStream takes over
its socket) and tests can swap it for ``trio.testing.memory_stream_pair()``.

Errors are mapped at this edge: connection resets and broken pipes become
``aio.BrokenResourceError``; use after ``aclose()`` is
``aio.ClosedResourceError``.

stream.py re-exports everything here; import it from there.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from typing import Any, Final

import meshctl.proxy.aio as aio

DEFAULT_CHECKPOINT_EVERY: Final = 32
RECV_SIZE: Final = 65536

# One receive buffer for every stream of the process, for stream.py's TLS stream
# (receive_some() there copies the bytes out before it can yield, so no two streams
# ever use it at once; saves 64 KiB per connection). The plain stream needs none.
SHARED: Final = bytearray(RECV_SIZE)
SHARED_VIEW: Final = memoryview(SHARED)

_wait_readable: Final = aio.wait_readable
_wait_writable: Final = aio.wait_writable
_checkpoint: Final = aio.checkpoint

_perf_counter: Final = time.perf_counter
_monotonic: Final = time.monotonic

_TCP_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_LOST: Final = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)
# what a non-blocking recv raises when it would have to wait for the peer's bytes
# (plain socket: EAGAIN; the SSLSocket of a TLS stream that took this one's socket over)
_WOULD_READ: Final = (BlockingIOError, ssl.SSLWantReadError)


def tune_socket(sock: socket.socket) -> None:
    """Non-blocking, TCP_NODELAY (header + body in separate writes otherwise
    stall on Nagle and delayed ACK)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not a TCP socket
            pass


def _receive_error(stream: FastSocketStream, exc: Exception) -> aio.ClosedResourceError | aio.BrokenResourceError:
    if isinstance(exc, _LOST):
        return aio.BrokenResourceError(f"connection lost: {exc}")
    if stream._closed or isinstance(exc, ValueError) or getattr(exc, "errno", None) == errno.EBADF:
        return aio.ClosedResourceError("stream was closed")
    return aio.BrokenResourceError(f"receive failed: {exc}")


def _send_error(stream: FastSocketStream, exc: OSError) -> aio.ClosedResourceError | aio.BrokenResourceError:
    if isinstance(exc, _LOST):
        return aio.BrokenResourceError(f"connection lost: {exc}")
    if stream._closed:
        return aio.ClosedResourceError("stream was closed")
    return aio.BrokenResourceError(f"send failed: {exc}")


class FastSocketStream:
    """A HalfCloseableStream over a plain non-blocking ``socket.socket``."""

    def __init__(self, sock: socket.socket, *, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 park_after_send: bool = True, quickack: bool = False) -> None:
        tune_socket(sock)
        self.socket = sock
        # No peer identity on a plain socket (telemetry's getattr(rq.down, "peer_id",
        # None) on every request finds it instead of raising; TLSSocketStream has its own).
        self.peer_id: str | None = None
        # Upstream legs: ACK what arrives at once. An app that writes its
        # response head and body in two send()s without TCP_NODELAY (Python's
        # http.server does) holds the body back until the head is ACKed, and
        # on a reused keep-alive connection Linux delays that ACK by ~40 ms.
        # Quick-ACK mode does not stick, so it is re-armed after every read.
        self.quickack = quickack and _TCP_QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        # Request/response traffic: right after we send, the peer cannot have
        # answered yet, so the next receive waits for readability first instead
        # of spending a recv() on EAGAIN. Streaming reads (no send in between)
        # still try the syscall first.
        self.park_after_send = park_after_send
        self._park_next = False
        self._calls = 0
        self._every = max(1, checkpoint_every)
        self._closed = False
        self._recv_busy = False
        self._send_busy = False
        self._eof_sent = False

    def ack_now(self) -> None:
        """ACK what has been read at once (quick-ACK mode; see ``quickack``)."""
        if _TCP_QUICKACK is None:
            return
        try:
            self.socket.setsockopt(_IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass

    # -------------------------------------------------------------- receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._recv_busy:
            raise aio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        size = RECV_SIZE if max_bytes is None or max_bytes > RECV_SIZE else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._recv_busy = True
        try:
            sock = self.socket
            if self._park_next:
                # right after a send the answer cannot be there yet: wait for it
                # instead of spending a recv() on EAGAIN
                self._park_next = False
                self._calls = 0
                await _wait_readable(sock)
            else:
                self._calls += 1
                if self._calls >= self._every:
                    self._calls = 0
                    await _checkpoint()
            while True:
                try:
                    # recv() itself, not recv_into() a shared buffer and a copy out of it:
                    # one call and one object (the bytes, shrunk to what came) instead of
                    # three calls, a slice and a memoryview (~14% less CPU per call, loopback)
                    data = sock.recv(size)
                except _WOULD_READ:
                    await _wait_readable(sock)
                    continue
                except (OSError, ValueError) as exc:  # (ValueError: closed under us)
                    raise _receive_error(self, exc) from exc
                if data and self.quickack:
                    sock.setsockopt(_IPPROTO_TCP, _TCP_QUICKACK, 1)  # type: ignore[arg-type]
                return data
        finally:
            self._recv_busy = False

    async def receive_into(self, buffer: memoryview | bytearray) -> int:
        """Receive into the caller's buffer without a copy; 0 means EOF."""
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        self._calls += 1
        if self._calls >= self._every:
            self._calls = 0
            await _checkpoint()
        sock = self.socket
        while True:
            try:
                return sock.recv_into(buffer)
            except BlockingIOError:
                await _wait_readable(sock)
            except OSError as exc:
                raise _receive_error(self, exc) from exc

    # -------------------------------------------------------------- send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise aio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise aio.ClosedResourceError("send_eof() was called: this side is closed for sending")
        self._send_busy = True
        try:
            self._calls += 1
            if self._calls >= self._every:
                self._calls = 0
                await _checkpoint()
            sock = self.socket
            total = len(data)
            if not total:
                return
            self._park_next = self.park_after_send
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _send_error(self, exc) from exc
            if sent == total:
                return
            with memoryview(data) as view:
                while sent < total:
                    await _wait_writable(sock)
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        continue
                    except OSError as exc2:  # (its own name: compiled code types an except variable once)
                        raise _send_error(self, exc2) from exc2
        finally:
            self._send_busy = False

    def send_nowait(self, data: bytes) -> int:
        """Send what the socket takes now, without parking: the number of bytes sent (0: it
        takes none now, or another task is sending). For a task that would otherwise wake a
        writer task to send a few bytes (outbuf.py). Errors as send_all's."""
        if self._send_busy:
            return 0
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise aio.ClosedResourceError("send_eof() was called: this side is closed for sending")
        self._park_next = self.park_after_send
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _send_error(self, exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise aio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        self._send_busy = True
        try:
            await _wait_writable(self.socket)
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise aio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise aio.ClosedResourceError("stream was closed")
        await _checkpoint()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # peer already gone: nothing left to half-close

    # -------------------------------------------------------------- close

    def close_now(self) -> None:
        """Close synchronously (wakes any task parked on this socket)."""
        if self._closed:
            return
        self._closed = True
        try:
            aio.notify_closing(self.socket)
        except RuntimeError:  # outside trio (tests, shutdown)
            pass
        self.socket.close()

    async def aclose(self) -> None:
        self.close_now()
        await _checkpoint()

    async def __aenter__(self) -> FastSocketStream:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.socket.fileno()


# a HalfCloseableStream to isinstance() (relay's half-close, trio's helpers), not by inheritance (see above)
aio.HalfCloseableStream.register(FastSocketStream)


class FastClock:
    """A run's clock, read without interpreted frames or generic method calls.

    ``trio.current_time()`` is three interpreted calls (and ``clock.current_time()``
    one); a request asks the clock several times. trio's own ``SystemClock`` is
    ``offset + time.perf_counter()`` with a fixed offset, which ``now`` computes
    natively; evloop's ``SystemClock`` is ``time.monotonic()`` (offset 0), read the
    same way (asked through a generic method call it cost ~1,000 instructions a
    read); any other clock (``trio.testing.MockClock``, evloop's ``MockClock``) is
    asked as usual. Made once per connection, inside the run whose clock it reads."""

    __slots__ = ("clock", "system", "offset", "mono")

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        cls = type(clock)
        self.system = cls.__name__ == "SystemClock" and cls.__module__.startswith("trio.")
        self.offset = float(clock.offset) if self.system else 0.0
        # (by name: importing evloop here would load it into every trio sidecar)
        self.mono = cls.__name__ == "SystemClock" and cls.__module__ == "meshctl.proxy.evloop"

    def now(self) -> float:
        if self.system:
            return self.offset + _perf_counter()
        if self.mono:
            return _monotonic()
        return float(self.clock.current_time())
