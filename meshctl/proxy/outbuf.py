"""The outgoing side of one multiplexed (HTTP/2) connection, shared by the
downstream server (h2conn.py) and the upstream client (h2pool.py).

Every stream's frames go through one buffer that a single task writes to the
socket in the order they were emitted, so a cancelled stream never leaves half
a frame behind. ``emit`` queues bytes, ``kick`` wakes the writer,
``write_loop`` is the writer (it raises when the socket breaks), and
``wait_written`` returns once everything emitted so far is on the socket or
the connection is ``dead``.

Writing from the emitting task: when the stream can send without waiting
(``try_send``: a plain socket's non-blocking ``send``) and the writer task is
not in the middle of a chunk, ``kick`` and ``wait_written`` write the buffer
themselves. A request then costs no trip through the writer task (two task
switches and a scheduler turn per write); what the kernel does not take at
once, and any error, is left to the writer task as before. Order is kept: the
direct write only happens while no chunk is in flight, and a synchronous
``send`` cannot be cancelled halfway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import trio

from .errors import send_all


class OutBuffer:
    """Mixin: the owner sets ``stream`` and ``dead`` and calls ``_init_out()``."""

    # the mixin's own state lives in its slots (a slotted owner adds only its own names)
    __slots__ = ("out", "emitted", "written", "wake", "progress", "writing", "direct")
    if TYPE_CHECKING:  # set by the owner, read here
        stream: Any  # the owner's connection (socket or TLS stream; it uses more than SendStream's methods)
        dead: bool

    def _init_out(self) -> None:
        self.out: bytearray = bytearray()
        self.emitted: int = 0  # bytes ever emitted / written: wait_written() waits for written to catch up
        self.written: int = 0
        self.wake: trio.Event = trio.Event()
        self.progress: trio.Event = trio.Event()
        self.writing: bool = False  # the writer task has a chunk in flight
        # the stream's non-blocking send (bytes taken, 0 when it cannot now), if it has one
        self.direct: Callable[[bytearray], int] | None = getattr(self.stream, "try_send", None)

    def emit(self, data: bytes) -> None:
        if data:
            self.out += data
            self.emitted += len(data)

    def kick(self) -> None:
        """Send what is buffered now (no waiting): directly, or by waking the writer task."""
        if self.out and not self._write_now():
            self.wake.set()

    def _write_now(self) -> bool:
        """Write the buffer from this task if the stream takes it without waiting
        and no chunk is in flight: True when nothing is left buffered."""
        direct = self.direct
        if direct is None or self.writing or self.dead:
            return False
        n = direct(self.out)
        if n <= 0:
            return False
        del self.out[:n]
        self.written += n
        progress, self.progress = self.progress, trio.Event()
        progress.set()
        return not self.out

    async def wait_written(self) -> None:
        target = self.emitted
        if self.written < target and self.out:
            self._write_now()
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
            self.writing = True
            try:
                await send_all(self.stream, chunk)
            finally:
                self.writing = False
                self.written += len(chunk)
                progress, self.progress = self.progress, trio.Event()
                progress.set()
