"""OutBuffer: one multiplexed connection's outgoing bytes, written in emit order.

Over a plain socket the emitting task writes itself when the socket takes the
bytes at once (no trip through the writer task); what the kernel does not take
is left to the writer task. Either way the peer must get every byte, in the
order the streams emitted them, and a writer that the peer stops reading must
not lose or reorder anything."""

from __future__ import annotations

import socket

import trio

from meshctl.proxy.outbuf import OutBuffer
from meshctl.proxy.stream import FastSocketStream


class _Out(OutBuffer):
    __slots__ = ("stream", "dead")

    def __init__(self, stream) -> None:
        self.stream = stream
        self.dead = False
        self._init_out()


def _socket_pair() -> tuple[FastSocketStream, FastSocketStream]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return FastSocketStream(a), FastSocketStream(b)


async def _read_all(stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await stream.receive_some()
        assert data, "peer closed early"
        got += data
    return bytes(got)


async def test_a_small_write_goes_out_from_the_emitting_task_without_the_writer():
    a, b = _socket_pair()
    out = _Out(a)
    # no writer task at all: the bytes still reach the peer, because kick() writes them
    out.emit(b"frame-1")
    out.kick()
    assert out.written == out.emitted == 7
    with trio.fail_after(5):
        assert await _read_all(b, 7) == b"frame-1"
        await out.wait_written()  # nothing left: returns at once


async def test_bytes_the_socket_cannot_take_are_written_by_the_writer_in_order():
    a, b = _socket_pair()
    out = _Out(a)
    chunks = [bytes([65 + i % 26]) * (1000 + 37 * i) for i in range(200)]  # far above the socket buffers
    expected = b"".join(chunks)

    async def stream_task(part: list[bytes]) -> None:
        for c in part:
            out.emit(c)
            await out.wait_written()

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(out.write_loop)
            # a slow peer: the sends hit EAGAIN, so the writer task must take over
            reader_done = trio.Event()
            got = bytearray()

            async def reader() -> None:
                while len(got) < len(expected):
                    await trio.sleep(0.001)
                    got.extend(await b.receive_some(3000))
                reader_done.set()

            n.start_soon(reader)
            # one emitter at a time keeps a single global order to compare with
            await stream_task(chunks[:100])
            for c in chunks[100:]:
                out.emit(c)
                out.kick()
            await out.wait_written()
            await reader_done.wait()
            n.cancel_scope.cancel()
    assert bytes(got) == expected
    assert out.written == out.emitted == len(expected)


async def test_a_broken_socket_is_reported_by_the_writer_not_by_kick():
    a, b = _socket_pair()
    out = _Out(a)
    b.close_now()
    out.emit(b"x" * 10)
    out.kick()  # must not raise: the writer task reports the broken connection
    from meshctl.proxy.errors import PeerGone

    with trio.fail_after(5):
        try:
            await out.write_loop()
        except PeerGone:
            pass
        else:  # pragma: no cover
            raise AssertionError("the writer did not report the broken socket")
