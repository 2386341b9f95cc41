"""stream.TLSSocketStream: TLS on the non-blocking socket itself (no trio.SSLStream).

Real sockets and real OpenSSL on both ends; the peer is sometimes trio's own
SSLStream (strict about close_notify) or the openssl command line tool."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import trio
import trio.testing

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.proxy.stream import FastSocketStream, TLSSocketStream, is_alive, start_tls
from meshctl.proxy.tls import CertificateHolder

SERVER = "spiffe://cluster.local/ns/default/sa/reviews"
CLIENT = "spiffe://cluster.local/ns/default/sa/productpage"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return create_root("cluster.local", _now() - timedelta(days=1))


def _holder(ca, spiffe: str) -> CertificateHolder:
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), _now())
    h = CertificateHolder()
    h.update(leaf + ca.issuer_chain_pem, key_to_pem(key), ca.root_pem)
    return h


@pytest.fixture(scope="module")
def contexts(ca):
    return _holder(ca, SERVER).server, _holder(ca, CLIENT).client


async def _tls_pair(contexts, *, every: int = 32, sndbuf: int | None = None) -> tuple[TLSSocketStream, TLSSocketStream]:
    a, b = socket.socketpair()
    if sndbuf:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    server_ctx, client_ctx = contexts
    s = start_tls(FastSocketStream(a, checkpoint_every=every), server_ctx, server_side=True)
    c = start_tls(FastSocketStream(b, checkpoint_every=every), client_ctx, server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(s.do_handshake)
        n.start_soon(c.do_handshake)
    return s, c


async def test_passes_trio_generic_stream_tests(contexts):
    # every call a checkpoint (checkpoint_every=1), then trio's own checks: EOF,
    # busy errors, close while parked, cancellation, send/receive concurrency.
    # (trio's "clogged stream" checks feed what the clogging wrote to the
    # receiver, so they cannot clog below TLS: the next test does that part.)
    async def maker():
        return await _tls_pair(contexts, every=1)

    await trio.testing.check_two_way_stream(maker, None)


async def test_a_sender_parked_on_a_full_socket_wakes_on_close_and_a_cancelled_send_breaks_the_stream(contexts):
    s, c = await _tls_pair(contexts, sndbuf=4096)
    with trio.move_on_after(0.2) as scope:
        await s.send_all(b"x" * (1 << 20))  # nobody reads: parks on want-write
    assert scope.cancelled_caught
    # half a record went out: TLS cannot go on from there
    with pytest.raises(trio.BrokenResourceError, match="cancelled"):
        await s.send_all(b"more")
    s.close_now()
    c.close_now()

    s, c = await _tls_pair(contexts, sndbuf=4096)

    async def close_soon():
        await trio.testing.wait_all_tasks_blocked()
        await s.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await s.send_all(b"x" * (1 << 20))
    c.close_now()


async def _pump(src: TLSSocketStream, dst: TLSSocketStream, data: bytes, chunk: int) -> bytes:
    got = bytearray()

    async def send():
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            await src.send_all(view[i:i + chunk])

    async def receive():
        while len(got) < len(data):
            piece = await dst.receive_some(7001)
            assert piece, "EOF before all bytes arrived"
            got.extend(piece)
            if len(got) % 5 == 0:
                await trio.sleep(0.0005)  # a slow reader: the writer parks on want-write

    async with trio.open_nursery() as n:
        n.start_soon(send)
        n.start_soon(receive)
    return bytes(got)


async def test_large_writes_to_a_slow_reader_both_ways_at_once(contexts):
    """Each side writes 3 MB (1 MB writes) into small socket buffers while the
    other reads slowly in odd-sized pieces: writers park on want-write and are
    resumed with the same bytes, readers park on want-read mid-record, and the
    two directions interleave on one SSL object."""
    s, c = await _tls_pair(contexts, sndbuf=8192)
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)
    results = {}

    async def go(name, src, dst, data):
        results[name] = await _pump(src, dst, data, 1 << 20)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(go, "up", c, s, up)
            n.start_soon(go, "down", s, c, down)
    assert hashlib.sha256(results["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(results["down"]).digest() == hashlib.sha256(down).digest()
    await s.aclose()
    await c.aclose()


async def _trio_tls_client(port: int, ctx: ssl.SSLContext) -> trio.SSLStream:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    # https_compatible=False: a TCP EOF without close_notify is an error here
    tls = trio.SSLStream(raw, ctx, server_hostname=None, https_compatible=False)
    await tls.do_handshake()
    return tls


async def _serve_once(ctx, handler, task_status=trio.TASK_STATUS_IGNORED):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    task_status.started(lsock.getsockname()[1])
    try:
        await trio.lowlevel.wait_readable(lsock)
        conn, _ = lsock.accept()
    finally:
        lsock.close()
    tls = start_tls(FastSocketStream(conn), ctx, server_side=True)
    await tls.do_handshake()
    await handler(tls)


@pytest.mark.parametrize("graceful", [True, False])
async def test_aclose_sends_close_notify_and_close_now_does_not(ca, contexts, graceful):
    server_ctx = contexts[0]
    # mesh contexts read a bare TCP EOF as EOF (OP_IGNORE_UNEXPECTED_EOF, for half-close):
    # this client is strict, to tell a close_notify from a truncation
    client_ctx = _holder(ca, CLIENT).client
    client_ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)

    async def handler(tls: TLSSocketStream):
        assert await tls.receive_some() == b"bye?"
        await tls.send_all(b"bye")
        if graceful:
            await tls.aclose()
        else:
            tls.close_now()
        assert tls.closed

    async with trio.open_nursery() as n:
        port = await n.start(_serve_once, server_ctx, handler)
        client = await _trio_tls_client(port, client_ctx)
        await client.send_all(b"bye?")
        assert await client.receive_some() == b"bye"
        if graceful:
            assert await client.receive_some() == b""  # a clean TLS EOF: close_notify arrived
        else:
            with pytest.raises(trio.BrokenResourceError):  # a truncation, as far as TLS can tell
                await client.receive_some()
        await trio.aclose_forcefully(client)


async def test_peer_close_notify_and_tcp_eof_read_as_eof(contexts):
    s, c = await _tls_pair(contexts)
    await c.aclose()
    assert await s.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await c.receive_some()
    s.close_now()
    s2, c2 = await _tls_pair(contexts)
    c2.close_now()  # no close_notify: a bare TCP EOF
    assert await s2.receive_some() == b""
    s2.close_now()


async def test_a_bare_tcp_eof_reads_as_eof_also_where_openssl_calls_it_an_error(ca, contexts):
    # A DestinationRule SIMPLE/MUTUAL upstream's context (ssl.create_default_context)
    # lacks OP_IGNORE_UNEXPECTED_EOF: there OpenSSL reports a FIN without close_notify
    # as an error (SSLEOFError). An HTTP/1.0 server that closes that way has framed its
    # answer by the close: the bytes before it arrive, then EOF, not a broken stream.
    option = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if not option:
        pytest.skip("this OpenSSL treats a bare EOF as EOF anyway")
    client_ctx = _holder(ca, CLIENT).client
    client_ctx.options &= ~option
    s, c = await _tls_pair((contexts[0], client_ctx))
    await s.send_all(b"HTTP/1.0 200 OK\r\n\r\nbody")
    s.close_now()  # no close_notify
    got = b""
    while True:
        data = await c.receive_some()
        if not data:
            break
        got += data
    assert got == b"HTTP/1.0 200 OK\r\n\r\nbody"
    c.close_now()


async def test_broken_tls_and_resets_are_broken_resource_errors(contexts):
    s, c = await _tls_pair(contexts)
    # garbage where a TLS record should be: the receiver's OpenSSL refuses it
    os.write(c.fileno(), b"\x17\x03\x03\x00\x05hello")
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some()
    s.close_now()
    c.close_now()
    s, c = await _tls_pair(contexts)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close_now()  # RST (Unix sockets have none: on those a TCP-less EOF, which is fine too)
    got = None
    try:
        got = await s.receive_some()
    except trio.BrokenResourceError:
        pass
    assert got in (None, b"")
    s.close_now()


async def test_peek_socket_sees_a_closed_peer_without_reading_tls(contexts):
    s, c = await _tls_pair(contexts)
    await c.send_all(b"ping")
    assert is_alive(s) is False  # unread application bytes: not a clean idle connection
    assert await s.receive_some() == b"ping"
    assert is_alive(s)
    with pytest.raises(BlockingIOError):  # a TCP-level peek (an SSLSocket refuses flags): nothing there
        s.socket.recv(1, socket.MSG_PEEK)
    c.close_now()
    await trio.sleep(0.01)
    assert not is_alive(s)
    s.close_now()
    assert not is_alive(s)


def _write(tmp, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_key_update_requested_by_openssl_s_client_is_answered(ca, tmp_path):
    """`openssl s_client` sends a TLS 1.3 KeyUpdate asking for ours ("K"): the
    read that meets it must let OpenSSL answer (want-write inside a receive),
    and the echo must still flow both ways afterwards."""
    server = _holder(ca, SERVER)
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), CLIENT, timedelta(hours=1), _now())
    cert = _write(tmp_path, "c.pem", leaf + ca.issuer_chain_pem)
    keyf = _write(tmp_path, "k.pem", key_to_pem(key))
    cafile = _write(tmp_path, "ca.pem", ca.root_pem)
    echoed = []

    async def handler(tls: TLSSocketStream):
        while True:
            data = await tls.receive_some()
            if not data:
                break
            echoed.append(data)
            await tls.send_all(b"echo:" + data)
        await tls.aclose()

    async with trio.open_nursery() as n:
        port = await n.start(_serve_once, server.server, handler)
        proc = await trio.lowlevel.open_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-cert", cert, "-key", keyf,
             "-CAfile", cafile, "-no_ign_eof"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = bytearray()

        async def read_until(marker: bytes):
            with trio.fail_after(10):
                while marker not in out:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, out.decode(errors="replace")
                    out.extend(chunk)

        await proc.stdin.send_all(b"one\n")
        await read_until(b"echo:one")
        await proc.stdin.send_all(b"K\n")
        await read_until(b"KEYUPDATE")
        await proc.stdin.send_all(b"two\n")
        await read_until(b"echo:two")
        await proc.stdin.aclose()
        with trio.fail_after(10):
            await proc.wait()
    assert b"".join(echoed) == b"one\ntwo\n"


async def test_send_nowait_takes_all_or_starts_a_record_that_only_send_all_of_the_same_bytes_finishes(contexts):
    """outbuf.py's inline write on a TLS connection: OpenSSL takes the bytes whole, or
    (socket full) starts a record that must be retried with the very same bytes."""
    s, c = await _tls_pair(contexts, sndbuf=4096)
    assert s.send_nowait(b"hello") == 5
    assert await c.receive_some() == b"hello"
    big = os.urandom(1 << 20)
    assert s.send_nowait(big) == -1  # nobody reads: a record started, not finished
    assert s.send_nowait(b"later") == 0  # nothing may go before it
    with pytest.raises(trio.BrokenResourceError, match="cancelled"):
        await s.send_all(b"other bytes")
    got = bytearray()

    async def receive():
        while len(got) < len(big) + 4:
            piece = await c.receive_some()
            assert piece
            got.extend(piece)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(receive)
            await s.send_all(big)  # the same object: finishes the write
            await s.send_all(b"next")
    assert bytes(got) == big + b"next"
    s.close_now()
    c.close_now()


async def test_a_record_read_in_part_is_finished_after_a_send_without_waiting_for_the_socket(contexts):
    # After a send, receive_some parks for readability first (the answer cannot be there
    # yet), unless OpenSSL holds decrypted bytes of a record read only in part: those come
    # at once, though nothing more arrives on the socket.
    s, c = await _tls_pair(contexts)
    await c.send_all(b"0123456789")  # one record
    assert await s.receive_some(4) == b"0123"  # (filled its size: the record may hold more)
    await s.send_all(b"ack")
    with trio.fail_after(5):  # (a hang guard: the peer sends nothing more)
        assert await s.receive_some(6) == b"456789"  # filled its size again, and the record is done
        await s.send_all(b"ack")
        assert await c.receive_some() == b"ack"  # (a record per read)
        assert await c.receive_some() == b"ack"
        # a read that took all of its record, then a send: the next read parks for the answer
        await c.send_all(b"next")
        assert await s.receive_some() == b"next"
        await s.send_all(b"ok")
        assert await c.receive_some() == b"ok"
        await c.send_all(b"more")
        assert await s.receive_some() == b"more"
    await s.aclose()
    await c.aclose()


async def test_the_stream_is_a_half_closeable_trio_stream_and_an_async_context_manager(contexts):
    s, c = await _tls_pair(contexts)
    assert isinstance(s, trio.abc.HalfCloseableStream) and isinstance(c, trio.abc.Stream)
    async with c as same:
        assert same is c
        await c.send_all(b"hi")
        assert await s.receive_some() == b"hi"
    assert c.closed
    assert await s.receive_some() == b""  # close_notify
    await s.aclose()
