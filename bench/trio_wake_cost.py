"""What one pass of trio's run loop costs after the process slept, by how long it slept.

    python bench/trio_wake_cost.py [passes, default 2000]

One task sleeps (``trio.sleep(gap)``) in a loop; a trio Instrument reads the
thread's CPU time when epoll returns and when the loop next calls it, so each
pass's CPU is the work of waking one task that does nothing: trio's own
bookkeeping plus the task's ``sleep``. With gap 0 the process never blocks
(the loop polls epoll with a zero timeout): the warm figure. With a gap the
process blocks in epoll and, on a machine with other work, whatever runs on
the core meanwhile evicts its caches; the difference is the cold wake-up that
every request pays at a low request rate (a sidecar at 1,000 rps blocks
between nearly every request). Medians and p90 of the CPU per pass.
"""

from __future__ import annotations

import sys
import time

import trio
import trio.abc


class PassCpu(trio.abc.Instrument):
    def __init__(self) -> None:
        self.cpu: list[int] = []
        self._woke = 0

    def after_io_wait(self, timeout: float) -> None:
        self._woke = time.thread_time_ns()

    def before_io_wait(self, timeout: float) -> None:
        if self._woke:
            self.cpu.append(time.thread_time_ns() - self._woke)


def passes(gap: float, n: int) -> list[int]:
    probe = PassCpu()

    async def main() -> None:
        for _ in range(n):
            await trio.sleep(gap)

    trio.run(main, instruments=[probe])
    return sorted(probe.cpu)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    out = {}
    for gap in (0.0, 0.00001, 0.0001, 0.001, 0.01):
        c = passes(gap, n if gap < 0.01 else n // 4)
        p50, p90 = c[len(c) // 2] / 1000, c[int(len(c) * 0.9)] / 1000
        out[gap] = p50
        print(f"asleep {gap * 1000:6.2f} ms between passes: CPU per pass p50 {p50:6.1f} µs, p90 {p90:6.1f} µs")
    print('{"bench": "trio_wake_cost", "cpu_us_p50_by_gap_ms": {'
          + ", ".join(f'"{g * 1000:g}": {v:.1f}' for g, v in out.items()) + "}}")


if __name__ == "__main__":
    main()
