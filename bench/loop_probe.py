"""Run a sidecar (``python -m meshctl.proxy`` arguments) with its trio run loop recorded.

    python bench/loop_probe.py OUT.json [--steps] -- --config FILE --admin-port N ...

A trio Instrument notes, for every pass of the run loop, when the process woke
from epoll, how long it then ran before sleeping again (a "busy period"), how
much CPU time the thread used in it (the rest is time preempted) and, with
``--steps``, how many task steps that took; a ``gc.callbacks`` hook notes every collection
(generation, start, duration). With ``--steps`` every task step is timed too,
and steps over 200 µs of CPU time are kept with the task's name (costs a few µs
per step: two clock reads of each kind).
On exit (SIGINT: the sidecar stops at once) everything goes to OUT.json for
bench/tail_probe.py's analysis. /proc/self/schedstat is sampled at each
recorded gc and at exit, so run-queue waiting can be put beside CPU time.

Bench-only: the product is started unchanged, ``trio.run`` is wrapped to add
the instrument. Run from outside the source tree so the installed build is the
one imported.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from array import array

import trio
import trio.abc

SLOW_STEP_NS = 200_000
CONNECTION_TASKS = {"serve_connection"}  # the per-connection task (proxy/connection.py); the rest is named per pass


class LoopProbe(trio.abc.Instrument):
    def __init__(self) -> None:
        self.clock = time.perf_counter_ns
        self.wake = array("q")  # ns when epoll returned
        self.busy = array("q")  # ns from that return to the next epoll call
        self.nsteps = array("l")  # task steps in that busy period
        self.timeout = array("d")  # the epoll timeout asked for at the next sleep (s)
        self.cpu = array("q")  # ns of this thread's CPU time in the busy period
        self.cpu_clock = time.thread_time_ns
        self._woke = 0
        self._woke_cpu = 0
        self._n = 0
        self._t_step = 0
        self._c_step = 0
        self.slow_steps: list[tuple[int, int, str, int]] = []
        self.ntasks = array("l")  # distinct tasks stepped in the pass (--steps)
        self.names: dict[int, str] = {}  # pass index → names of the tasks other than connections' (--steps)
        self._tasks: dict[int, str] = {}
        self.in_steps = array("q")  # ns spent inside task steps in the pass (--steps); the rest is trio's
        self._in_steps = 0

    def after_io_wait(self, timeout: float) -> None:
        self._woke = self.clock()
        self._woke_cpu = self.cpu_clock()
        self._n = 0
        self._tasks = {}
        self._in_steps = 0

    def before_io_wait(self, timeout: float) -> None:
        if self._woke:
            self.wake.append(self._woke)
            self.busy.append(self.clock() - self._woke)
            self.cpu.append(self.cpu_clock() - self._woke_cpu)
            self.nsteps.append(self._n)
            self.timeout.append(timeout)
            self.ntasks.append(len(self._tasks))
            self.in_steps.append(self._in_steps)
            if self._tasks:
                other = sorted({n.rsplit(".", 1)[-1] for n in self._tasks.values()} - CONNECTION_TASKS)
                if other:
                    self.names[len(self.wake) - 1] = " ".join(other)


class StepProbe(LoopProbe):
    """LoopProbe that also times every task step (trio calls only the hooks a class defines)."""

    def before_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
        self._t_step = self.clock()
        self._c_step = self.cpu_clock()

    def after_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
        self._n += 1
        name = task.name
        self._tasks[id(task)] = name.split()[1] if name.startswith("<function ") else name
        d = self.clock() - self._t_step
        self._in_steps += d
        c = self.cpu_clock() - self._c_step
        if c > SLOW_STEP_NS:  # (start, CPU ns, task, wall ns)
            self.slow_steps.append((self._t_step, c, task.name, d))


def main() -> int:
    out = sys.argv[1]
    rest = sys.argv[2:]
    steps = "--steps" in rest[: rest.index("--")]
    argv = rest[rest.index("--") + 1:]
    probe = StepProbe() if steps else LoopProbe()
    gcs: list[tuple[int, int, int, int]] = []  # (generation, start ns, duration ns, collected)
    t_gc = [0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            t_gc[0] = time.perf_counter_ns()
        else:
            gcs.append((info["generation"], t_gc[0], time.perf_counter_ns() - t_gc[0], info["collected"]))

    gc.callbacks.append(on_gc)
    real_run = trio.run

    def run(*args, **kw):  # type: ignore[no-untyped-def]
        kw["instruments"] = list(kw.get("instruments", ())) + [probe]
        return real_run(*args, **kw)

    trio.run = run  # type: ignore[assignment]
    from meshctl.proxy.main import main as proxy_main

    t0 = time.perf_counter_ns()
    try:
        rc = proxy_main(argv)
    finally:
        with open("/proc/self/schedstat") as f:
            cpu_ns, wait_ns, slices = map(int, f.read().split())
        json.dump({"t0": t0, "wake": list(probe.wake), "busy": list(probe.busy), "nsteps": list(probe.nsteps), "cpu": list(probe.cpu),
                   "timeout": list(probe.timeout), "slow_steps": probe.slow_steps,
                   "ntasks": list(probe.ntasks), "in_steps": list(probe.in_steps), "names": probe.names, "gc": gcs,
                   "gc_threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                   "schedstat": {"cpu_ns": cpu_ns, "runq_wait_ns": wait_ns, "slices": slices}}, open(out, "w"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
