"""FastSocketStream: the try-the-syscall-first socket stream."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from meshctl.proxy.stream import (
    FastSocketStream,
    UpstreamConnectError,
    bind_listener,
    connect_tcp,
    is_alive,
    relay,
)
from meshctl.proxy.sockstream import FastClock


def _pair(**kw) -> tuple[FastSocketStream, FastSocketStream]:
    a, b = socket.socketpair()
    return FastSocketStream(a, **kw), FastSocketStream(b, **kw)


async def test_passes_trio_generic_stream_tests():
    # trio's checker insists every call is a checkpoint; with checkpoint_every=1
    # the stream does that, and everything else (EOF, half-close, busy errors,
    # close while parked, cancellation) is checked as for trio's own streams.
    async def maker():
        return _pair(checkpoint_every=1)

    async def clogged():
        a, b = _pair(checkpoint_every=1)
        # fill the send buffer so that send_all blocks
        for x in (a, b):  # both directions: the checker also flips the pair
            x.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            try:
                while True:
                    x.socket.send(b"x" * 65536)
            except BlockingIOError:
                pass
        return a, b

    await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_data_already_waiting_is_received_without_parking():
    a, b = _pair(checkpoint_every=1000)
    a.socket.send(b"hello")
    # no other task runs between the send and the receive: the data is read
    # by the first syscall, and the receive does not need the scheduler
    assert await b.receive_some() == b"hello"
    await a.aclose()
    await b.aclose()


async def test_a_busy_stream_still_yields_to_other_tasks():
    """Even if data is always ready, every N calls there is a checkpoint."""
    a, b = _pair(checkpoint_every=4)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        await trio.sleep(0)
        start = ticks
        for _ in range(40):
            await a.send_all(b"x")
            await b.receive_some()
        assert ticks > start  # the ticker ran while we looped
        n.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()


async def test_receive_is_cancellable_while_parked():
    a, b = _pair()
    with trio.move_on_after(0.05) as cs:
        await b.receive_some()
    assert cs.cancelled_caught
    # the stream is still usable afterwards and nothing was lost
    await a.send_all(b"after")
    assert await b.receive_some() == b"after"
    await a.aclose()
    await b.aclose()


async def test_send_all_larger_than_socket_buffer_completes_with_a_reader():
    a, b = _pair()
    payload = os.urandom(8 * 1024 * 1024)
    got = bytearray()

    async def reader():
        while len(got) < len(payload):
            got.extend(await b.receive_some())

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await a.send_all(payload)
    assert bytes(got) == payload
    await a.aclose()
    await b.aclose()


async def test_peer_reset_is_broken_resource_error():
    a, b = _pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b.socket.send(b"unread")  # unread data makes close() send RST
    await trio.sleep(0.01)
    a.socket.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(10):
            await b.send_all(b"x" * 65536)
            await trio.sleep(0.01)
    await b.aclose()


async def test_close_wakes_a_parked_receiver_with_closed_resource_error():
    a, b = _pair()

    async def closer():
        await trio.sleep(0.02)
        await b.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(closer)
        with pytest.raises(trio.ClosedResourceError):
            await b.receive_some()
    await a.aclose()


async def test_connect_sets_nodelay_and_reports_refused_port():
    lst = bind_listener("127.0.0.1", 0)
    port = lst.getsockname()[1]
    s = await connect_tcp("127.0.0.1", port)
    assert s.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    await s.aclose()
    lst.close()
    with pytest.raises(UpstreamConnectError) as ei:
        await connect_tcp("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(ei.value)
    assert "refused" in str(ei.value).lower()


async def test_is_alive_sees_a_peer_close():
    a, b = _pair()
    assert is_alive(a)
    await b.aclose()
    assert not is_alive(a)
    await a.aclose()


async def test_relay_moves_bytes_both_ways_and_propagates_half_close():
    # client <-> [x  relay  y] <-> server, all real sockets (splice path)
    client, x = _pair()
    y, server = _pair()
    big = os.urandom(3 * 1024 * 1024)
    got_server = bytearray()
    got_client = bytearray()

    async def server_side():
        while True:
            d = await server.receive_some()
            if not d:
                break
            got_server.extend(d)
        # client half-closed; the server can still answer
        await server.send_all(b"reply after eof")
        await server.send_eof()

    async def client_side():
        await client.send_all(big)
        await client.send_eof()
        while True:
            d = await client.receive_some()
            if not d:
                break
            got_client.extend(d)

    async with trio.open_nursery() as n:
        n.start_soon(relay, x, y)
        n.start_soon(server_side)
        n.start_soon(client_side)
    assert bytes(got_server) == big
    assert bytes(got_client) == b"reply after eof"
    for s in (client, x, y, server):
        await s.aclose()


async def test_relay_over_memory_streams_copies():
    a1, a2 = trio.testing.memory_stream_pair()
    b1, b2 = trio.testing.memory_stream_pair()

    async def far_end():
        data = b""
        while True:
            d = await b2.receive_some()
            if not d:
                break
            data += d
        await b2.send_all(data.upper())
        await b2.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(relay, a2, b1)
        n.start_soon(far_end)
        await a1.send_all(b"ping")
        await a1.send_eof()
        assert await a1.receive_some() == b"PING"


async def test_fast_clock_reads_the_runs_clock():
    # the system clock natively (offset + perf_counter), in step with trio's own reading
    clock = FastClock(trio.lowlevel.current_clock())
    assert clock.system
    before = trio.current_time()
    now = clock.now()
    after = trio.current_time()
    assert before <= now <= after
    await trio.sleep(0.01)
    assert clock.now() - now >= 0.01


async def test_fast_clock_asks_any_other_clock(autojump_clock):
    # a MockClock (as the forwarder's tests use) is asked, so its jumps show
    clock = FastClock(trio.lowlevel.current_clock())
    assert not clock.system
    start = clock.now()
    await trio.sleep(30)
    assert clock.now() == start + 30 == trio.current_time()


def test_fast_clock_reads_evloops_system_clock_natively():
    # evloop's SystemClock is time.monotonic(): read directly (not through its method)
    from meshctl.proxy import evloop

    async def main() -> None:
        clock = FastClock(evloop.current_clock())
        assert clock.mono and not clock.system
        before = evloop.current_time()
        now = clock.now()
        after = evloop.current_time()
        assert before <= now <= after
        await evloop.sleep(0.01)
        assert clock.now() - now >= 0.01

    evloop.run(main)


def test_fast_clock_asks_evloops_mock_clock():
    from meshctl.proxy import evloop

    async def main() -> None:
        clock = FastClock(evloop.current_clock())
        assert not clock.mono and not clock.system
        start = clock.now()
        await evloop.sleep(30)
        assert clock.now() == start + 30 == evloop.current_time()

    evloop.run(main, clock=evloop.MockClock(autojump_threshold=0))


async def test_send_nowait_sends_what_the_socket_takes_without_parking():
    a, b = _pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert a.send_nowait(b"abc") == 3
    assert await b.receive_some() == b"abc"
    data = os.urandom(1 << 20)
    n = a.send_nowait(data)
    assert 0 < n < len(data)  # what fits
    assert a.send_nowait(b"more") == 0  # full: nothing, no parking
    got = bytearray()
    while len(got) < n:
        got += await b.receive_some()
    assert bytes(got) == data[:n]
    b.close_now()
    with pytest.raises(trio.BrokenResourceError):
        a.send_nowait(b"to a closed peer")
    a.close_now()
    with pytest.raises(trio.ClosedResourceError):
        a.send_nowait(b"after close")
