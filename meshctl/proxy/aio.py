"""The sidecar's one import of trio's concurrency primitives.

Every module of the sidecar process under ``meshctl/proxy/`` reaches the
runtime's primitives through this module (``import meshctl.proxy.aio as aio``,
then ``aio.move_on_after(...)``), never through trio directly
(tests/unit/test_import_graph.py checks it), so that the data plane can be
bound to another runtime with trio's semantics by changing this one module.
It binds, once, at its first import, to the runtime ``MESHCTL_PROXY_LOOP``
names: ``evloop`` (proxy/evloop.py, the same names with trio's semantics on
one epoll, about half trio's CPU per request: docs/proxy.md) or ``trio``.
A sidecar or gateway process (proxy/main.py) sets ``evloop`` when the variable
is unset; anywhere else (tests, tools that import proxy modules into a trio
program) an unset variable means trio. On trio the
names below are trio's own objects, re-exported, with no wrapper around them,
so a call costs exactly what it cost through ``trio.`` (nothing interpreted
is added to the request path; the compiled modules read them as module
attributes, as they read trio's).

The names (trio's, with where trio keeps them):

- time and timeouts: ``sleep``, ``current_time``, ``move_on_after``,
  ``move_on_at``, ``fail_after``, ``CancelScope``, and the exceptions
  ``Cancelled`` and ``TooSlowError``;
- tasks: ``open_nursery``, ``Nursery``, ``TaskStatus``, ``TASK_STATUS_IGNORED``,
  ``run`` (the process's one run), ``run_sync_in_thread``
  (``trio.to_thread.run_sync``);
- synchronization: ``Event``, ``Lock``;
- trio.lowlevel, the parking and I/O primitives the hot path uses directly:
  ``checkpoint``, ``wait_readable``, ``wait_writable``, ``notify_closing``,
  ``current_task``, ``Task``, ``wait_task_rescheduled``, ``reschedule``
  (its value is an ``outcome.Value``), ``reschedule_value`` (a plain value: evloop makes
  no ``outcome.Value``), ``Abort``, ``current_clock``;
- the rest: ``aclose_forcefully``, ``open_signal_receiver``, ``getaddrinfo``
  (``trio.socket.getaddrinfo``: the system resolver in a worker thread).

- the stream interface: the ABCs ``AsyncResource``, ``SendStream``, ``ReceiveStream``,
  ``Stream``, ``HalfCloseableStream`` (``trio.abc``) and the exceptions
  ``ClosedResourceError``, ``BrokenResourceError``, ``BusyResourceError``, ``WouldBlock``.
  On evloop these are proxy/streamtypes.py's classes (same names, same abstract methods,
  same meaning), so a sidecar on evloop imports no trio at all: trio and its dependencies
  cost a sidecar ~4 MB of resident memory (bench/README.md, rss.sh). Code under proxy/ raises and catches them as
  ``aio.X``, so the classes it catches are the ones its runtime and streams raise.

Not here: ``trio.SSLStream`` (tls.py imports it where it wraps a stream that is not a
socket, which only tests on trio have) and ``trio.testing`` (``proxy/testing.py``, test
support).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# MESHCTL_PROXY_LOOP: the runtime (proxy/main.py makes evloop a sidecar's default and refuses a
# name that is not one of LOOPS)
LOOPS = ("trio", "evloop")
ASKED = os.environ.get("MESHCTL_PROXY_LOOP", "")
LOOP = "evloop" if ASKED == "evloop" else "trio"

if LOOP == "evloop" and not TYPE_CHECKING:
    from .evloop import (
        TASK_STATUS_IGNORED,
        Abort,
        aclose_forcefully,
        Cancelled,
        CancelScope,
        checkpoint,
        current_clock,
        current_task,
        current_time,
        Event,
        fail_after,
        getaddrinfo,
        Lock,
        move_on_after,
        move_on_at,
        notify_closing,
        Nursery,
        open_nursery,
        open_signal_receiver,
        reschedule,
        reschedule_value,
        run,
        run_sync_in_thread,
        sleep,
        Task,
        TaskStatus,
        TooSlowError,
        wait_readable,
        wait_task_rescheduled,
        wait_writable,
    )
    from .streamtypes import (
        AsyncResource,
        BrokenResourceError,
        BusyResourceError,
        ClosedResourceError,
        HalfCloseableStream,
        ReceiveStream,
        SendStream,
        Stream,
        WouldBlock,
    )
else:
    import outcome
    from trio import (
        TASK_STATUS_IGNORED,
        CancelScope,
        Cancelled,
        Event,
        Lock,
        Nursery,
        TaskStatus,
        TooSlowError,
        aclose_forcefully,
        current_time,
        fail_after,
        move_on_after,
        move_on_at,
        open_nursery,
        open_signal_receiver,
        run,
        sleep,
        BrokenResourceError,
        BusyResourceError,
        ClosedResourceError,
        WouldBlock,
    )
    from trio.abc import AsyncResource, HalfCloseableStream, ReceiveStream, SendStream, Stream
    from trio.lowlevel import (
        Abort,
        Task,
        checkpoint,
        current_clock,
        current_task,
        notify_closing,
        reschedule,
        wait_readable,
        wait_task_rescheduled,
        wait_writable,
    )
    from trio.socket import getaddrinfo
    from trio.to_thread import run_sync as run_sync_in_thread

    def reschedule_value(task: Task, value: object = None) -> None:
        """``reschedule(task, outcome.Value(value))`` (evloop's skips the Value)."""
        reschedule(task, outcome.Value(value))

__all__ = [
    "TASK_STATUS_IGNORED",
    "Abort",
    "AsyncResource",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "HalfCloseableStream",
    "ReceiveStream",
    "SendStream",
    "Stream",
    "WouldBlock",
    "CancelScope",
    "Cancelled",
    "Event",
    "Lock",
    "Nursery",
    "Task",
    "TaskStatus",
    "TooSlowError",
    "aclose_forcefully",
    "checkpoint",
    "current_clock",
    "current_task",
    "current_time",
    "fail_after",
    "getaddrinfo",
    "move_on_after",
    "move_on_at",
    "notify_closing",
    "open_nursery",
    "open_signal_receiver",
    "reschedule",
    "reschedule_value",
    "run",
    "run_sync_in_thread",
    "sleep",
    "wait_readable",
    "wait_task_rescheduled",
    "wait_writable",
]
