"""meshctl's own errors for the proxy's I/O, mapped once at the stream edge.

The streams say a peer went away with two exceptions of the runtime (aio.py)
(``aio.BrokenResourceError``: reset, write after the peer closed;
``aio.ClosedResourceError``: our side already closed it). The proxy's code
never catches those: the few places that touch a stream (the event readers,
``send_all``/``receive_some`` below, the multiplexed connections' write loops)
turn them into ``PeerGone``, as httpcore maps its backends' exceptions, and
everything above catches ``PeerGone`` only.

    PeerGone          the peer of a stream is gone (either side)
     └ DownstreamGone the client went away (reset, EOF mid-body): nothing more
                      can be sent to it

``linger`` closes a connection in stages (RFC 9112 9.6) when the peer may still
be sending: see its doc.
"""

from __future__ import annotations

from typing import Final

import meshctl.proxy.aio as aio

__all__ = ["PeerGone", "DownstreamGone", "STREAM_ERRORS", "send_all", "receive_some", "send_eof", "linger",
           "LINGER_SECONDS"]

# How long a connection closed with the peer still sending is read from after its last
# response (``linger``): Envoy's delayed_close_timeout is 1 s, nginx's lingering_timeout 5 s
LINGER_SECONDS: Final = 2.0

# The exceptions a stream raises when its connection is over (aio's: trio's or streamtypes.py's).
# Only the edge functions of the proxy (this module, pool.EventReader, the
# HTTP/2 write loops) name them.
STREAM_ERRORS = (aio.BrokenResourceError, aio.ClosedResourceError)


class PeerGone(Exception):
    """The connection's peer is gone: reset, closed, or closed by us."""


class DownstreamGone(PeerGone):
    """The client went away (reset, EOF mid-body): nothing more can be sent to it."""


async def send_all(stream: aio.SendStream, data: bytes) -> None:
    """``stream.send_all(data)``; raises PeerGone when the peer is gone."""
    try:
        await stream.send_all(data)
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None


async def receive_some(stream: aio.ReceiveStream) -> bytes:
    """``stream.receive_some()``; raises PeerGone when the peer is gone."""
    try:
        return await stream.receive_some()  # type: ignore[return-value]  # bytes from every stream we use
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None


async def send_eof(stream: aio.HalfCloseableStream) -> None:
    """``stream.send_eof()``; raises PeerGone when the peer is gone."""
    try:
        await stream.send_eof()
    except STREAM_ERRORS as exc:
        raise PeerGone(str(exc) or type(exc).__name__) from None


async def linger(stream: aio.Stream, seconds: float = LINGER_SECONDS) -> None:
    """A lingering close (RFC 9112 9.6, "Tear-down"), before the caller closes ``stream``:
    half-close (our FIN goes after the last response), then read and drop what the peer
    still sends until it closes too, or for ``seconds`` at most.

    For a connection that ends with request bytes the proxy did not read (a request body
    an early answer left unread, or an error reply to a malformed request): closing it at
    once, with those bytes in the receive buffer, makes the kernel send a TCP reset instead
    of a FIN, and the reset can destroy the answer before the peer has read it (and makes
    the peer's own write of the rest fail). A peer that read the answer (whose head says
    ``connection: close``) closes its side, which ends the wait at once."""
    with aio.move_on_after(seconds):
        try:
            if hasattr(stream, "send_eof"):
                await send_eof(stream)  # type: ignore[arg-type]  # (the streams that have one half-close)
            # (not receive_some above: compiled, it checks for bytes, and a memory stream gives bytearray)
            while await stream.receive_some():
                pass
        except PeerGone:
            pass
        except STREAM_ERRORS:
            pass
