"""evloop: a small structured-concurrency runtime on one ``select.epoll``, with trio's API.

The data plane's own runtime (issue 12): the names and semantics of the part of trio that
``meshctl/proxy/aio.py`` routes the sidecar through, on a loop whose park/wake costs what
bench/miniloop.py's prototype does (~14K instructions a relayed request against trio's ~125K).
A sidecar runs on it by default (proxy/main.py); it imports no trio (its stream classes are
proxy/streamtypes.py's).

What it is:
* Tasks are plain coroutines, resumed with ``coro.send``/``coro.throw``. A task parks by
  yielding the ``_PARK`` object after recording what it waits on (``Task._parked``: an object
  whose ``_abort`` the loop calls if a cancellation reaches the task; ``wait_task_rescheduled``
  wraps a trio-style abort function in one). ``_CHECKPOINT`` is a yield that stays runnable.
* I/O: each fd is registered once (level-triggered) and its registration kept across waits; an
  event that finds nobody waiting in a direction takes that direction out of the registration
  then (one ``epoll_ctl``, lazily), HUP/ERR with nobody waiting unregisters the fd. A task that
  waits on the same fd and direction again and again (the relay's steady state) costs no
  ``epoll_ctl`` at all.
* Timers: one heap of ``(when, seq, _Timer)`` with lazy deletion (a dead timer stays in the heap
  until it surfaces or the dead outnumber the live, then the heap is rebuilt). A cancel scope
  with a finite deadline owns one timer while it is open; the clock is read only when a timer
  is pending or a scope with a deadline is entered.
* Cancellation: a scope's parent is the scope that was innermost where it was entered (a task's
  outermost scope hangs under its nursery's scope). A task is cancelled when a scope on that
  chain is cancelled with no shield between; the loop counts the open cancelled scopes and
  walks the chain only when that count is not zero. ``cancel()`` walks the tasks under the
  scope's task (through their open nurseries) and aborts those parked under it.

Differences from trio (deliberate, see tests/unit/test_evloop.py for what is checked against trio):
no contextvars context per task, no KeyboardInterrupt handling (SIGINT's default handler runs),
no instruments, no guest mode, no ``Task.child_nurseries``/``parent_nursery``, no misnesting
diagnostics beyond a RuntimeError, the run batch is not shuffled, and a raw int fd that is
closed and reused without ``notify_closing`` is not noticed (a socket object is: its registration
is tied to the object through a weak reference). ``wait_readable``/``wait_writable`` are plain
functions returning the awaitable park (``await wait_readable(s)`` as in trio; the task is recorded
as the fd's waiter at the call). A scope entered with a deadline already passed is cancelled at the
loop's next pass (before the task runs again), not in ``__enter__`` (``cancel_called`` reads the
clock, as trio's does, so nothing observable differs). When a sleep's deadline and a cancellation
come in the same pass, the sleep may complete (trio's sleep is a cancel scope, so there the
cancellation wins); either order is one trio could give had the cancel come a moment later.
"""

from __future__ import annotations

import enum
import errno
import heapq
import math
import select
import signal
import socket
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Final, Generator, Protocol, cast

if TYPE_CHECKING:
    import outcome

from .streamtypes import BrokenResourceError, BusyResourceError, ClosedResourceError, TooSlowError, WouldBlock

__all__ = [
    "Abort", "Cancelled", "CancelScope", "Event", "Lock", "MockClock", "Nursery", "SystemClock",
    "TASK_STATUS_IGNORED", "Task", "TaskStatus", "aclose_forcefully", "checkpoint", "current_clock",
    "current_task", "current_time", "fail_after", "fail_at", "getaddrinfo", "move_on_after", "move_on_at",
    "notify_closing", "open_nursery", "open_signal_receiver", "reschedule", "reschedule_value", "run", "run_sync_in_thread",
    "sleep", "sleep_forever", "sleep_until", "wait_readable", "wait_task_rescheduled", "wait_writable",
    "BrokenResourceError", "BusyResourceError", "ClosedResourceError", "TooSlowError", "WouldBlock",
]

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
EPOLLERR_HUP: Final = select.EPOLLERR | select.EPOLLHUP
INF: Final = math.inf
_monotonic: Final = time.monotonic  # (Final: compiled, a direct reference, not a lookup in the time module per read)
_NONSTRICT_NOTE: Final = "evloop: a nursery in loose mode wrapped one exception in a group"


class Cancelled(BaseException):
    """Raised at a park or checkpoint inside a cancelled scope; caught by the scope that was cancelled."""

    def __str__(self) -> str:
        return "Cancelled"


class Abort(enum.Enum):
    SUCCEEDED = 1
    FAILED = 2


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


# ------------------------------------------------------------------ clocks


class SystemClock:
    def current_time(self) -> float:
        return time.monotonic()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.monotonic()


class MockClock:
    """trio.testing.MockClock's fake time (rate 0): it moves only by ``jump`` or, with
    ``autojump_threshold`` set, when every task has been parked that long (real seconds) and a
    timer is pending: then it jumps to the first timer."""

    def __init__(self, autojump_threshold: float = INF) -> None:
        self._t = 0.0
        self.autojump_threshold = autojump_threshold

    def current_time(self) -> float:
        return self._t

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return INF if deadline > self._t else 0.0

    def jump(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time can't go backwards")
        self._t += seconds


# ------------------------------------------------------------------ traps


class _Park:
    """What a task yields to the loop: ``_PARK`` (wait until rescheduled) or ``_CHECKPOINT``."""

    def __await__(self) -> Generator[_Park, object, object]:
        return (yield self)


_PARK: Final = _Park()
_CHECKPOINT: Final = _Park()


class _Waiter:
    """What a parked task waits on: the loop calls ``_abort`` when a cancellation reaches it;
    True means the wait was undone and the task is to be resumed with Cancelled."""

    def _abort(self, task: Task) -> bool:
        return True


_NO_WAIT: Final = _Waiter()  # a park that a cancellation simply ends (sleep_forever, checkpoint's cancel)


def _raise_cancel() -> None:
    raise Cancelled()


class _UserWait(_Waiter):
    def __init__(self, abort_fn: Callable[[Callable[[], None]], Abort]) -> None:
        self.abort_fn = abort_fn

    def _abort(self, task: Task) -> bool:
        r = self.abort_fn(_raise_cancel)
        if r is Abort.SUCCEEDED:
            return True
        if r is Abort.FAILED:
            return False
        raise RuntimeError(f"abort function must return Abort.SUCCEEDED or Abort.FAILED, not {r!r}")


class _FailWait(_Waiter):
    """A park that a cancellation does not end (a nursery waiting for its children, a thread)."""

    def _abort(self, task: Task) -> bool:
        return False


_FAIL_WAIT: Final = _FailWait()


# ------------------------------------------------------------------ tasks


class Task:
    def __init__(self, coro: Coroutine[Any, Any, Any], name: str, scope: CancelScope | None,
                 nursery: Nursery | None) -> None:
        self.coro = coro
        self._send: Callable[[object], object] = coro.send  # (bound once: no method lookup per step)
        self.name = name
        self._val: object = None
        self._exc: BaseException | None = None
        self._scope = scope  # the innermost cancel scope this task is in
        self._parked: _Waiter | None = None
        self._nursery = nursery
        self._nurseries: list[Nursery] = []

    def __repr__(self) -> str:
        return f"<evloop.Task {self.name!r}>"

    def _cancelled(self) -> bool:
        s = self._scope
        while s is not None:
            if s._cancel_called:
                return True
            if s._shield:
                return False
            s = s._parent
        return False


class _Timer:
    def __init__(self, when: float, scope: CancelScope | None, task: Task | None, fifo: _Fifo | None = None) -> None:
        self.when = when
        self.scope = scope
        self.task = task
        self.fifo = fifo
        self.alive = True


class _Fifo:
    """The open scopes of ``move_on_after(rel)`` (one FIFO per ``rel``): their deadlines come in
    order (the clock never goes back), so the heap holds one timer per FIFO, at its head's deadline,
    instead of one per scope. A scope leaves its FIFO by setting ``_fifo`` to None (exit, cancel,
    a new deadline); dead heads are dropped when a scope exits and when the timer fires."""

    def __init__(self, rel: float) -> None:
        self.rel = rel
        self.q: deque[CancelScope] = deque()
        self.armed = False


class _SleepWait(_Waiter):
    def __init__(self, timer: _Timer) -> None:
        self.timer = timer

    def _abort(self, task: Task) -> bool:
        r = _G.runner
        if r is not None:
            r._kill_timer(self.timer)
        return True


class _FdState(_Waiter):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mask = -1  # what epoll has registered for the fd; -1: not registered
        self.reader: Task | None = None
        self.writer: Task | None = None
        self.ref: weakref.ref[Any] | None = None

    def _abort(self, task: Task) -> bool:
        if self.reader is task:
            self.reader = None
        if self.writer is task:
            self.writer = None
        return True


class _Globals:
    def __init__(self) -> None:
        self.runner: Runner | None = None


_G: Final = _Globals()


def _runner() -> Runner:
    r = _G.runner
    if r is None:
        raise RuntimeError("must be called from async context (inside evloop.run)")
    return r


class _ThreadJob(_FailWait):
    def __init__(self, runner: Runner, task: Task, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.runner = runner
        self.task = task
        self.fn = fn
        self.args = args
        self.value: object = None
        self.error: BaseException | None = None

    def work(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:
            self.error = e
        r = self.runner
        r._from_threads.append(self)
        r._poke()


class Runner:
    def __init__(self, clock: SystemClock | MockClock) -> None:
        self.clock = clock
        self._mock: MockClock | None = clock if isinstance(clock, MockClock) else None
        self.ep = select.epoll()
        self.runq: list[Task] = []
        self.current: Task | None = None
        self.fds: list[_FdState | None] = []  # by fd number (an index, not a hash lookup, per wait)
        self.timers: list[tuple[float, int, _Timer]] = []
        self.fifos: dict[float, _Fifo] = {}
        self._last_fifo = _Fifo(-1.0)  # (the duration used last: most scopes of a proxy have one or two)
        self.live_timers = 0
        self.seq = 0
        self.ncancel = 0  # open scopes whose cancel() has been called
        self.main: Task | None = None
        self.passes = 0  # loop passes (epoll_waits) and the I/O events they found, for benches and tests
        self.events = 0
        self.done = False
        self.result: object = None
        self.error: BaseException | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self.ep.register(self._wake_fd, EPOLLIN)
        self._from_threads: deque[_ThreadJob] = deque()
        self._signals: deque[int] = deque()
        self._receivers: list[_SignalReceiver] = []

    # ---------------------------------------------------------- time

    def now(self) -> float:
        m = self._mock
        if m is None:
            return _monotonic()
        return m._t

    def _add_timer(self, when: float, scope: CancelScope | None, task: Task | None,
                   fifo: _Fifo | None = None) -> _Timer:
        t = _Timer(when, scope, task, fifo)
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, t))
        self.live_timers += 1
        return t

    def _fifo_add(self, scope: CancelScope, rel: float) -> None:
        f = self._last_fifo
        if f.rel != rel:
            got = self.fifos.get(rel)
            if got is None:
                got = _Fifo(rel)
                self.fifos[rel] = got
            f = got
            self._last_fifo = f
        f.q.append(scope)
        scope._fifo = f
        if not f.armed:
            f.armed = True
            self._add_timer(scope._deadline, None, None, f)

    def _fifo_fire(self, f: _Fifo) -> None:
        f.armed = False
        q = f.q
        now = self.now()
        while q:
            s = q[0]
            if s._fifo is not f:
                q.popleft()
            elif s._deadline <= now:
                q.popleft()
                s._fifo = None
                s.cancel()
            else:
                f.armed = True
                self._add_timer(s._deadline, None, None, f)
                return
        if len(self.fifos) > 64 and f is not self._last_fifo:  # (many distinct durations: drop the empty ones)
            del self.fifos[f.rel]

    def _kill_timer(self, t: _Timer) -> None:
        if t.alive:
            t.alive = False
            self.live_timers -= 1
            heap = self.timers
            dead = len(heap) - self.live_timers
            if dead > 64 and dead > self.live_timers:
                self.timers = [e for e in heap if e[2].alive]
                heapq.heapify(self.timers)

    def _run_timers(self, now: float) -> None:
        heap = self.timers
        while heap and heap[0][0] <= now:
            t = heapq.heappop(heap)[2]
            if not t.alive:
                continue
            t.alive = False
            self.live_timers -= 1
            task = t.task
            if task is not None:
                if task._parked is not None:
                    task._parked = None
                    self.runq.append(task)
            else:
                f = t.fifo
                if f is not None:
                    self._fifo_fire(f)
                else:
                    s = t.scope
                    if s is not None:
                        s._timer = None
                        s.cancel()
            heap = self.timers  # (a cancel may have rebuilt it)

    def _next_timer(self) -> float:
        heap = self.timers
        while heap:
            e = heap[0]
            if e[2].alive:
                return e[0]
            heapq.heappop(heap)
        return INF

    # ---------------------------------------------------------- scheduling

    def reschedule(self, task: Task, value: object = None, exc: BaseException | None = None) -> None:
        if task._parked is None:
            raise RuntimeError(f"{task!r} is not parked: it cannot be rescheduled")
        task._parked = None
        task._val = value
        task._exc = exc
        self.runq.append(task)

    def _try_abort(self, task: Task) -> None:
        w = task._parked
        if w is not None and task._cancelled():
            if w._abort(task) and task._parked is w:
                task._parked = None
                task._val = None
                task._exc = Cancelled()
                self.runq.append(task)

    def _deliver(self, scope: CancelScope) -> None:
        """After ``scope`` was cancelled (or unshielded): abort the parked tasks it reaches."""
        owner = scope._task
        if owner is None:
            return
        stack = [owner]
        while stack:
            t = stack.pop()
            if t._parked is not None:
                self._try_abort(t)
            for n in t._nurseries:
                stack.extend(n._children)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, nursery: Nursery | None) -> Task:
        scope = nursery._scope if nursery is not None else None
        t = Task(coro, name, scope, nursery)
        if nursery is not None:
            nursery._children.add(t)
        self.runq.append(t)
        return t

    def _step(self, task: Task) -> None:
        self.current = task
        exc = task._exc
        try:
            if exc is None:
                v = task._val
                task._val = None
                trap = task._send(v)
            else:
                task._exc = None
                trap = task.coro.throw(exc)
        except StopIteration as e:
            self.current = None
            self._finished(task, e.value, None)
            return
        except BaseException as e:
            self.current = None
            self._finished(task, None, e)
            return
        self.current = None
        if trap is _PARK:
            if self.ncancel and task._cancelled():
                self._try_abort(task)
        elif trap is _CHECKPOINT:
            self.runq.append(task)
        else:
            task._exc = TypeError(f"evloop: a task yielded {trap!r} (an awaitable of another event loop?)")
            self.runq.append(task)

    def _finished(self, task: Task, value: object, exc: BaseException | None) -> None:
        if task is self.main:
            self.done = True
            self.result = value
            self.error = exc
            return
        n = task._nursery
        if n is not None:
            n._child_finished(task, exc)

    # ---------------------------------------------------------- I/O

    def _slot(self, fd: int) -> _FdState | None:
        fds = self.fds
        if fd < len(fds):
            return fds[fd]
        if fd < 0:
            raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
        fds.extend([None] * (fd + 1 - len(fds)))
        return None

    def _fd_state(self, obj: int | _HasFileno) -> _FdState:
        if isinstance(obj, int):
            fd = obj
            st = self._slot(fd)
            if st is None:
                st = _FdState(fd)
                self.fds[fd] = st
            return st
        fd = obj.fileno()
        st = self._slot(fd)
        if st is None:
            st = _FdState(fd)
            st.ref = weakref.ref(obj)
            self.fds[fd] = st
            return st
        ref = st.ref
        if ref is None or ref() is not obj:
            # another object on this fd number: the old registration (if the kernel kept any) is stale
            if st.reader is not None or st.writer is not None:
                raise BusyResourceError("another task is already waiting on this fd (through another object)")
            st.ref = weakref.ref(obj)
            if st.mask >= 0:
                st.mask = 0
                self._ctl(st)
        return st

    def _ctl(self, st: _FdState) -> None:
        mask = (EPOLLIN if st.reader is not None else 0) | (EPOLLOUT if st.writer is not None else 0)
        if st.mask < 0:
            try:
                self.ep.register(st.fd, mask)
            except FileExistsError:
                self.ep.modify(st.fd, mask)
        else:
            try:
                self.ep.modify(st.fd, mask)
            except FileNotFoundError:
                self.ep.register(st.fd, mask)
        st.mask = mask

    def wait_io(self, obj: int | _HasFileno, read: bool) -> None:
        """Record the current task as the fd's reader or writer; the caller then parks."""
        task = self.current
        assert task is not None
        st = self._fd_state(obj)
        if read:
            if st.reader is not None:
                raise BusyResourceError("another task is already waiting to read from this fd")
            st.reader = task
            if st.mask < 0 or not st.mask & EPOLLIN:
                try:
                    self._ctl(st)
                except BaseException:
                    st.reader = None
                    raise
        else:
            if st.writer is not None:
                raise BusyResourceError("another task is already waiting to write to this fd")
            st.writer = task
            if st.mask < 0 or not st.mask & EPOLLOUT:
                try:
                    self._ctl(st)
                except BaseException:
                    st.writer = None
                    raise
        task._parked = st

    def notify_closing(self, obj: int | _HasFileno) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        st = self._slot(fd)
        if st is None:
            return
        self.fds[fd] = None
        for t in (st.reader, st.writer):
            if t is not None and t._parked is st:
                self.reschedule(t, None, ClosedResourceError("another task closed this fd"))
        st.reader = st.writer = None
        if st.mask >= 0:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def _io_events(self, events: list[tuple[int, int]]) -> None:
        fds = self.fds
        runq = self.runq
        for fd, ev in events:
            st = fds[fd] if fd < len(fds) else None
            if st is None:
                if fd == self._wake_fd:
                    self._woken()
                else:  # a registration left behind (closed without notify_closing, then reused?)
                    try:
                        self.ep.unregister(fd)
                    except OSError:
                        pass
                continue
            idle = 0
            if ev & (EPOLLIN | EPOLLERR_HUP):
                t = st.reader
                if t is not None:
                    st.reader = None
                    if t._parked is st:
                        t._parked = None
                        runq.append(t)
                elif st.mask & EPOLLIN:
                    idle = 1
            if ev & (EPOLLOUT | EPOLLERR_HUP):
                t = st.writer
                if t is not None:
                    st.writer = None
                    if t._parked is st:
                        t._parked = None
                        runq.append(t)
                elif st.mask & EPOLLOUT:
                    idle = 1
            if idle:
                # nobody waits in a direction epoll reported: take it out (lazily, so a task that
                # waits in the same direction again and again costs no epoll_ctl)
                if ev & EPOLLERR_HUP and st.reader is None and st.writer is None:
                    try:
                        self.ep.unregister(fd)
                    except OSError:
                        pass
                    st.mask = -1
                else:
                    self._ctl(st)

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _woken(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        q = self._from_threads
        while q:
            job = q.popleft()
            t = job.task
            if job.error is not None:
                self.reschedule(t, None, job.error)
            else:
                self.reschedule(t, job.value, None)
        sq = self._signals
        while sq:
            sig = sq.popleft()
            for rcv in self._receivers:
                if sig in rcv._sigs:
                    rcv._deliver(sig)

    # ---------------------------------------------------------- the loop

    def run_main(self, coro: Coroutine[Any, Any, Any]) -> object:
        self.main = self.spawn(coro, "<main>", None)
        ep = self.ep
        mock = self._mock
        while not self.done:
            jump = INF  # with an autojumping mock clock: where time goes if this pass finds nothing to do
            if self.runq:
                timeout = 0.0
            else:
                when = self._next_timer() if self.timers else INF
                if when == INF:
                    timeout = -1.0
                elif mock is None:
                    timeout = when - _monotonic()
                    if timeout < 0:
                        timeout = 0.0
                elif when <= mock._t:
                    timeout = 0.0
                else:
                    timeout = mock.autojump_threshold
                    if timeout == INF:
                        timeout = -1.0
                    else:
                        jump = when
            events = ep.poll(timeout, 256)
            self.passes += 1
            if events:
                self.events += len(events)
                self._io_events(events)
            elif jump != INF and mock is not None and not self.runq:
                mock._t = jump
            # (events before a timeout computed from the clock: no deadline can have passed, and
            # the clock need not be read again)
            if self.timers and (timeout <= 0 or not events or mock is not None):
                self._run_timers(self.now())
            batch = self.runq
            if batch:
                self.runq = []
                for task in batch:
                    self._step(task)
        if self.error is not None:
            raise self.error
        return self.result

    def close(self) -> None:
        self.ep.close()
        self._wake_r.close()
        self._wake_w.close()


def run(async_fn: Callable[..., Coroutine[Any, Any, Any]], *args: object,
        clock: SystemClock | MockClock | None = None) -> Any:
    """Run ``async_fn(*args)`` as the main task until it returns; its value or its exception."""
    if _G.runner is not None:
        raise RuntimeError("Attempted to call run() from inside a run()")
    r = Runner(clock if clock is not None else SystemClock())
    _G.runner = r
    try:
        return r.run_main(_coro(async_fn(*args), async_fn))
    finally:
        _G.runner = None
        r.close()


# ------------------------------------------------------------------ tasks, time, checkpoints


def current_task() -> Task:
    t = _runner().current
    if t is None:
        raise RuntimeError("no current task")
    return t


def current_time() -> float:
    return _runner().now()


def current_clock() -> SystemClock | MockClock:
    return _runner().clock


async def checkpoint() -> None:
    """A schedule point and a cancel point (trio.lowlevel.checkpoint)."""
    await _CHECKPOINT
    r = _runner()
    if r.ncancel:
        t = r.current
        if t is not None and t._cancelled():
            raise Cancelled()


async def checkpoint_if_cancelled() -> None:
    r = _runner()
    if r.ncancel:
        t = r.current
        if t is not None and t._cancelled():
            await _CHECKPOINT
            raise Cancelled()


async def cancel_shielded_checkpoint() -> None:
    await _CHECKPOINT


async def wait_task_rescheduled(abort_fn: Callable[[Callable[[], None]], Abort]) -> Any:
    r = _runner()
    t = r.current
    assert t is not None
    t._parked = _UserWait(abort_fn)
    return await _PARK


def reschedule(task: Task, next_send: outcome.Outcome[Any] | None = None) -> None:
    """trio's ``reschedule``: resume ``task`` with ``next_send``, an ``outcome.Value`` or
    ``outcome.Error``, or None. outcome (and attrs, which it needs) is imported only when one
    is passed: the sidecar itself passes None or calls ``reschedule_value``."""
    r = _runner()
    if next_send is None:
        r.reschedule(task, None, None)
        return
    import outcome

    if isinstance(next_send, outcome.Error):
        r.reschedule(task, None, next_send.error)
    else:
        assert isinstance(next_send, outcome.Value)
        r.reschedule(task, next_send.value, None)


def reschedule_value(task: Task, value: object = None) -> None:
    """``reschedule(task, outcome.Value(value))`` without making the Value (an attrs
    class: its ``__init__`` is interpreted, ~4,000 instructions with the isinstance
    checks, once per HTTP/2 stream that an idle stream task takes over)."""
    _runner().reschedule(task, value, None)


async def sleep_forever() -> None:
    r = _runner()
    t = r.current
    assert t is not None
    t._parked = _NO_WAIT
    await _PARK


async def sleep_until(deadline: float) -> None:
    r = _runner()
    if deadline <= r.now():
        await checkpoint()
        return
    t = r.current
    assert t is not None
    t._parked = _SleepWait(r._add_timer(deadline, None, t))
    await _PARK


async def sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    if seconds == 0:
        await checkpoint()
        return
    await sleep_until(_runner().now() + seconds)


# ------------------------------------------------------------------ I/O


# wait_readable/wait_writable are awaited as trio's are (``await wait_readable(sock)``) but are
# plain functions returning the park: the task is recorded as the fd's waiter when called, and one
# coroutine object per wait is saved (the hot path). Called and not awaited, they would leave the
# task recorded: always await them at once.


def wait_readable(sock: int | _HasFileno) -> _Park:
    r = _G.runner
    if r is None:
        raise RuntimeError("must be called from async context (inside evloop.run)")
    r.wait_io(sock, True)
    return _PARK


def wait_writable(sock: int | _HasFileno) -> _Park:
    r = _G.runner
    if r is None:
        raise RuntimeError("must be called from async context (inside evloop.run)")
    r.wait_io(sock, False)
    return _PARK


def notify_closing(sock: int | _HasFileno) -> None:
    _runner().notify_closing(sock)


# ------------------------------------------------------------------ cancel scopes


class CancelScope:
    def __init__(self, deadline: float = INF, shield: bool = False) -> None:
        self._deadline = deadline
        self._shield = shield
        self._cancel_called = False
        self.cancelled_caught = False
        self._parent: CancelScope | None = None
        self._task: Task | None = None
        self._active = False
        self._entered = False
        self._timer: _Timer | None = None
        self._rel = -1.0  # move_on_after's duration: the deadline goes into the FIFO of its duration
        self._fifo: _Fifo | None = None

    def __enter__(self) -> CancelScope:
        r = _runner()
        task = r.current
        assert task is not None
        if self._entered:
            raise RuntimeError("Each CancelScope may only be used for a single 'with' block")
        self._entered = True
        self._task = task
        self._parent = task._scope
        task._scope = self
        self._active = True
        # (no clock read: a deadline already passed fires on the loop's next pass, before the task
        # can run again; cancel_called reads the clock itself, as trio's does)
        if self._deadline != INF and not self._cancel_called:
            if self._rel >= 0:
                r._fifo_add(self, self._rel)
            else:
                self._timer = r._add_timer(self._deadline, self, None)
        if self._cancel_called:
            r.ncancel += 1
        return self

    def _close(self, exc: BaseException | None) -> BaseException | None:
        r = _runner()
        task = self._task
        if not self._active or task is None:
            return RuntimeError(f"Cancel scope stack corrupted: attempted to exit {self!r} which had already been exited")
        if task._scope is not self:
            err = RuntimeError(f"Cancel scope stack corrupted: attempted to exit {self!r} that is not the innermost")
            err.__context__ = exc
            exc = err
        task._scope = self._parent
        # trio: caught by a scope that is cancelled while its parent's cancellation (if any) is not
        # visible to it (effectively cancelled and not the parent's = cancelled itself)
        if exc is not None and self._cancel_called and not self._parent_cancelled_visible():
            if isinstance(exc, Cancelled):
                self.cancelled_caught = True
                exc = None
            elif isinstance(exc, BaseExceptionGroup):
                matched, rest = exc.split(Cancelled)
                if matched is not None:
                    self.cancelled_caught = True
                exc = _collapse(rest) if rest is not None else None
        self._active = False
        if self._cancel_called:
            r.ncancel -= 1
        t = self._timer
        if t is not None:
            self._timer = None
            r._kill_timer(t)
        f = self._fifo
        if f is not None:
            self._fifo = None
            q = f.q
            while q and q[0]._fifo is not f:
                q.popleft()
        self._parent = None  # (an exited scope may sit in a FIFO for a while: it keeps no task alive)
        self._task = None
        return exc

    def _effectively_cancelled(self) -> bool:
        s: CancelScope | None = self
        while s is not None:
            if s._cancel_called:
                return True
            if s._shield:
                return False
            s = s._parent
        return False

    def _parent_cancelled_visible(self) -> bool:
        if self._shield:
            return False
        p = self._parent
        return p is not None and p._effectively_cancelled()

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        new = self._close(exc)
        if new is None:
            return True
        if new is exc:
            return False
        old_context = new.__context__
        try:
            raise new
        finally:
            new.__context__ = old_context

    def cancel(self) -> None:
        if self._cancel_called:
            return
        self._cancel_called = True
        if self._active:
            r = _G.runner
            if r is not None:
                r.ncancel += 1
                t = self._timer
                if t is not None:
                    self._timer = None
                    r._kill_timer(t)
                self._fifo = None
                r._deliver(self)

    @property
    def cancel_called(self) -> bool:
        if not self._cancel_called and self._deadline != INF and (self._active or not self._entered):
            r = _G.runner
            if r is not None and r.now() >= self._deadline:
                self.cancel()
        return self._cancel_called

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("deadline must not be NaN")
        self._deadline = float(value)
        self._rel = -1.0
        if self._active and not self._cancel_called:
            r = _runner()
            self._fifo = None
            t = self._timer
            if t is not None:
                self._timer = None
                r._kill_timer(t)
            if value != INF:
                self._timer = r._add_timer(self._deadline, self, None)

    @property
    def shield(self) -> bool:
        return self._shield

    @shield.setter
    def shield(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError("shield must be a bool")
        was = self._shield
        self._shield = value
        if was and not value and self._active:
            r = _G.runner
            if r is not None and r.ncancel:
                r._deliver(self)

    def __repr__(self) -> str:
        return f"<evloop.CancelScope cancel_called={self._cancel_called} deadline={self._deadline}>"


def _collapse(exc: BaseException) -> BaseException:
    """trio's collapse_exception_group: a group made by a loose nursery around one exception
    gives that exception back (recursively)."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    subs = list(exc.exceptions)
    modified = False
    for i, e in enumerate(subs):
        if isinstance(e, BaseExceptionGroup):
            c = _collapse(e)
            if c is not e:
                subs[i] = c
                modified = True
    if len(subs) == 1 and _NONSTRICT_NOTE in getattr(exc, "__notes__", ()):
        return subs[0]
    if modified:
        return exc.derive(subs)
    return exc


def move_on_at(deadline: float, *, shield: bool = False) -> CancelScope:
    return CancelScope(deadline=deadline, shield=shield)


def move_on_after(seconds: float, *, shield: bool = False) -> CancelScope:
    if seconds < 0:
        raise ValueError("timeout must be non-negative")
    scope = CancelScope(deadline=_runner().now() + seconds, shield=shield)
    scope._rel = float(seconds)
    return scope


class _FailScope:
    """``with fail_at(t):`` a cancel scope that raises TooSlowError if its deadline cancelled it."""

    def __init__(self, deadline: float, shield: bool) -> None:
        self.scope = CancelScope(deadline=deadline, shield=shield)

    def __enter__(self) -> CancelScope:
        return self.scope.__enter__()

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        handled = self.scope.__exit__(etype, exc, tb)
        if self.scope.cancelled_caught:
            raise TooSlowError
        return handled


def fail_at(deadline: float, *, shield: bool = False) -> _FailScope:
    return _FailScope(deadline, shield)


def fail_after(seconds: float, *, shield: bool = False) -> _FailScope:
    if seconds < 0:
        raise ValueError("timeout must be non-negative")
    fs = _FailScope(_runner().now() + seconds, shield)
    fs.scope._rel = float(seconds)
    return fs


# ------------------------------------------------------------------ nurseries


class _NoStatus:
    pass


_NO_STATUS: Final = _NoStatus()


class TaskStatus:
    """``task_status`` of a task started with ``Nursery.start``."""

    def __init__(self, old: Nursery, new: Nursery) -> None:
        self._old = old
        self._new = new
        self._value: object = _NO_STATUS

    def started(self, value: object = None) -> None:
        if self._value is not _NO_STATUS:
            raise RuntimeError("called 'started' twice on the same task status")
        self._value = value
        old = self._old
        if old._scope._effectively_cancelled():
            return  # as trio: the child stays where it is and will exit on its own
        new = self._new
        old_scope = old._scope
        for task in list(old._children):
            task._nursery = new
            new._children.add(task)
            # the task's outermost scope (or the task itself) hangs under the new nursery's scope
            if task._scope is old_scope:
                task._scope = new._scope
            else:
                s = task._scope
                while s is not None and s._parent is not old_scope:
                    s = s._parent
                if s is not None:
                    s._parent = new._scope
        old._children.clear()
        old._check_closed()
        r = _G.runner
        if r is not None and r.ncancel:
            r._deliver(new._scope)


class _StatusIgnored(TaskStatus):
    def __init__(self) -> None:
        pass

    def started(self, value: object = None) -> None:
        pass


TASK_STATUS_IGNORED: Final = _StatusIgnored()


class Nursery:
    def __init__(self, task: Task, scope: CancelScope, strict: bool) -> None:
        self._task = task
        self._scope = scope
        self._strict = strict
        self._children: set[Task] = set()
        self._pending: list[BaseException] = []
        self._nested_running = True
        self._pending_starts = 0
        self._closed = False
        self._parent_waiting = False

    @property
    def cancel_scope(self) -> CancelScope:
        return self._scope

    @property
    def child_tasks(self) -> frozenset[Task]:
        return frozenset(self._children)

    def _add_exc(self, exc: BaseException) -> None:
        self._pending.append(exc)
        self._scope.cancel()

    def _check_closed(self) -> None:
        if not self._nested_running and not self._children and not self._pending_starts:
            self._closed = True
            if self._parent_waiting:
                self._parent_waiting = False
                _runner().reschedule(self._task, None, None)

    def _child_finished(self, task: Task, exc: BaseException | None) -> None:
        self._children.discard(task)
        if exc is not None:
            self._add_exc(exc)
        self._check_closed()

    async def _nested_child_finished(self, nested_exc: BaseException | None) -> BaseException | None:
        if nested_exc is not None:
            self._add_exc(nested_exc)
        self._nested_running = False
        self._check_closed()
        if not self._closed:
            r = _runner()
            t = r.current
            assert t is not None
            self._parent_waiting = True
            t._parked = _FAIL_WAIT
            await _PARK
        else:
            try:
                await _CHECKPOINT
            except BaseException as e:
                self._add_exc(e)
        ns = self._task._nurseries
        if ns and ns[-1] is self:
            ns.pop()
        elif self in ns:
            ns.remove(self)
        if self._pending:
            excs = self._pending
            self._pending = []
            if not self._strict and len(excs) == 1:
                return excs[0]
            group = BaseExceptionGroup("Exceptions from evloop nursery", excs)
            if not self._strict:
                group.add_note(_NONSTRICT_NOTE)
            return group
        return None

    def start_soon(self, async_fn: Callable[..., Coroutine[Any, Any, Any]], *args: object,
                   name: object = None) -> None:
        if self._closed:
            raise RuntimeError("Nursery is closed to new arrivals")
        _runner().spawn(_coro(async_fn(*args), async_fn), _task_name(async_fn, name), self)

    async def start(self, async_fn: Callable[..., Coroutine[Any, Any, Any]], *args: object,
                    name: object = None) -> Any:
        if self._closed:
            raise RuntimeError("Nursery is closed to new arrivals")
        self._pending_starts += 1
        try:
            mgr = _NurseryManager(False)
            old = await mgr.__aenter__()
            status = TaskStatus(old, self)
            try:
                coro = _coro(async_fn(*args, task_status=status), async_fn)
                _runner().spawn(coro, _task_name(async_fn, name), old)
            except BaseException as e:
                if not await mgr.__aexit__(type(e), e, e.__traceback__):
                    raise
            else:
                await mgr.__aexit__(None, None, None)
            if status._value is _NO_STATUS:
                raise RuntimeError("child exited without calling task_status.started()")
            return status._value
        finally:
            self._pending_starts -= 1
            self._check_closed()


def _coro(obj: object, fn: object) -> Coroutine[Any, Any, Any]:
    """A coroutine (native, or compiled by mypyc: those are not ``types.CoroutineType``)."""
    if hasattr(obj, "send") and hasattr(obj, "throw"):
        return cast(Coroutine[Any, Any, Any], obj)
    raise TypeError(f"expected an async function, got {fn!r} returning {obj!r}")


def _task_name(fn: object, name: object) -> str:
    if name is None:
        name = getattr(fn, "__qualname__", None) or repr(fn)
    return str(name)


class _NurseryManager:
    def __init__(self, strict: bool) -> None:
        self._strict = strict
        self._scope: CancelScope | None = None
        self._nursery: Nursery | None = None

    async def __aenter__(self) -> Nursery:
        scope = CancelScope()
        scope.__enter__()
        self._scope = scope
        task = _runner().current
        assert task is not None
        n = Nursery(task, scope, self._strict)
        task._nurseries.append(n)
        self._nursery = n
        return n

    async def __aexit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        n = self._nursery
        scope = self._scope
        assert n is not None and scope is not None
        new = await n._nested_child_finished(exc)
        combined = scope._close(new)
        if combined is None:
            return True
        if combined is exc:
            return False
        old_context = combined.__context__
        try:
            raise combined
        finally:
            combined.__context__ = old_context


def open_nursery(strict_exception_groups: bool | None = None) -> _NurseryManager:
    return _NurseryManager(True if strict_exception_groups is None else strict_exception_groups)


# ------------------------------------------------------------------ Event, Lock


class _EventWait(_Waiter):
    def __init__(self, ev: Event) -> None:
        self.ev = ev

    def _abort(self, task: Task) -> bool:
        try:
            self.ev._waiters.remove(task)
        except ValueError:
            pass
        return True


class Event:
    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[Task] = []
        self._wait = _EventWait(self)

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters = self._waiters
        if waiters:
            self._waiters = []
            r = _runner()
            for t in waiters:
                if t._parked is self._wait:
                    r.reschedule(t, None, None)

    async def wait(self) -> None:
        if self._flag:
            await checkpoint()
            return
        r = _runner()
        t = r.current
        assert t is not None
        self._waiters.append(t)
        t._parked = self._wait
        await _PARK


class _LockWait(_Waiter):
    def __init__(self, lock: Lock) -> None:
        self.lock = lock

    def _abort(self, task: Task) -> bool:
        try:
            self.lock._waiters.remove(task)
        except ValueError:
            pass
        return True


class Lock:
    """trio.Lock: fair (a release hands the lock to the first waiter), owned by a task."""

    def __init__(self) -> None:
        self._owner: Task | None = None
        self._waiters: deque[Task] = deque()
        self._wait = _LockWait(self)

    def locked(self) -> bool:
        return self._owner is not None

    def acquire_nowait(self) -> None:
        task = current_task()
        if self._owner is task:
            raise RuntimeError("attempt to re-acquire an already held Lock")
        if self._owner is None and not self._waiters:
            self._owner = task
        else:
            raise WouldBlock

    async def acquire(self) -> None:
        await checkpoint_if_cancelled()
        try:
            self.acquire_nowait()
        except WouldBlock:
            r = _runner()
            t = r.current
            assert t is not None
            self._waiters.append(t)
            t._parked = self._wait
            await _PARK  # release() made us the owner
        else:
            await cancel_shielded_checkpoint()

    def release(self) -> None:
        task = current_task()
        if task is not self._owner:
            raise RuntimeError("can't release a Lock you don't own")
        if self._waiters:
            nxt = self._waiters.popleft()
            self._owner = nxt
            _runner().reschedule(nxt, None, None)
        else:
            self._owner = None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.release()


# ------------------------------------------------------------------ helpers


async def aclose_forcefully(resource: Any) -> None:
    with CancelScope() as cs:
        cs.cancel()
        await resource.aclose()


async def run_sync_in_thread(fn: Callable[..., Any], *args: object) -> Any:
    """``fn(*args)`` in a worker thread; not cancellable while it runs (trio's default)."""
    await checkpoint_if_cancelled()
    r = _runner()
    t = r.current
    assert t is not None
    job = _ThreadJob(r, t, fn, args)
    t._parked = job
    threading.Thread(target=job.work, name="evloop worker", daemon=True).start()
    return await _PARK


async def getaddrinfo(host: bytes | str | None, port: bytes | str | int | None, family: int = 0, type: int = 0,
                      proto: int = 0, flags: int = 0) -> list[tuple[Any, ...]]:
    """socket.getaddrinfo; a numeric host is resolved in place, others in a worker thread."""
    try:
        return socket.getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        pass
    res: list[tuple[Any, ...]] = await run_sync_in_thread(socket.getaddrinfo, host, port, family, type, proto, flags)
    return res


class _SignalReceiver:
    def __init__(self, runner: Runner, sigs: tuple[int, ...]) -> None:
        self._runner = runner
        self._sigs = sigs
        self._pending: dict[int, None] = {}
        self._waiter: Task | None = None
        self._old: dict[int, Any] = {}
        self._old_fd = -1
        self._wait = _SigWait(self)

    def _deliver(self, sig: int) -> None:
        self._pending[sig] = None
        w = self._waiter
        if w is not None:
            self._waiter = None
            if w._parked is self._wait:
                self._runner.reschedule(w, None, None)

    def __enter__(self) -> _SignalReceiver:
        r = self._runner
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Sorry, open_signal_receiver is only possible when running in Python interpreter's main thread")
        q = r._signals

        def handler(signum: int, frame: object) -> None:
            q.append(signum)
            r._poke()  # (the wake-up fd's byte may have been drained before this handler ran)

        for s in self._sigs:
            self._old[s] = signal.signal(s, handler)
        self._old_fd = signal.set_wakeup_fd(r._wake_w.fileno(), warn_on_full_buffer=False)
        r._receivers.append(self)
        return self

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        r = self._runner
        if self in r._receivers:
            r._receivers.remove(self)
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_fd)

    def __aiter__(self) -> _SignalReceiver:
        return self

    async def __anext__(self) -> int:
        if self._waiter is not None:
            raise BusyResourceError("only one task can iterate on a signal receiver at a time")
        if not self._pending:
            r = _runner()
            t = r.current
            assert t is not None
            self._waiter = t
            t._parked = self._wait
            await _PARK
        else:
            await checkpoint()
        sig = next(iter(self._pending))
        del self._pending[sig]
        return sig


class _SigWait(_Waiter):
    def __init__(self, rcv: _SignalReceiver) -> None:
        self.rcv = rcv

    def _abort(self, task: Task) -> bool:
        self.rcv._waiter = None
        return True


def open_signal_receiver(*signals: int | signal.Signals) -> _SignalReceiver:
    if not signals:
        raise TypeError("No signals were provided")
    return _SignalReceiver(_runner(), tuple(int(s) for s in signals))

