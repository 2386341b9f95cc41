"""meshctl.proxy.evloop against trio itself: each scenario runs on both (the ``lib`` fixture, a
small adapter giving both the same names) and must give the same, stated, observable result.
Time is a mock clock that jumps to the next deadline when every task is parked
(trio.testing.MockClock(autojump_threshold=0) / evloop.MockClock(autojump_threshold=0)), so the
times in the logs are exact."""

from __future__ import annotations

import os
import signal
import socket
import threading
from types import SimpleNamespace

import outcome
import pytest
import trio
import trio.testing

from meshctl.proxy import aio, evloop


def _trio_run(fn, *args):
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def _ev_run(fn, *args):
    return evloop.run(fn, *args, clock=evloop.MockClock(autojump_threshold=0))


TRIO = SimpleNamespace(
    name="trio", run=_trio_run, Cancelled=trio.Cancelled, CancelScope=trio.CancelScope, move_on_after=trio.move_on_after,
    move_on_at=trio.move_on_at, fail_after=trio.fail_after, fail_at=trio.fail_at, sleep=trio.sleep,
    sleep_until=trio.sleep_until, sleep_forever=trio.sleep_forever, current_time=trio.current_time,
    checkpoint=trio.lowlevel.checkpoint, open_nursery=trio.open_nursery, Event=trio.Event, Lock=trio.Lock,
    wait_readable=trio.lowlevel.wait_readable, wait_writable=trio.lowlevel.wait_writable,
    notify_closing=trio.lowlevel.notify_closing, current_task=trio.lowlevel.current_task,
    wait_task_rescheduled=trio.lowlevel.wait_task_rescheduled, reschedule=trio.lowlevel.reschedule,
    Abort=trio.lowlevel.Abort, TASK_STATUS_IGNORED=trio.TASK_STATUS_IGNORED,
    open_signal_receiver=trio.open_signal_receiver, run_sync_in_thread=trio.to_thread.run_sync,
    getaddrinfo=trio.socket.getaddrinfo, aclose_forcefully=trio.aclose_forcefully, current_clock=trio.lowlevel.current_clock,
    reschedule_value=aio.reschedule_value,  # (aio binds to trio in the tests)
    TooSlowError=trio.TooSlowError, BusyResourceError=trio.BusyResourceError,
    ClosedResourceError=trio.ClosedResourceError,
)
EV = SimpleNamespace(
    name="evloop", run=_ev_run, Cancelled=evloop.Cancelled, CancelScope=evloop.CancelScope,
    move_on_after=evloop.move_on_after, move_on_at=evloop.move_on_at, fail_after=evloop.fail_after,
    fail_at=evloop.fail_at, sleep=evloop.sleep, sleep_until=evloop.sleep_until, sleep_forever=evloop.sleep_forever,
    current_time=evloop.current_time, checkpoint=evloop.checkpoint, open_nursery=evloop.open_nursery,
    Event=evloop.Event, Lock=evloop.Lock, wait_readable=evloop.wait_readable, wait_writable=evloop.wait_writable,
    notify_closing=evloop.notify_closing, current_task=evloop.current_task,
    wait_task_rescheduled=evloop.wait_task_rescheduled, reschedule=evloop.reschedule, Abort=evloop.Abort,
    TASK_STATUS_IGNORED=evloop.TASK_STATUS_IGNORED, open_signal_receiver=evloop.open_signal_receiver,
    run_sync_in_thread=evloop.run_sync_in_thread, getaddrinfo=evloop.getaddrinfo,
    aclose_forcefully=evloop.aclose_forcefully, current_clock=evloop.current_clock,
    reschedule_value=evloop.reschedule_value,
    TooSlowError=evloop.TooSlowError, BusyResourceError=evloop.BusyResourceError,
    ClosedResourceError=evloop.ClosedResourceError,
)


@pytest.fixture(params=[TRIO, EV], ids=lambda lib: lib.name)
def lib(request):
    return request.param


def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _excs(e):
    """A (possibly nested) exception group as nested lists of 'Type:message'."""
    if isinstance(e, BaseExceptionGroup):
        return [_excs(x) for x in e.exceptions]
    return f"{type(e).__name__}:{e}" if not isinstance(e, (trio.Cancelled, evloop.Cancelled)) else "Cancelled"


# ------------------------------------------------------------------ cancellation


def test_cancel_parked_task(lib):
    async def main():
        log = []
        ev = lib.Event()

        async def waiter(scope_box):
            with lib.CancelScope() as cs:
                scope_box.append(cs)
                try:
                    await ev.wait()
                    log.append("woke")
                except lib.Cancelled:
                    log.append(("cancelled at", lib.current_time()))
                    raise
            log.append(("caught", cs.cancelled_caught, cs.cancel_called))

        box = []
        async with lib.open_nursery() as n:
            n.start_soon(waiter, box)
            await lib.sleep(3)
            box[0].cancel()
        return log

    assert lib.run(main) == [("cancelled at", 3.0), ("caught", True, True)]


def test_nested_scopes_and_shield(lib):
    async def main():
        log = []
        with lib.CancelScope() as outer:
            with lib.CancelScope() as inner:
                outer.cancel()
                try:
                    await lib.checkpoint()
                except lib.Cancelled:
                    log.append("inner saw Cancelled")
                    raise
            log.append("not reached")
        log.append(("outer", outer.cancelled_caught, "inner", inner.cancelled_caught))
        # both cancelled: the outermost cancelled one catches
        with lib.CancelScope() as o2:
            with lib.CancelScope() as i2:
                i2.cancel()
                o2.cancel()
                await lib.sleep(1)
        log.append(("o2", o2.cancelled_caught, "i2", i2.cancelled_caught))
        # a shield keeps an outer cancellation out until it is left
        with lib.CancelScope() as o3:
            o3.cancel()
            with lib.CancelScope(shield=True) as sh:
                await lib.sleep(2)
                log.append(("slept under shield until", lib.current_time()))
            log.append(("shield caught", sh.cancelled_caught))
            await lib.checkpoint()
            log.append("not reached")
        log.append(("o3", o3.cancelled_caught))
        # a shielded scope cancelled itself catches its own Cancelled
        with lib.CancelScope() as o4:
            o4.cancel()
            with lib.CancelScope(shield=True) as s4:
                s4.cancel()
                await lib.checkpoint()
            log.append(("s4", s4.cancelled_caught))
        log.append(("o4", o4.cancelled_caught))
        return log

    assert lib.run(main) == [
        "inner saw Cancelled", ("outer", True, "inner", False), ("o2", True, "i2", False),
        ("slept under shield until", 2.0), ("shield caught", False), ("o3", True), ("s4", True), ("o4", False),
    ]


def test_unshield_delivers_to_parked_task(lib):
    async def main():
        log = []
        async with lib.open_nursery() as n:
            box = []

            async def child():
                with lib.CancelScope(shield=True) as sh:
                    box.append(sh)
                    await lib.sleep(100)
                log.append(("child out at", lib.current_time(), sh.cancelled_caught))

            n.start_soon(child)
            await lib.sleep(1)
            n.cancel_scope.cancel()
            await lib.sleep(0)  # (the parent is cancelled too: this raises)
        return log

    async def outer():
        async with lib.open_nursery() as n:
            box = []
            log = []

            async def child():
                try:
                    with lib.CancelScope(shield=True) as sh:
                        box.append(sh)
                        await lib.sleep(100)
                finally:
                    log.append(("child out at", lib.current_time()))

            n.start_soon(child)
            await lib.sleep(1)
            n.cancel_scope.cancel()
            with lib.CancelScope(shield=True):
                await lib.sleep(4)
                box[0].shield = False
        return log

    assert lib.run(main) == [("child out at", 100.0, False)]
    assert lib.run(outer) == [("child out at", 5.0)]


def test_deadlines_moved(lib):
    async def main():
        log = []
        with lib.move_on_after(10) as cs:
            async with lib.open_nursery() as n:
                async def mover():
                    await lib.sleep(2)
                    cs.deadline = 3  # earlier: fires at 3
                n.start_soon(mover)
                await lib.sleep(100)
        log.append(("moved earlier", lib.current_time(), cs.cancelled_caught))
        start = lib.current_time()
        with lib.move_on_at(start + 2) as cs2:
            async with lib.open_nursery() as n:
                async def later():
                    await lib.sleep(1)
                    cs2.deadline = start + 7  # later: the old deadline must not fire
                n.start_soon(later)
                await lib.sleep(100)
        log.append(("moved later", lib.current_time() - start, cs2.cancelled_caught))
        start = lib.current_time()
        with lib.move_on_after(1) as cs3:
            cs3.deadline = float("inf")
            await lib.sleep(5)
        log.append(("to inf", lib.current_time() - start, cs3.cancelled_caught))
        with lib.move_on_after(0) as cs4:
            await lib.checkpoint()
        log.append(("zero", cs4.cancelled_caught))
        try:
            with lib.fail_after(2):
                await lib.sleep(3)
        except lib.TooSlowError:
            log.append(("too slow", lib.current_time() - start))
        with lib.fail_at(lib.current_time() + 5):
            await lib.sleep(1)
        log.append("fail_at kept")
        return log

    assert lib.run(main) == [("moved earlier", 3.0, True), ("moved later", 7.0, True), ("to inf", 5.0, False),
                             ("zero", True), ("too slow", 7.0), "fail_at kept"]


def test_cancel_reaches_grandchildren(lib):
    async def main():
        log = []

        async def leaf(name):
            try:
                await lib.sleep_forever()
            except lib.Cancelled:
                log.append((name, lib.current_time()))
                raise

        async def mid():
            async with lib.open_nursery() as n:
                n.start_soon(leaf, "grandchild")
                with lib.CancelScope(shield=True):
                    await lib.sleep(10)
                    log.append(("shielded mid done", lib.current_time()))

        with lib.move_on_after(4) as cs:
            async with lib.open_nursery() as n:
                n.start_soon(leaf, "child")
                n.start_soon(mid)
        log.append(("outer", cs.cancelled_caught, lib.current_time()))
        return sorted(log, key=repr)

    assert lib.run(main) == sorted([("child", 4.0), ("grandchild", 4.0), ("shielded mid done", 10.0),
                                    ("outer", True, 10.0)], key=repr)


# ------------------------------------------------------------------ nurseries


def test_nursery_error_cancels_siblings(lib):
    async def main():
        log = []

        async def bad():
            await lib.sleep(1)
            raise ValueError("boom")

        async def sibling():
            try:
                await lib.sleep(10)
            finally:
                log.append(("sibling out", lib.current_time()))

        try:
            async with lib.open_nursery() as n:
                n.start_soon(bad)
                n.start_soon(sibling)
                await lib.sleep(50)
                log.append("body not cancelled?")
        except BaseExceptionGroup as g:
            log.append(_excs(g))
        log.append(lib.current_time())

        async def bad2(msg):
            raise KeyError(msg)

        try:  # two children failing in the same batch (neither reaches a cancel point): both in the group
            async with lib.open_nursery() as n:
                n.start_soon(bad2, "a")
                n.start_soon(bad2, "b")
        except BaseExceptionGroup as g:
            log.append(sorted(_excs(g)))
        try:  # the body's own exception is wrapped too (strict groups)
            async with lib.open_nursery() as n:
                n.start_soon(sibling)
                raise RuntimeError("body")
        except BaseExceptionGroup as g:
            log.append(_excs(g))
        with lib.move_on_after(2) as cs:  # an outer cancel: no group escapes
            async with lib.open_nursery() as n:
                n.start_soon(lib.sleep_forever)
                n.start_soon(lib.sleep_forever)
        log.append(("outer caught", cs.cancelled_caught))
        return log

    assert lib.run(main) == [("sibling out", 1.0), ["ValueError:boom"], 1.0, ["KeyError:'a'", "KeyError:'b'"],
                             ("sibling out", 1.0), ["RuntimeError:body"], ("outer caught", True)]


def test_start_and_started(lib):
    async def main():
        log = []

        async def server(tag, task_status=lib.TASK_STATUS_IGNORED):
            await lib.sleep(2)
            task_status.started(f"ready-{tag}")
            try:
                await lib.sleep_forever()
            except lib.Cancelled:
                log.append((tag, "cancelled", lib.current_time()))
                raise

        async def fails_first(task_status=lib.TASK_STATUS_IGNORED):
            await lib.sleep(1)
            raise OSError("bind failed")

        async def never_starts(task_status=lib.TASK_STATUS_IGNORED):
            await lib.sleep(1)

        async with lib.open_nursery() as n:
            v = await n.start(server, "a")
            log.append((v, lib.current_time()))
            try:
                await n.start(fails_first)
            except OSError as e:  # raised as is (start's own nursery is loose), not in a group
                log.append(("start raised", str(e)))
            try:
                await n.start(never_starts)
            except RuntimeError as e:
                log.append(("start raised", "without calling" in str(e)))
            n.start_soon(server, "b")  # (ignored status: started() is a no-op)
            await lib.sleep(5)
            n.cancel_scope.cancel()  # the started task now belongs to n: this reaches it
        log.append(("end", lib.current_time()))
        return sorted(log, key=repr)

    assert lib.run(main) == sorted([("ready-a", 2.0), ("start raised", "bind failed"), ("start raised", True),
                                    ("a", "cancelled", 9.0), ("b", "cancelled", 9.0), ("end", 9.0)], key=repr)


# ------------------------------------------------------------------ Event, Lock


def test_event_and_lock(lib):
    async def main():
        log = []
        ev = lib.Event()

        async def waiter(i):
            await ev.wait()
            log.append(("woke", i, lib.current_time()))

        async with lib.open_nursery() as n:
            for i in range(3):
                n.start_soon(waiter, i)
            await lib.sleep(1)
            log.append(("set?", ev.is_set()))
            ev.set()
        await ev.wait()  # already set: returns (a checkpoint)
        log.append(("set", ev.is_set()))
        log.sort(key=repr)

        lock = lib.Lock()
        order = []

        async def user(name, delay, hold):
            await lib.sleep(delay)
            async with lock:
                order.append((name, lib.current_time()))
                await lib.sleep(hold)

        async def cancelled_user():
            with lib.move_on_after(1.5):
                await lib.sleep(1)
                await lock.acquire()
                order.append("cancelled_user got it")

        async with lib.open_nursery() as n:
            n.start_soon(user, "a", 0, 3)
            n.start_soon(user, "b", 0.5, 1)
            n.start_soon(cancelled_user)
            n.start_soon(user, "c", 2, 1)

        async def foreign_release():
            try:
                lock.release()
            except RuntimeError as e:
                order.append(("foreign release", str(e)))

        await lock.acquire()
        async with lib.open_nursery() as n:
            n.start_soon(foreign_release)
        lock.release()
        log.append(order)
        return log

    assert lib.run(main) == [("set", True), ("set?", False), ("woke", 0, 1.0), ("woke", 1, 1.0), ("woke", 2, 1.0),
                             [("a", 1.0), ("b", 4.0), ("c", 5.0), ("foreign release", "can't release a Lock you don't own")]]


# ------------------------------------------------------------------ I/O


def test_wait_readable_writable_on_socketpair(lib):
    async def main():
        log = []
        a, b = _pair()
        try:
            async def reader():
                await lib.wait_readable(a)
                log.append(("readable at", lib.current_time(), a.recv(4)))
                await lib.wait_readable(a)  # 6 bytes are still there: level semantics, no new data needed
                log.append(("still readable", a.recv(100)))

            async with lib.open_nursery() as n:
                n.start_soon(reader)
                await lib.sleep(2)
                b.send(b"0123456789")
            # a blocked writer wakes when the peer drains
            filled = 0
            while True:
                try:
                    filled += a.send(b"x" * 65536)
                except BlockingIOError:
                    break

            async def writer():
                await lib.wait_writable(a)
                log.append(("writable at", lib.current_time()))

            async with lib.open_nursery() as n:
                n.start_soon(writer)
                await lib.sleep(3)
                got = 0
                while got < filled:
                    try:
                        got += len(b.recv(1 << 20))
                    except BlockingIOError:
                        await lib.sleep(0)
            # wait_readable again on the same fd, many times (a persistent registration)
            for i in range(3):
                b.send(b"%d" % i)
                await lib.wait_readable(a)
                log.append(a.recv(10))
            b.close()
            await lib.wait_readable(a)  # the peer's close: readable (EOF)
            log.append(("eof", a.recv(10)))
        finally:
            a.close()
        return log

    assert lib.run(main) == [("readable at", 2.0, b"0123"), ("still readable", b"456789"), ("writable at", 5.0),
                             b"0", b"1", b"2", ("eof", b"")]


def test_fd_reused_after_close(lib):
    """A socket closed while registered, its fd number reused by a new socket: waits work."""
    async def main():
        log = []
        for i in range(3):
            a, b = _pair()
            async with lib.open_nursery() as n:
                async def rd():
                    await lib.wait_readable(a)
                    log.append(a.recv(10))
                n.start_soon(rd)
                await lib.sleep(1)
                b.send(b"m%d" % i)
            a.close()
            b.close()
        return log

    assert lib.run(main) == [b"m0", b"m1", b"m2"]


def test_notify_closing_and_busy(lib):
    async def main():
        log = []
        a, b = _pair()

        async def reader(tag):
            try:
                await lib.wait_readable(a)
                log.append((tag, "readable"))
            except lib.BusyResourceError:
                log.append((tag, "busy"))
            except lib.ClosedResourceError:
                log.append((tag, "closed", lib.current_time()))

        async with lib.open_nursery() as n:
            n.start_soon(reader, "first")
            await lib.sleep(1)
            n.start_soon(reader, "second")
            await lib.sleep(1)
            lib.notify_closing(a)
            a.close()
        b.close()
        return log

    assert lib.run(main) == [("second", "busy"), ("first", "closed", 2.0)]


# ------------------------------------------------------------------ low level


def test_reschedule_and_abort(lib):
    async def main():
        log = []
        box = {}

        async def parked(tag, result):
            box[tag] = lib.current_task()

            def abort(raise_cancel):
                log.append((tag, "abort called"))
                return result

            try:
                v = await lib.wait_task_rescheduled(abort)
                log.append((tag, "value", v))
            except lib.Cancelled:
                log.append((tag, "cancelled", lib.current_time()))
            except ValueError as e:
                log.append((tag, "error", str(e)))

        async with lib.open_nursery() as n:
            n.start_soon(parked, "v", lib.Abort.SUCCEEDED)
            n.start_soon(parked, "e", lib.Abort.SUCCEEDED)
            await lib.sleep(1)
            lib.reschedule(box["v"], outcome.Value(5))
            await lib.sleep(1)
            lib.reschedule(box["e"], outcome.Error(ValueError("bad")))
        async with lib.open_nursery() as n:
            with lib.CancelScope() as cs:
                n.start_soon(parked, "s", lib.Abort.SUCCEEDED)
            await lib.sleep(1)
            n.cancel_scope.cancel()
        async with lib.open_nursery() as n:
            n.start_soon(parked, "f", lib.Abort.FAILED)
            await lib.sleep(1)
            n.cancel_scope.cancel()
            with lib.CancelScope(shield=True):
                await lib.sleep(2)  # the abort failed: the task stays parked until rescheduled
                log.append(("f still parked at", lib.current_time()))
                lib.reschedule(box["f"], outcome.Value("late"))
        return log

    assert lib.run(main) == [("v", "value", 5), ("e", "error", "bad"), ("s", "abort called"), ("s", "cancelled", 3.0),
                             ("f", "abort called"), ("f still parked at", 6.0), ("f", "value", "late")]


def test_reschedule_value_and_outcomes(lib):
    # reschedule_value(task, v) is reschedule(task, outcome.Value(v)); reschedule takes
    # Value and Error (evloop looks at their exact classes first)
    async def main():
        got = []
        box = {}

        async def parked(tag):
            box[tag] = lib.current_task()
            try:
                got.append((tag, await lib.wait_task_rescheduled(lambda _: lib.Abort.SUCCEEDED)))
            except KeyError as e:
                got.append((tag, "error", e.args[0]))

        async with lib.open_nursery() as n:
            for tag in ("a", "b", "c", "d"):
                n.start_soon(parked, tag)
            await lib.sleep(1)
            lib.reschedule_value(box["a"], ("x", 1))
            lib.reschedule_value(box["b"])
            lib.reschedule(box["c"], outcome.Value(None))
            lib.reschedule(box["d"], outcome.Error(KeyError("k")))
        return sorted(got)

    assert lib.run(main) == [("a", ("x", 1)), ("b", None), ("c", None), ("d", "error", "k")]


def test_autojump_clock(lib):
    async def main():
        t0 = lib.current_time()
        async with lib.open_nursery() as n:
            n.start_soon(lib.sleep, 1000)
            n.start_soon(lib.sleep, 3000)
            await lib.sleep_until(t0 + 500)
            mid = lib.current_time() - t0
        return mid, lib.current_time() - t0, lib.current_clock().current_time() - t0

    assert lib.run(main) == (500.0, 3000.0, 3000.0)


def test_signal_receiver(lib):
    async def main():
        got = []
        with lib.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as sigs:
            os.kill(os.getpid(), signal.SIGUSR2)
            async for s in sigs:
                got.append(s)
                if len(got) == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                else:
                    break
        return got

    old = signal.getsignal(signal.SIGUSR1)
    assert lib.run(main) == [signal.SIGUSR2, signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is old


def test_run_sync_in_thread_and_getaddrinfo(lib):
    async def main():
        main_thread = threading.get_ident()
        out = [await lib.run_sync_in_thread(lambda a, b: (a + b, threading.get_ident() != main_thread), 40, 2)]

        def fails():
            raise KeyError("in thread")

        try:
            await lib.run_sync_in_thread(fails)
        except KeyError as e:
            out.append(("raised", str(e)))
        with lib.move_on_after(1) as cs:  # not cancellable once started: the thread's result comes back
            ev = threading.Event()
            out.append(await lib.run_sync_in_thread(lambda: ev.wait(0.5) or "done"))
        out.append(cs.cancelled_caught)
        infos = await lib.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        out.append(infos[0][4])
        infos = await lib.getaddrinfo("localhost", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
        out.append(infos[0][4])
        return out

    res = lib.run(main)
    assert res[:3] == [(42, True), ("raised", "'in thread'"), "done"]
    assert res[4:] == [("127.0.0.1", 80), ("127.0.0.1", 80)]


def test_aclose_forcefully(lib):
    class Res:
        def __init__(self):
            self.log = []

        async def aclose(self):
            try:
                await lib.checkpoint()
                self.log.append("not cancelled")
            except lib.Cancelled:
                self.log.append("cancelled")
                raise
            finally:
                self.log.append("closed")

    async def main():
        r = Res()
        await lib.aclose_forcefully(r)
        return r.log

    assert lib.run(main) == ["cancelled", "closed"]


# ------------------------------------------------------------------ evloop only


def test_deadline_bookkeeping_stays_bounded():
    """Scopes that exit before their deadline: an absolute deadline's timer stays in the heap, dead,
    until the dead outnumber the live (then the heap is rebuilt); move_on_after's scopes sit in
    their duration's FIFO, whose dead head is dropped when the scope exits. So 10,000 requests'
    timeouts do not pile up."""
    async def main():
        r = evloop._G.runner
        sizes = []
        fifo = []
        async with evloop.open_nursery() as n:
            n.start_soon(evloop.sleep, 1e6)  # one live timer
            await evloop.sleep(0)
            for i in range(10_000):
                with evloop.move_on_at(evloop.current_time() + 30):
                    await evloop.checkpoint()
                with evloop.move_on_after(30):
                    await evloop.checkpoint()
                sizes.append(len(r.timers))
                fifo.append(sum(len(f.q) for f in r.fifos.values()))
            n.cancel_scope.cancel()
        return max(sizes), max(fifo)

    biggest, fifo = _ev_run(main)
    assert biggest <= 2 * 64 + 4
    assert fifo <= 1


def test_many_timeouts_of_one_duration(lib):
    """move_on_after scopes of the same duration, entered at different times, left in any order."""
    async def main():
        log = []

        async def req(i, start, dur):
            await lib.sleep(start)
            with lib.move_on_after(5) as cs:
                await lib.sleep(dur)
            log.append((i, lib.current_time(), cs.cancelled_caught))

        async with lib.open_nursery() as n:
            for i, (st, d) in enumerate([(0, 1), (0.5, 10), (1, 2), (1.5, 4.9), (2, 5.5), (3, 0.1)]):
                n.start_soon(req, i, st, d)
        return sorted(log)

    assert lib.run(main) == [(0, 1.0, False), (1, 5.5, True), (2, 3.0, False), (3, 6.4, False), (4, 7.0, True),
                             (5, 3.1, False)]


def test_hangup_without_waiter_does_not_spin():
    """A peer's close while nobody waits on the fd: epoll reports HUP on every poll unless the fd
    is taken out; the loop must stay asleep (count its passes across a 0.2 s sleep: a spinning
    loop makes thousands)."""
    async def main():
        a, b = _pair()
        b.send(b"x")
        await evloop.wait_readable(a)  # registered, now nobody waits
        b.close()
        r = evloop._G.runner
        before = r.passes
        with evloop.move_on_after(0.2):
            await evloop.sleep_forever()
        passes = r.passes - before
        a.recv(10)
        a.close()
        return passes

    assert evloop.run(main) < 50


# the names meshctl/proxy/aio.py (the sidecar's one import of trio's primitives) re-exports
AIO_NAMES = ["TASK_STATUS_IGNORED", "Abort", "CancelScope", "Cancelled", "Event", "Lock", "Nursery", "Task", "TaskStatus",
             "TooSlowError", "aclose_forcefully", "checkpoint", "current_clock", "current_task", "current_time",
             "fail_after", "getaddrinfo", "move_on_after", "move_on_at", "notify_closing", "open_nursery",
             "open_signal_receiver", "reschedule", "reschedule_value", "run", "run_sync_in_thread", "sleep", "wait_readable",
             "wait_task_rescheduled", "wait_writable"]


def test_evloop_has_the_names_aio_binds():
    missing = [n for n in AIO_NAMES if n not in evloop.__all__ or not hasattr(evloop, n)]
    assert missing == []
    # its exceptions are its own (proxy/streamtypes.py), not trio's: a sidecar on evloop imports no trio
    assert evloop.TooSlowError is not trio.TooSlowError
    assert evloop.TooSlowError.__module__ == evloop.ClosedResourceError.__module__ == "meshctl.proxy.streamtypes"


def test_run_returns_and_raises():
    async def ok(x):
        await evloop.sleep(0)
        return x * 2

    async def bad():
        raise KeyError("k")

    assert evloop.run(ok, 21) == 42
    with pytest.raises(KeyError):
        evloop.run(bad)
    with pytest.raises(RuntimeError):
        evloop.current_time()


def test_start_cancelled_before_started(lib):
    async def main():
        log = []

        async def slow(task_status=lib.TASK_STATUS_IGNORED):
            try:
                await lib.sleep(5)
                task_status.started()
            finally:
                log.append(("child out", lib.current_time()))

        async with lib.open_nursery() as n:
            with lib.move_on_after(1) as cs:
                await n.start(slow)
                log.append("not reached")
            log.append(("caller", cs.cancelled_caught, lib.current_time()))
            n.start_soon(lib.sleep, 2)
        log.append(("nursery done", lib.current_time()))
        try:
            n.start_soon(lib.sleep, 1)
        except RuntimeError as e:
            log.append(str(e))
        return log

    assert lib.run(main) == [("child out", 1.0), ("caller", True, 1.0), ("nursery done", 3.0),
                             "Nursery is closed to new arrivals"]


def test_more_ready_fds_than_one_pass_takes():
    # epoll_wait returns at most 256 events a pass: the rest (level-triggered) come in the next
    n = 270
    pairs = [socket.socketpair() for _ in range(n)]
    try:
        for a, b in pairs:
            a.setblocking(False)
            b.send(b"x")

        async def main():
            got = []

            async def reader(s):
                await evloop.wait_readable(s)
                got.append(s.recv(1))

            async with evloop.open_nursery() as nursery:
                for a, _ in pairs:
                    nursery.start_soon(reader, a)
            return got

        assert evloop.run(main) == [b"x"] * n
    finally:
        for a, b in pairs:
            a.close()
            b.close()
