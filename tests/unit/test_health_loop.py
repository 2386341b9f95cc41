"""The supervisor's health loop (supervisor/workloads.py) with its probes replaced: a check
whose instance changed while it ran (a restart began) decides nothing."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from meshctl.supervisor import lifecycle, workloads
from meshctl.supervisor.lifecycle import InstancePhase
from meshctl.supervisor.records import InstanceState


class _Registrations:
    def __init__(self) -> None:
        self.registered: list[str] = []

    async def register(self, inst: InstanceState) -> None:
        self.registered.append(inst.plan.name)
        inst.registered = True
        inst.state = InstancePhase.READY

    async def deregister(self, inst: InstanceState) -> None:
        inst.registered = False


def _instance() -> InstanceState:
    plan = SimpleNamespace(name="reviews-v1-0", service="reviews", app_host="127.0.0.1", app_port=9080, admin_port=15000)
    inst = InstanceState(plan=plan, node=None, app=None, proxy=SimpleNamespace(pid=100))  # type: ignore[arg-type]
    inst.state, inst.registered = InstancePhase.READY, True
    return inst


async def test_a_check_across_the_start_of_a_restart_does_not_register_the_instance(monkeypatch, autojump_clock):
    in_check, release = trio.Event(), trio.Event()
    answers = [True, True]  # the check under way (app and old sidecar) is passed; the new sidecar is not up yet

    async def probe(*args, **kwargs) -> bool:
        in_check.set()
        await release.wait()
        return answers.pop() if answers else False

    monkeypatch.setattr(workloads, "tcp_ok", probe)
    monkeypatch.setattr(workloads, "http_ok", probe)
    regs = _Registrations()
    ctx = SimpleNamespace(shutting_down=False, spec=SimpleNamespace(services=()), event=lambda msg: None)
    w = workloads.Workloads(ctx, None, None, regs)  # type: ignore[arg-type]
    inst = _instance()
    async with trio.open_nursery() as n:
        n.start_soon(w._health_loop, inst)
        await in_check.wait()
        # the restart (_restart_sidecar) while the check waits: out of the registry, the
        # process lost, a new sidecar process
        inst.registered = False
        inst.set_health(lifecycle.on_process_lost(inst.health()))
        inst.proxy.pid = 101
        release.set()
        await trio.sleep(0.5)  # (less than the next check's pause)
        assert regs.registered == []
        assert inst.state == InstancePhase.RESTARTING
        n.cancel_scope.cancel()
