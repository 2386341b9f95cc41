"""The outgoing side of one multiplexed (HTTP/2) connection, shared by the
downstream server (h2conn.py) and the upstream client (h2pool.py).

Every stream's frames go through one buffer that a single task writes to the
socket in the order they were emitted, so a cancelled stream never leaves half
a frame behind. ``emit`` queues bytes, ``kick`` sends them on (below),
``write_loop`` is the writer (it raises when the socket breaks), and
``wait_written`` returns once everything emitted so far is on the socket or
the connection is ``dead``.

``kick`` writes from the calling task when the writer is idle (parked, nothing
of its own unwritten) and the connection has one stream at most (``solo``):
the stream's ``send_nowait`` (sockstream.py, stream.py) sends what the socket
takes now, without parking, and only the rest (a partial write, EAGAIN, a TLS
record OpenSSL must finish: ``head``) is left to the writer, so the order stays
the codec's. A lone request or response then costs no writer wake-up (a trio
park and reschedule, ~16 interpreted calls in trio). With more streams the
writer is woken as before: it runs after the other streams of the scheduler
pass have emitted and sends everything in one write (inline writes from each
stream measured more send() calls per request, and more reads on the peer).
A failed inline write ends the connection as a failed write of the writer
does (the owner's ``write_error``).

Tasks park here and in the two connection modules on ``Wakeup`` slots (one
task parked at most, rescheduled directly), not on ``trio.Event``: an event
is two interpreted attrs objects (the event and its parking lot, with an
OrderedDict) made per wait, and its ``set`` walks the lot; callgrind counted
that as a good part of a gRPC call's cost. The tasks waiting in
``wait_written`` (several streams at once) are a plain list.

Compiled with mypyc (setup.py) with the two modules that use it.
"""

from __future__ import annotations

from typing import Any

import meshctl.proxy.aio as aio
from .errors import STREAM_ERRORS, PeerGone, send_all


class Wakeup:
    """A slot for one parked task: ``wait`` parks the caller (a trio checkpoint: it
    can be cancelled), ``set`` reschedules it if one is parked (True) and is a no-op
    otherwise. Unlike an event nothing is remembered: a ``set`` before the ``wait``
    is lost, so the owner checks its condition before it waits, in the same step."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: aio.Task | None = None

    @property
    def waiting(self) -> bool:
        return self.task is not None

    async def wait(self) -> None:
        self.task = aio.current_task()
        await aio.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> aio.Abort:
        self.task = None
        return aio.Abort.SUCCEEDED

    def set(self) -> bool:
        t = self.task
        if t is None:
            return False
        self.task = None
        aio.reschedule(t)
        return True


class _WrittenWait:
    """One task in ``wait_written``: removed from the connection's list when cancelled."""

    __slots__ = ("waiters", "task")

    def __init__(self, waiters: list[aio.Task], task: aio.Task) -> None:
        self.waiters = waiters
        self.task = task

    def abort(self, _: Any) -> aio.Abort:
        try:
            self.waiters.remove(self.task)
        except ValueError:
            pass
        return aio.Abort.SUCCEEDED


class OutBuffer:
    """Base of a connection: the owner calls ``_init_out(stream)`` from its ``__init__``."""

    # (a slotted owner adds only its own names)
    __slots__ = ("stream", "dead", "out", "emitted", "written", "wake", "progress", "nowait", "head")

    def _init_out(self, stream: Any) -> None:
        # the owner's connection (socket or TLS stream; it uses more than SendStream's methods)
        self.stream: Any = stream
        self.dead: bool = False  # the connection is over (set by the owner)
        self.out: bytearray = bytearray()
        self.emitted: int = 0  # bytes ever emitted / written: wait_written() waits for written to catch up
        self.written: int = 0
        self.wake: Wakeup = Wakeup()  # the writer waits for bytes
        self.progress: list[aio.Task] = []  # tasks waiting for a write to end
        # the stream's send_nowait (sockstream.py, stream.py), None for streams without one (tests'
        # memory streams): the writer then writes everything
        self.nowait: Any = getattr(stream, "send_nowait", None)
        # a chunk whose TLS write was started inline and must be finished as is, before ``out``
        self.head: bytes = b""

    def emit(self, data: bytes) -> None:
        if data:
            self.out += data
            self.emitted += len(data)

    def kick(self) -> None:
        """Send what is buffered without waiting: from the calling task, when the writer is
        idle (parked, nothing of its own unwritten), else by waking the writer."""
        if self.out:
            wake = self.wake
            if wake.task is not None and not self.dead and self.nowait is not None and self.solo():
                self._write_now()
            else:
                wake.set()

    def solo(self) -> bool:
        """(owner) Whether one stream at most may emit in this pass."""
        return True

    def write_error(self, exc: PeerGone) -> None:
        """(owner) A write failed: the connection is over."""
        raise NotImplementedError

    def _write_now(self) -> None:
        """The writer is parked with nothing unwritten of its own: write the buffer from this
        task, as far as the socket takes it now, and wake the writer only for the rest. The
        bytes leave in the order emitted; a failure ends the connection as the writer's does."""
        out = self.out
        chunk = bytes(out)
        try:
            n: int = self.nowait(chunk)
        except STREAM_ERRORS as exc:
            out.clear()
            self.written += len(chunk)
            self._progress()
            self.write_error(PeerGone(str(exc) or type(exc).__name__))
            return
        if n == len(chunk):
            out.clear()
            self.written += n
            if self.progress:
                self._progress()
            return
        if n < 0:  # a TLS record started: the writer finishes this very chunk first
            out.clear()
            self.head = chunk
        elif n:
            del out[:n]
            self.written += n
            self._progress()
        self.wake.set()

    def _progress(self) -> None:
        """Wake the tasks waiting in ``wait_written`` (a write ended, or the connection did)."""
        p = self.progress
        if p:
            self.progress = []
            for t in p:
                aio.reschedule(t)

    async def wait_written(self) -> None:
        target = self.emitted
        while self.written < target and not self.dead:
            self.kick()
            if self.written >= target or self.dead:  # written inline (or the write failed)
                return
            task = aio.current_task()
            p = self.progress
            p.append(task)
            await aio.wait_task_rescheduled(_WrittenWait(p, task).abort)

    async def write_loop(self) -> None:
        """The only task writing to the socket; raises errors.PeerGone when the
        socket is gone (the owner ends the connection)."""
        while True:
            chunk = self.head
            if chunk:
                self.head = b""
            elif self.out:
                chunk = bytes(self.out)
                self.out.clear()
            else:
                await self.wake.wait()
                continue
            try:
                await send_all(self.stream, chunk)
            finally:
                self.written += len(chunk)
                self._progress()
