"""How long an access-log flush holds the event loop at a time, in one process.

    python bench/accesslog_stall.py [records, default 256] [--rounds 20]

A sidecar's access log (proxy/accesslog.py) is flushed when 256 records are
waiting (four times a second at 1,000 rps). Here one flush of that many
records, of the shape telemetry.py writes, runs in a task of its own, and a
trio Instrument times each of that task's steps in CPU time (thread time, so
that other processes on a shared machine do not count): the longest step is
the longest any connection of the sidecar waits for the loop because of the
flush. Medians over rounds of the longest step and of the flush's CPU in all.
Run it with each build's python for an A/B (from outside the source tree, so
the installed meshctl is the one imported).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio.abc

from meshctl.proxy.accesslog import AccessLog

RECORD = {
    "start_time": "2026-12-06T15:32:42.123Z", "method": "GET", "path": "/", "protocol": "HTTP/1.1",
    "response_code": 200, "grpc_status": None, "response_flags": "-", "bytes_received": 1024, "bytes_sent": 12,
    "duration": 1, "upstream_host": "127.0.0.1:12345",
    "upstream_cluster": "outbound|80||backend.default.svc.cluster.local",
    "x_request_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "authority": "backend",
    "user_agent": "fortio.org/fortio-1.69.0", "downstream_remote_address": "127.0.0.1", "listener": "outbound",
    "reporter": "source", "source_workload": "client-0", "destination_workload": "backend-0",
    "destination_service": "backend.default.svc.cluster.local",
}


class Steps(trio.abc.Instrument):
    """CPU time of each step of one task."""

    def __init__(self) -> None:
        self.task = None
        self.steps: list[int] = []
        self._t = 0

    def before_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
        if task is self.task:
            self._t = time.thread_time_ns()

    def after_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
        if task is self.task:
            self.steps.append(time.thread_time_ns() - self._t)


async def one(al: AccessLog, probe: Steps, n: int) -> tuple[float, float]:
    for i in range(n):
        al.write(dict(RECORD, path=f"/{i}"))
    probe.steps = []

    async def flusher() -> None:
        probe.task = trio.lowlevel.current_task()
        await trio.lowlevel.checkpoint()  # the flush starts in a step of its own
        await al.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher)
    return max(probe.steps) / 1e6, sum(probe.steps) / 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else 256
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 20
    probe = Steps()

    async def rounds_() -> list[tuple[float, float]]:
        with tempfile.TemporaryDirectory() as d:
            al = AccessLog(Path(d) / "a.log", flush_interval=3600, max_buffered=10 ** 9)
            res = [await one(al, probe, n) for _ in range(rounds)]
            al.file.close()
        return res

    res = trio.run(rounds_, instruments=[probe])
    hold = statistics.median(r[0] for r in res)
    cpu = statistics.median(r[1] for r in res)
    print(f"{n} records per flush, median of {rounds}: longest step of the flush {hold:.2f} ms of CPU; "
          f"the flush's steps {cpu:.2f} ms in all ({cpu / n * 1e3:.1f} µs a record)")
    print(f'{{"bench": "accesslog_stall", "records": {n}, "longest_step_ms": {hold:.3f}, "flush_cpu_ms": {cpu:.3f}}}')


if __name__ == "__main__":
    main()
