"""Spawning, restarting and stopping the mesh's processes.

One trio task per process (``keep_running``) starts it, waits for it to exit and
asks ``lifecycle.on_exit`` what to do: restart after a backoff, or give up (the
mesh stops, or the supervisor stopped it). ``restart`` stops a process so that
its task starts it again at once (a reload that changed what it starts with).
Each process runs in a session of its own, its output appended to its log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Callable

import trio

from . import lifecycle
from .lifecycle import BACKOFF_START, GiveUp, ProcPhase
from .probes import http_ok
from .records import MeshContext, ProcState

log = logging.getLogger("meshctl.up")

STOP_GRACE = 8.0


class Processes:
    def __init__(self, ctx: MeshContext, env_for: Callable[[ProcState], dict[str, str]]) -> None:
        self.ctx = ctx
        self.env_for = env_for  # the environment a process is (re)started with (citadel.proxy_env)

    async def _spawn(self, p: ProcState) -> trio.Process:
        f = os.fdopen(os.open(p.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab", buffering=0)
        f.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(p.argv)}\n".encode())
        try:
            proc = await trio.lowlevel.open_process(
                p.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=self.env_for(p), cwd=p.cwd,
                start_new_session=True
            )
        finally:
            f.close()
        p.process, p.pid = proc, proc.pid
        return proc

    async def keep_running(self, p: ProcState, on_exit: Callable[[], None] | None = None, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run p until shutdown; restart it with exponential backoff whenever it dies."""
        backoff = BACKOFF_START
        first = True
        while True:
            try:
                proc = await self._spawn(p)
            except OSError as e:
                p.state, p.last_event = ProcPhase.FAILED, f"cannot start {p.argv[0]}: {e.strerror}"
                self.ctx.event(f"{p.kind} {p.name}: {p.last_event}")
                if first:
                    task_status.started()
                    first = False
                retry = lifecycle.on_spawn_failed(backoff)
                await trio.sleep(retry.after)
                backoff = retry.backoff
                continue
            if first:
                task_status.started()
                first = False
            elif p.ready_check is not None and self.ctx.nursery is not None:
                p.state = ProcPhase.STARTING
                self.ctx.nursery.start_soon(self._await_ready, p, proc)
            started = trio.current_time()
            code = await proc.wait()
            requested, p.restart_requested = p.restart_requested, ""
            verdict = lifecycle.on_exit(p.state, backoff, started, trio.current_time(),
                                        shutting_down=self.ctx.shutting_down, requested=bool(requested))
            if isinstance(verdict, GiveUp):
                return
            if on_exit:
                on_exit()
            p.pid = None  # dead: status must not show its pid while the restart waits
            if requested:
                p.state = ProcPhase.STARTING
                p.last_event = f"restarted: {requested}"
                self.ctx.event(f"{p.kind} {p.name} {p.last_event}")
            else:
                p.restarts += 1
                p.state = ProcPhase.RESTARTING
                p.last_event = f"exited with code {code}; restart #{p.restarts} in {verdict.after:.1f}s (log: {p.log})"
                self.ctx.event(f"{p.kind} {p.name} {p.last_event}")
            await trio.sleep(verdict.after)
            backoff = verdict.backoff

    async def _await_ready(self, p: ProcState, proc: trio.Process) -> None:
        """A restarted control-plane role is "ready" again once its ready check answers."""
        assert p.ready_check is not None
        port, path = p.ready_check
        while proc.returncode is None and not self.ctx.shutting_down and p.state == ProcPhase.STARTING:
            if await http_ok("127.0.0.1", port, path):
                p.state = ProcPhase.READY
                self.ctx.event(f"{p.kind} {p.name} ready again (pid {proc.pid})")
                return
            await trio.sleep(0.1)

    async def restart(self, p: ProcState, why: str, sig: int = signal.SIGINT, grace: float = STOP_GRACE) -> None:
        """Stop p (``sig``, SIGKILL after ``grace``) and have its task start it again at
        once, not as a crash. SIGINT: a proxy stops at once, finishing in-flight requests."""
        proc = p.process
        if proc is None or proc.returncode is not None:
            return
        p.restart_requested = why
        await self._signal_and_wait(proc, sig, grace)

    async def stop(self, p: ProcState | None, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
        if p is None or p.process is None:
            return
        p.state = ProcPhase.STOPPED
        proc = p.process
        if proc.returncode is None:
            await self._signal_and_wait(proc, sig, grace)
        # Children the app left behind in its session go too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    async def _signal_and_wait(proc: trio.Process, sig: int, grace: float) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
