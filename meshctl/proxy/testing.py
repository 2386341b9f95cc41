"""A network backend in memory (backend.NetworkBackend), for tests: no sockets.

    backend = MemoryBackend()
    backend.serve("127.0.0.1", 9080, app, nursery)       # an upstream: app(stream) per connection
    rt = ProxyRuntime(backend=backend)                    # listeners bind in memory
    stream = await backend.connect("127.0.0.1", 15001)    # a client of the proxy's listener

Connections are pairs of ``trio.testing.memory_stream_one_way_pair()``, so
with ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``)
the whole proxy path (retries, per-try timeouts, circuit breaking, drain)
runs in a unit test in no real time. An address nobody serves refuses the
connection (UpstreamConnectError), as a closed port does.
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

import trio
import trio.testing

from .stream import UpstreamConnectError

__all__ = ["MemoryBackend", "MemoryStream", "MemoryListener", "request_heads"]

App = Callable[["MemoryStream"], Awaitable[None]]


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection, with the extras the proxy's pools use
    (``closed``, ``close_now()``); ``eof_sent`` tells the other end's backend
    that this side hung up (what MSG_PEEK sees on a socket)."""

    def __init__(self, send: trio.testing.MemorySendStream, recv: trio.testing.MemoryReceiveStream) -> None:
        self._send = send
        self._recv = recv
        self.peer: MemoryStream | None = None
        self.eof_sent = False
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError("stream was closed")
        if self.eof_sent:
            raise trio.ClosedResourceError("send_eof() was called")
        if self.peer is not None and self.peer.closed:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection reset by peer")
        await self._send.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._send.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("stream was closed")
        return bytes(await self._recv.receive_some(max_bytes))

    async def send_eof(self) -> None:
        if not self.eof_sent and not self.closed:
            self.eof_sent = True
            await self._send.aclose()
        else:
            await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.eof_sent = True
        self._send.close()
        self._recv.close()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


def memory_connection() -> tuple[MemoryStream, MemoryStream]:
    """A connected (client, server) pair."""
    s1, r1 = trio.testing.memory_stream_one_way_pair()
    s2, r2 = trio.testing.memory_stream_one_way_pair()
    a = MemoryStream(s1, r2)
    b = MemoryStream(s2, r1)
    a.peer = b
    b.peer = a
    return a, b


class MemoryListener:
    """A listening address of the memory backend."""

    def __init__(self, backend: "MemoryBackend", key: tuple[str, int]) -> None:
        self.backend = backend
        self.key = key
        self._send, self._recv = trio.open_memory_channel[MemoryStream](1024)
        self.closed = False

    @property
    def bound_port(self) -> int:
        return self.key[1]

    async def accept(self) -> tuple[MemoryStream, str]:
        if self.closed:
            raise trio.ClosedResourceError("listener closed")
        try:
            stream = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None
        return stream, "127.0.0.1"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backend.listeners.pop(self.key, None)
        self._send.close()
        self._recv.close()


class MemoryBackend:
    """backend.NetworkBackend in memory (see the module doc)."""

    def __init__(self) -> None:
        self.listeners: dict[tuple[str, int], MemoryListener] = {}
        self.apps: dict[tuple[str, int], tuple[App, trio.Nursery]] = {}
        self.connects: list[tuple[str, int]] = []  # every connect asked for, in order
        self._next_port = 40000

    def serve(self, address: str, port: int, app: App, nursery: trio.Nursery) -> None:
        """Run ``app(stream)`` in ``nursery`` for every connection to address:port."""
        self.apps[(address, port)] = (app, nursery)

    async def connect(self, address: str, port: int) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        key = (address, port)
        self.connects.append(key)
        lst = self.listeners.get(key)
        if lst is not None:
            client, server = memory_connection()
            lst._send.send_nowait(server)
            return client
        app = self.apps.get(key)
        if app is not None:
            client, server = memory_connection()
            app[1].start_soon(_run_app, app[0], server)
            return client
        raise UpstreamConnectError(address, port, "connection refused")

    def listen(self, address: str, port: int, backlog: int = 1024) -> MemoryListener:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        key = (address, port)
        if key in self.listeners:
            raise OSError(98, f"cannot listen on {address}:{port}: Address already in use")
        lst = self.listeners[key] = MemoryListener(self, key)
        return lst

    def peer_gone(self, stream: MemoryStream) -> bool:
        peer = stream.peer
        return peer is not None and peer.eof_sent

    def is_alive(self, stream: MemoryStream) -> bool:
        return not stream.closed and not self.peer_gone(stream)


async def _run_app(app: App, stream: MemoryStream) -> None:
    try:
        await app(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        stream.close_now()


async def request_heads(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """The request heads (up to the blank line) a keep-alive HTTP/1.1 client sends on
    ``stream``, one at a time, until it closes: the read loop of the tests' and benches'
    toy upstreams (bodiless requests only)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some()
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        yield head
