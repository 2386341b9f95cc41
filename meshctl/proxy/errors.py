"""meshctl's own errors for the proxy's I/O, mapped once at the stream edge.

trio streams say a peer went away with two library exceptions
(``trio.BrokenResourceError``: reset, write after the peer closed;
``trio.ClosedResourceError``: our side already closed it). The proxy's code
never catches those: the few places that touch a stream (the event readers,
``send_all``/``receive_some`` below, the multiplexed connections' write loops)
turn them into ``PeerGone``, as httpcore maps its backends' exceptions, and
everything above catches ``PeerGone`` only.

    PeerGone          the peer of a stream is gone (either side)
     └ DownstreamGone the client went away (reset, EOF mid-body): nothing more
                      can be sent to it
"""

from __future__ import annotations

import trio

__all__ = ["PeerGone", "DownstreamGone", "STREAM_ERRORS", "send_all", "receive_some", "send_eof"]

# The library exceptions a trio stream raises when its connection is over.
# Only the edge functions of the proxy (this module, pool.EventReader, the
# HTTP/2 write loops) name them.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class PeerGone(Exception):
    """The connection's peer is gone: reset, closed, or closed by us."""


class DownstreamGone(PeerGone):
    """The client went away (reset, EOF mid-body): nothing more can be sent to it."""


async def send_all(stream: trio.abc.SendStream, data: bytes) -> None:
    """``stream.send_all(data)``; raises PeerGone when the peer is gone."""
    try:
        await stream.send_all(data)
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None


async def receive_some(stream: trio.abc.ReceiveStream) -> bytes:
    """``stream.receive_some()``; raises PeerGone when the peer is gone."""
    try:
        return await stream.receive_some()  # type: ignore[return-value]  # bytes from every stream we use
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None


async def send_eof(stream: trio.abc.HalfCloseableStream) -> None:
    """``stream.send_eof()``; raises PeerGone when the peer is gone."""
    try:
        await stream.send_eof()
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None
