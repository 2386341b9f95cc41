"""hop_bench.py's toy relay as runtime-neutral async code, for bench/miniloop.py's `ev*` modes.

Written once against trio's names; ``miniloop.py build`` compiles it (mypyc) twice: as
``evrelay_ev`` importing them from evloop (meshctl/proxy/evloop.py, compiled in the same group),
and as ``evrelay_trio`` importing them from trio (the block between the RUNTIME markers is
replaced). So the same compiled code runs on both runtimes.

One task per downstream connection, one upstream connection each: wait until the client's
request is readable, recv it, send it upstream, wait for the answer, recv, send it back (the
sidecar's stream parks before its read right after a send, as ``sockstream._park_next`` does).
With ``timeout`` each request runs inside ``move_on_after(15)`` (the cost of a per-request
deadline scope that never fires).
"""

from __future__ import annotations

import socket
from typing import Final

# RUNTIME-BEGIN
from evloop import CancelScope, move_on_after, notify_closing, open_nursery, wait_readable
# RUNTIME-END

BUF: Final = 65536


class Stats:
    def __init__(self, expect: int, scope: CancelScope) -> None:
        self.expect = expect
        self.scope = scope
        self.accepted = 0
        self.closed = 0
        self.requests = 0


def _nodelay(s: socket.socket) -> None:
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _recv(sock: socket.socket) -> bytes:
    while True:
        await wait_readable(sock)
        try:
            return sock.recv(BUF)
        except BlockingIOError:
            continue


async def conn(stats: Stats, down: socket.socket, app: int, timeout: bool) -> None:
    up = socket.create_connection(("127.0.0.1", app))
    _nodelay(up)
    try:
        while True:
            if timeout:
                with move_on_after(15):
                    data = await _recv(down)
                    if not data:
                        return
                    up.send(data)  # (the toy's messages are small: a loopback send takes them whole)
                    down.send(await _recv(up))
            else:
                data = await _recv(down)
                if not data:
                    return
                up.send(data)
                down.send(await _recv(up))
            stats.requests += 1
    finally:
        notify_closing(down)
        notify_closing(up)
        down.close()
        up.close()
        stats.closed += 1
        if stats.expect and stats.closed >= stats.expect:
            stats.scope.cancel()


async def serve(lsock: socket.socket, app: int, expect: int, timeout: bool, ready: str) -> Stats:
    lsock.setblocking(False)
    async with open_nursery() as nursery:
        stats = Stats(expect, nursery.cancel_scope)
        open(ready, "w").close()
        while True:
            await wait_readable(lsock)
            while True:
                try:
                    s, _ = lsock.accept()
                except BlockingIOError:
                    break
                _nodelay(s)
                stats.accepted += 1
                nursery.start_soon(conn, stats, s, app, timeout)
    return stats
