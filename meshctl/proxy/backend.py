"""The network backend: where the proxy's sockets come from (httpcore's backends style).

Everything in proxy/ that opens, accepts or inspects a connection goes
through the ``NetworkBackend`` the runtime was given:

    await backend.connect(address, port)  -> stream        upstream legs (both pools, TCP bindings);
                                                            raises stream.UpstreamConnectError
    backend.listen(address, port)         -> BackendListener   a bound listener; raises OSError
    await listener.accept()               -> (stream, client ip)
    backend.peer_gone(stream)             -> bool          has the peer closed its side? (a waiting
                                                            client that hung up, ConnState.client_gone)
    backend.is_alive(stream)              -> bool          may an idle pooled connection be reused?

Streams are ``aio.Stream`` with two extras the pools use: ``closed``
and ``close_now()`` (close without waiting).

``SocketBackend`` (production) hands out proxy/stream.py's FastSocketStream:
raw non-blocking sockets that try the syscall first. proxy/testing.py has a
``MemoryBackend`` over trio.testing memory streams, so the proxy path runs
in tests with ``MockClock(autojump_threshold=0)``: no sockets, no sleeps.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

import meshctl.proxy.aio as aio
from .stream import FastSocketStream, accept, bind_listener, connect_tcp, is_alive

__all__ = ["NetworkBackend", "BackendListener", "SocketBackend", "SocketListener"]


class BackendListener(Protocol):
    """A listening socket of a backend."""

    @property
    def bound_port(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    async def accept(self) -> tuple[Any, str]:
        """The next connection and its client's IP. Raises OSError or
        aio.ClosedResourceError once the listener is closed."""
        ...

    def close(self) -> None: ...


class NetworkBackend(Protocol):
    async def connect(self, address: str, port: int) -> Any: ...

    def listen(self, address: str, port: int, backlog: int = 1024) -> BackendListener: ...

    def peer_gone(self, stream: Any) -> bool: ...

    def is_alive(self, stream: Any) -> bool: ...


class SocketListener:
    """A bound, non-blocking listening socket (stream.bind_listener)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def bound_port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    async def accept(self) -> tuple[FastSocketStream, str]:
        sock, addr = await accept(self.sock)
        return FastSocketStream(sock), (addr[0] if isinstance(addr, tuple) else "")

    def close(self) -> None:
        try:
            aio.notify_closing(self.sock)
        except RuntimeError:
            pass
        self.sock.close()


class SocketBackend:
    """Production: FastSocketStream over real sockets."""

    async def connect(self, address: str, port: int) -> FastSocketStream:
        return await connect_tcp(address, port)

    def listen(self, address: str, port: int, backlog: int = 1024) -> SocketListener:
        return SocketListener(bind_listener(address, port, backlog=backlog))

    def peer_gone(self, stream: Any) -> bool:
        """One MSG_PEEK on the stream's socket (pipelined bytes mean the peer is still
        there). A stream without a socket of its own (TLS keeps it inside) says no."""
        sock = getattr(stream, "socket", None)
        if not isinstance(sock, socket.socket):
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def is_alive(self, stream: Any) -> bool:
        return is_alive(stream)
