"""The stream interface of a sidecar on evloop, without importing trio.

A sidecar on trio uses trio's stream ABCs (``trio.abc.Stream`` and its family) and
trio's exceptions for a stream that is closed, broken or busy. A sidecar on evloop
(proxy/evloop.py) imports no trio at all: trio with its dependencies (attrs, outcome,
sortedcontainers, idna, sniffio) cost a sidecar ~4 MB of resident memory, an eighth of it
(bench/README.md, rss.sh: plain 35.3 → 31.1 MB after load). So evloop uses these
classes instead. They have the same names, the same abstract methods and the same
meaning as trio's. proxy/aio.py binds the names the modules use (``aio.Stream``,
``aio.ClosedResourceError``, ...) to one set or the other, once per process, so code
that catches ``aio.BrokenResourceError`` works on both runtimes.

Not compiled (setup.py): mypyc builds no native class on an ``ABCMeta`` base.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

__all__ = [
    "AsyncResource", "BrokenResourceError", "BusyResourceError", "ClosedResourceError", "HalfCloseableStream",
    "ReceiveStream", "SendStream", "Stream", "TooSlowError", "WouldBlock",
]


class ClosedResourceError(Exception):
    """This side already closed the stream (or another task closed the fd we wait on)."""


class BrokenResourceError(Exception):
    """The peer went away: reset, or a write after the peer closed."""


class BusyResourceError(Exception):
    """Another task is already sending, receiving or waiting on this resource."""


class TooSlowError(Exception):
    """A ``fail_after``/``fail_at`` deadline expired."""


class WouldBlock(Exception):
    """A non-blocking operation could not be done without waiting."""


class AsyncResource(metaclass=ABCMeta):
    """Something closed with ``await aclose()``, also as an ``async with``."""

    __slots__ = ()

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SendStream(AsyncResource):
    __slots__ = ()

    @abstractmethod
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    async def wait_send_all_might_not_block(self) -> None: ...


class ReceiveStream(AsyncResource):
    """``receive_some`` returns b"" at end of stream; ``async for`` yields the chunks until then."""

    __slots__ = ()

    @abstractmethod
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    def __aiter__(self) -> ReceiveStream:
        return self

    async def __anext__(self) -> bytes | bytearray:
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data


class Stream(SendStream, ReceiveStream):
    __slots__ = ()


class HalfCloseableStream(Stream):
    """A stream whose sending side closes on its own (``send_eof``: TCP's FIN)."""

    __slots__ = ()

    @abstractmethod
    async def send_eof(self) -> None: ...
