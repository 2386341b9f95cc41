"""An HTTP/2 connection's output (outbuf.py): a kick with the writer task idle writes
inline from the calling task, the writer only sends what the socket did not take, the
bytes leave in the order emitted, and an inline write that fails ends the connection
exactly as a failed write of the writer does. Real socketpairs under
FastSocketStream; the downstream connection (h2conn._Conn) and the upstream one
(h2pool.H2Upstream)."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, ProxyConfig, RouteTable, Settings, Workload
from meshctl.protocol.events import RequestHead, Reset
from meshctl.proxy.errors import DownstreamGone
from meshctl.proxy.h2conn import _Conn, _StreamDown, _StreamReader
from meshctl.proxy.h2pool import H2Pool, H2Upstream
from meshctl.proxy.runtime import ActiveListener, ProxyRuntime
from meshctl.proxy.snapshot import Snapshot
from meshctl.proxy.stream import FastSocketStream


def _conn(sock: socket.socket) -> _Conn:
    lst = Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001, route_table="outbound")
    cfg = ProxyConfig(
        version="v1",
        workload=Workload(name="w-0", service="w"),
        listeners=(lst,),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=())),
        clusters=FrozenDict({}),
        settings=Settings(),
    )
    rt = ProxyRuntime()
    rt.snapshot = Snapshot(cfg, rt.stats)
    return _Conn(rt, ActiveListener(lst, None, rt.snapshot), FastSocketStream(sock), "10.0.0.1", None)


def _add_stream(c: _Conn, sid: int) -> None:
    c.streams[sid] = (trio.CancelScope(), _StreamReader(c, sid, False), _StreamDown(c, sid))


async def _drain(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        await trio.lowlevel.wait_readable(sock)
        got += sock.recv(1 << 20)
    return bytes(got)


async def test_a_lone_stream_writes_inline_and_the_writer_stays_parked():
    a, b = socket.socketpair()
    b.setblocking(False)
    c = _conn(a)
    async with trio.open_nursery() as n:
        n.start_soon(c.writer)
        await trio.testing.wait_all_tasks_blocked()
        assert c.wake.waiting
        _add_stream(c, 1)
        c.emit(b"frame one")
        c.emit(b"frame two")
        c.kick()
        # written before this task yields, by this task: the writer was not woken
        assert b.recv(100) == b"frame oneframe two"
        assert c.written == c.emitted == 18
        assert c.wake.waiting
        await c.flush()  # nothing left to wait for
        n.cancel_scope.cancel()
    a.close()
    b.close()


async def test_with_several_streams_the_writer_sends_their_bytes_in_one_write():
    a, b = socket.socketpair()
    b.setblocking(False)
    c = _conn(a)
    async with trio.open_nursery() as n:
        n.start_soon(c.writer)
        await trio.testing.wait_all_tasks_blocked()
        _add_stream(c, 1)
        _add_stream(c, 3)
        c.emit(b"from 1")
        c.kick()
        assert not c.wake.waiting  # woken, not written inline
        assert c.written == 0
        c.emit(b"from 3")
        c.kick()
        await c.flush()
        assert b.recv(100) == b"from 1from 3"
        n.cancel_scope.cancel()
    a.close()
    b.close()


async def test_what_the_socket_does_not_take_inline_the_writer_sends_after_it_in_order():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setblocking(False)
    c = _conn(a)
    first, second = os.urandom(1 << 20), os.urandom(100_000)
    async with trio.open_nursery() as n:
        n.start_soon(c.writer)
        await trio.testing.wait_all_tasks_blocked()
        _add_stream(c, 1)
        c.emit(first)
        c.kick()
        assert 0 < c.written < len(first)  # a part inline, the rest is the writer's
        assert not c.wake.waiting
        c.emit(second)
        c.kick()
        with trio.fail_after(10):
            got = await _drain(b, len(first) + len(second))
            await c.flush()
        assert got == first + second
        assert c.written == c.emitted
        n.cancel_scope.cancel()
    a.close()
    b.close()


@pytest.mark.parametrize("inline", [True, False])
async def test_a_failed_write_ends_the_downstream_connection_the_same_way(inline):
    """Inline or by the writer: write_failed, the connection killed, and a stream
    waiting for its bytes gets DownstreamGone (counted as DC by the stream)."""
    a, b = socket.socketpair()
    c = _conn(a)
    if not inline:
        c.nowait = None  # (a stream without send_nowait: only the writer writes)
    async with trio.open_nursery() as n:
        c.nursery = n
        n.start_soon(c.writer)
        await trio.testing.wait_all_tasks_blocked()
        b.shutdown(socket.SHUT_RD)  # the peer takes no more bytes; our reads see no EOF
        _add_stream(c, 1)
        c.emit(b"a response")
        with pytest.raises(DownstreamGone):
            await c.flush()
        assert c.write_failed and c.dead
        assert c.streams[1][0].cancel_called
    a.close()
    b.close()


async def _upstream(sock: socket.socket, nursery: trio.Nursery) -> H2Upstream:
    pool = H2Pool(nursery, SimpleNamespace())
    conn = H2Upstream(pool, FastSocketStream(sock), ("127.0.0.1", 1), SimpleNamespace(cx_active=1))
    await nursery.start(conn.run)
    return conn


def _head() -> RequestHead:
    return RequestHead("GET", "/", [], "2", scheme="http", authority="backend", path="/")


@pytest.mark.parametrize("inline", [True, False])
async def test_a_failed_write_ends_the_upstream_connection_the_same_way(inline):
    a, b = socket.socketpair()
    b.setblocking(False)
    async with trio.open_nursery() as n:
        conn = await _upstream(a, n)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.wake.waiting
        assert b.recv(1000).startswith(b"PRI * HTTP/2.0")  # the preface was written
        if not inline:
            conn.nowait = None
        b.shutdown(socket.SHUT_RD)
        st = conn.open(_head(), end_stream=True)
        conn.kick()
        with trio.fail_after(5):
            ev = await st.next()
        assert isinstance(ev, Reset)
        assert conn.dead and conn.reason.startswith("write failed: ")
    a.close()
    b.close()


async def test_a_lone_upstream_request_is_written_by_its_own_task():
    a, b = socket.socketpair()
    b.setblocking(False)
    async with trio.open_nursery() as n:
        conn = await _upstream(a, n)
        await trio.testing.wait_all_tasks_blocked()
        b.recv(1000)
        conn.open(_head(), end_stream=True)
        assert conn.written < conn.emitted  # open() queues only
        conn.kick()
        assert conn.written == conn.emitted
        assert conn.wake.waiting
        assert b.recv(1000)  # the HEADERS frame
        n.cancel_scope.cancel()
    a.close()
    b.close()


def _frames(wire: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, payload length) of each frame."""
    out = []
    i = 0
    while i < len(wire):
        n = int.from_bytes(wire[i:i + 3], "big")
        out.append((wire[i + 3], wire[i + 4], n))
        i += 9 + n
    assert i == len(wire)
    return out


HEADERS, DATA, END_STREAM, END_HEADERS = 1, 0, 1, 4


@pytest.mark.parametrize("chunks, trailers, want", [
    # END_STREAM on the last DATA frame, not on an empty DATA frame after it
    ([b"grpc-message"], [], [(DATA, END_STREAM, 12)]),
    ([b"ab", b"cde"], [], [(DATA, 0, 2), (DATA, END_STREAM, 3)]),
    # trailers end the stream: the DATA frames without END_STREAM
    ([b"ab"], [("x-t", "1")], [(DATA, 0, 2), (HEADERS, END_STREAM | END_HEADERS, None)]),
    ([], [("x-t", "1")], [(HEADERS, END_STREAM | END_HEADERS, None)]),
])
async def test_a_whole_request_body_ends_on_its_last_frame(chunks, trailers, want):
    a, b = socket.socketpair()
    b.setblocking(False)
    async with trio.open_nursery() as n:
        conn = await _upstream(a, n)
        await trio.testing.wait_all_tasks_blocked()
        b.recv(1000)
        before = conn.emitted
        st = conn.open(_head(), end_stream=False)
        conn.put_whole_body(st.sid, chunks, trailers)
        conn.kick()
        with trio.fail_after(5):
            frames = _frames(await _drain(b, conn.emitted - before))
        assert frames[0] == (HEADERS, END_HEADERS, frames[0][2])
        got = [(t, f, ln if t == DATA else None) for t, f, ln in frames[1:]]
        assert got == want
        n.cancel_scope.cancel()
    a.close()
    b.close()
