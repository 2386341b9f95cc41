"""The outgoing side of one multiplexed (HTTP/2) connection, shared by the
downstream server (h2conn.py) and the upstream client (h2pool.py).

Every stream's frames go through one buffer that a single task writes to the
socket in the order they were emitted, so a cancelled stream never leaves half
a frame behind. ``emit`` queues bytes, ``kick`` wakes the writer,
``write_loop`` is the writer (it raises when the socket breaks), and
``wait_written`` returns once everything emitted so far is on the socket or
the connection is ``dead``. The two events (``wake``: the writer waits for
bytes; ``progress``: a task waits for a write) exist only while someone waits
on them: most writes have no one waiting, and an event made and set per write
was a good part of a gRPC call's cost.

Compiled with mypyc (setup.py) with the two modules that subclass it.
"""

from __future__ import annotations

from typing import Any

import trio

from .errors import send_all


class OutBuffer:
    """Base of a connection: the owner calls ``_init_out(stream)`` from its ``__init__``."""

    # (a slotted owner adds only its own names)
    __slots__ = ("stream", "dead", "out", "emitted", "written", "wake", "progress")

    def _init_out(self, stream: Any) -> None:
        # the owner's connection (socket or TLS stream; it uses more than SendStream's methods)
        self.stream: Any = stream
        self.dead: bool = False  # the connection is over (set by the owner)
        self.out: bytearray = bytearray()
        self.emitted: int = 0  # bytes ever emitted / written: wait_written() waits for written to catch up
        self.written: int = 0
        self.wake: trio.Event | None = None  # the writer waits for bytes (None: it does not)
        self.progress: trio.Event | None = None  # tasks wait for a write to end (None: none do)

    def emit(self, data: bytes) -> None:
        if data:
            self.out += data
            self.emitted += len(data)

    def kick(self) -> None:
        """Let the writer task send what is buffered (no waiting)."""
        if self.out:
            w = self.wake
            if w is not None:
                self.wake = None
                w.set()

    def _progress(self) -> None:
        """Wake the tasks waiting in ``wait_written`` (a write ended, or the connection did)."""
        p = self.progress
        if p is not None:
            self.progress = None
            p.set()

    async def wait_written(self) -> None:
        target = self.emitted
        while self.written < target and not self.dead:
            self.kick()
            p = self.progress
            if p is None:
                p = self.progress = trio.Event()
            await p.wait()

    async def write_loop(self) -> None:
        """The only task writing to the socket; raises errors.PeerGone when the
        socket is gone (the owner ends the connection)."""
        while True:
            if not self.out:
                w = self.wake = trio.Event()
                await w.wait()
                continue
            chunk = bytes(self.out)
            self.out.clear()
            try:
                await send_all(self.stream, chunk)
            finally:
                self.written += len(chunk)
                self._progress()
