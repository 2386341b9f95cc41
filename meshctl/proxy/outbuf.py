"""The outgoing side of one multiplexed (HTTP/2) connection, shared by the
downstream server (h2conn.py) and the upstream client (h2pool.py).

Every stream's frames go through one buffer that a single task writes to the
socket in the order they were emitted, so a cancelled stream never leaves half
a frame behind. ``emit`` queues bytes, ``kick`` wakes the writer,
``write_loop`` is the writer (it raises when the socket breaks), and
``wait_written`` returns once everything emitted so far is on the socket or
the connection is ``dead``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .errors import send_all


class OutBuffer:
    """Mixin: the owner sets ``stream`` and ``dead`` and calls ``_init_out()``."""

    # the mixin's own state lives in its slots (a slotted owner adds only its own names)
    __slots__ = ("out", "emitted", "written", "wake", "progress")
    if TYPE_CHECKING:  # set by the owner, read here
        stream: Any  # the owner's connection (socket or TLS stream; it uses more than SendStream's methods)
        dead: bool

    def _init_out(self) -> None:
        self.out: bytearray = bytearray()
        self.emitted: int = 0  # bytes ever emitted / written: wait_written() waits for written to catch up
        self.written: int = 0
        self.wake: trio.Event = trio.Event()
        self.progress: trio.Event = trio.Event()

    def emit(self, data: bytes) -> None:
        if data:
            self.out += data
            self.emitted += len(data)

    def kick(self) -> None:
        """Let the writer task send what is buffered (no waiting)."""
        if self.out:
            self.wake.set()

    async def wait_written(self) -> None:
        target = self.emitted
        while self.written < target and not self.dead:
            self.wake.set()
            await self.progress.wait()

    async def write_loop(self) -> None:
        """The only task writing to the socket; raises errors.PeerGone when the
        socket is gone (the owner ends the connection)."""
        while True:
            if not self.out:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            chunk = bytes(self.out)
            self.out.clear()
            try:
                await send_all(self.stream, chunk)
            finally:
                self.written += len(chunk)
                progress, self.progress = self.progress, trio.Event()
                progress.set()
