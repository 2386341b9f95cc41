"""Workload instances: each app (if mesh.yaml gives a command) with its sidecar.

One task per instance runs both processes (``Processes.keep_running``), a health
loop that checks the app (mesh.yaml healthCheck, else a TCP connect) and the
sidecar's /ready and asks ``lifecycle.on_health`` whether to register or
deregister it, and a keep-alive loop that renews its registration.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import trio

from ..loader.codec import to_data
from ..model.base import Duration
from ..model.mesh import HealthCheck
from ..model.proxyconfig import Node
from . import lifecycle
from .control import ControlPlane
from .lifecycle import Deregister, InstancePhase, Register, Thresholds
from .plan import WorkloadPlan, workload_node
from .probes import http_ok, tcp_ok
from .processes import STOP_GRACE, Processes
from .records import InstanceState, MeshContext, ProcState
from .registration import Registrations


class Workloads:
    def __init__(self, ctx: MeshContext, procs: Processes, control: ControlPlane, registrations: Registrations) -> None:
        self.ctx = ctx
        self.procs = procs
        self.control = control
        self.registrations = registrations
        self.instances: dict[str, InstanceState] = {}

    def node(self, w: WorkloadPlan) -> Node:
        """What the sidecar of ``w`` is started with under mesh.yaml as now in force."""
        return workload_node(w, self.ctx.spec)

    def _write_node(self, name: str, node: Node) -> None:
        (self.ctx.state_dir / "nodes" / f"{name}.json").write_text(json.dumps(to_data(node), indent=1))

    def start(self, w: WorkloadPlan) -> None:
        node = self.node(w)
        self._write_node(w.name, node)
        app = None
        if w.command:
            env = {**os.environ, **w.env}
            app = ProcState(w.name, "app", list(w.command), env, w.cwd, self.ctx.logs / f"{w.name}.app.log")
        proxy = ProcState(
            w.name,
            "sidecar",
            self.control.proxy_argv(w.name, self.ctx.state_dir / "nodes" / f"{w.name}.json", w.admin_port),
            {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")},
            str(self.ctx.state_dir),
            self.ctx.logs / f"{w.name}.proxy.log",
        )
        inst = self.instances[w.name] = InstanceState(w, node, app, proxy)
        self.ctx.tasks().start_soon(self._run, inst)

    async def _run(self, inst: InstanceState) -> None:
        with inst.cancel:
            async with trio.open_nursery() as n:
                def lost() -> None:
                    inst.set_health(lifecycle.on_process_lost(inst.health()))

                if inst.app:
                    await n.start(self.procs.keep_running, inst.app, lost)
                await n.start(self.procs.keep_running, inst.proxy, lost)
                n.start_soon(self._health_loop, inst)
                n.start_soon(self.registrations.keepalive_loop, inst)

    async def _health_loop(self, inst: InstanceState) -> None:
        w = inst.plan
        hc = HealthCheck(tcp=True, interval=Duration(1.0))
        while not self.ctx.shutting_down and inst.state != InstancePhase.STOPPED:
            if inst.state == InstancePhase.DRAINING:
                # leaving the endpoints (a stop, or a restart whose sidecar comes back: the
                # checks then register it again, so the loop waits here rather than ends)
                await trio.sleep(lifecycle.FAST_CHECK)
                continue
            # mesh.yaml as now in force (a reload may change the check); a service a reload
            # removed keeps its last check until its instance is stopped
            svc = next((s for s in self.ctx.spec.services if s.name == w.service), None)
            if svc is not None:
                hc = svc.health_check or HealthCheck(tcp=True, interval=Duration(1.0))
            thresholds = Thresholds(healthy=hc.healthy_threshold, unhealthy=hc.unhealthy_threshold)
            before = (inst.state, inst.proxy.pid)
            ok_app = await (http_ok(w.app_host, w.app_port, hc.http, timeout=float(hc.timeout)) if hc.http
                            else tcp_ok(w.app_host, w.app_port, timeout=float(hc.timeout)))
            ok_proxy = ok_app and await http_ok("127.0.0.1", w.admin_port, "/ready", timeout=1.0)
            if (inst.state, inst.proxy.pid) != before:
                # the instance changed while it was checked (a restart began, its sidecar was
                # replaced): the outcome is the old one's, and would register the instance
                # while its new sidecar is not up yet. The next check decides.
                continue
            health, verdict = lifecycle.on_health(inst.health(), ok_app, ok_proxy, thresholds)
            inst.ok_streak, inst.fail_streak = health.ok_streak, health.fail_streak
            if isinstance(verdict, Register):
                await self.registrations.register(inst)  # registering again is harmless: same id, same data
            elif isinstance(verdict, Deregister):
                await self.registrations.deregister(inst)
                inst.state = verdict.phase
                self.ctx.event(f"{w.name} unhealthy ({verdict.failed} check failed {verdict.streak}x): taken out of the endpoints")
            pause, inst.fast_checks = lifecycle.next_check(inst.fast_checks, inst.registered, float(hc.interval))
            await trio.sleep(pause)

    async def stop(self, name: str) -> None:
        """Take one instance out of the mesh: drain, deregister, stop its sidecar, then its app."""
        inst = self.instances[name]
        await self.registrations.drain(inst)
        if inst.registered:
            await self.registrations.deregister(inst, drain=inst.state != InstancePhase.DRAINING)
        inst.state = InstancePhase.STOPPED
        # Deregistered above; now the sidecar drains: on SIGTERM it serves
        # settings.drainDuration more while callers move away (Istio's
        # terminationDrainDuration); when the whole mesh stops nobody is left to
        # move, so SIGINT: it stops at once, finishing in-flight requests. The app goes after it.
        drain = float(self.ctx.spec.settings.drain_duration)
        await self.procs.stop(inst.proxy, signal.SIGINT if self.ctx.shutting_down else signal.SIGTERM,
                              STOP_GRACE + (0.0 if self.ctx.shutting_down else drain))
        await self.procs.stop(inst.app)
        inst.cancel.cancel()
        if not self.ctx.shutting_down:
            del self.instances[name]

    async def stop_all(self) -> None:
        async with trio.open_nursery() as n:
            for name in list(self.instances):
                n.start_soon(self.stop, name)

    async def restart_sidecars(self, why: str, timeout: float) -> None:
        """Start every sidecar whose node (nodes/<name>.json) differs under mesh.yaml as
        now in force with its new node (its app keeps running). Each goes out of the
        endpoints first (drained until Pilot no longer routes to it) and comes back in
        once healthy. Two waves, each in parallel, so a reload takes the same time for
        one instance or fifty: first every changed instance but one of each service
        version (that one keeps serving), then, once the first wave is back and seen by
        Pilot, the ones held back. A sidecar stops once every proxy but its wave's runs a
        config without it (gateways and the held-back sidecars included). A version with
        one instance only has none to serve while it restarts, as before."""
        changed: list[tuple[InstanceState, Node]] = []
        serving: dict[tuple[str, str], int] = {}  # instances of a service version that are not restarted
        for name in sorted(self.instances):
            inst = self.instances.get(name)
            if inst is None or inst.state == InstancePhase.STOPPED:
                continue
            node = self.node(inst.plan)
            key = (inst.plan.service, inst.plan.version)
            if node == inst.node:
                serving[key] = serving.get(key, 0) + 1
            else:
                changed.append((inst, node))
        first: list[tuple[InstanceState, Node]] = []
        held: list[tuple[InstanceState, Node]] = []
        for inst, node in changed:
            key = (inst.plan.service, inst.plan.version)
            if serving.get(key, 0) == 0 and not any((i.plan.service, i.plan.version) == key for i, _ in held):
                held.append((inst, node))
            else:
                first.append((inst, node))
        for wave in (first, held):
            if not wave:
                continue
            stopping = {inst.plan.name for inst, _ in wave}  # their proxies' names in Pilot
            async with trio.open_nursery() as n:
                for inst, node in wave:
                    n.start_soon(self._restart_sidecar, inst, node, why, timeout, stopping)
            if wave is first and held:
                await self.registrations.wait_seen_by_pilot([i.plan for i, _ in first if i.registered])

    async def _restart_sidecar(self, inst: InstanceState, node: Node, why: str, timeout: float,
                               stopping: set[str]) -> None:
        """Out of the endpoints, then SIGINT: the new sidecar binds the same ports, so the old
        one cannot serve a drain period as on a stop. Its callers get no such period either:
        before the SIGINT every other proxy runs a config without it (the ``stopping`` ones,
        this wave's, aside; Registrations.wait_callers_synced)."""
        name = inst.plan.name
        self._write_node(name, node)
        inst.node = node
        await self.registrations.drain(inst)
        if inst.registered:
            await self.registrations.deregister(inst, drain=inst.state != InstancePhase.DRAINING)
        # DRAINING while the callers catch up (the embedded registry's drain returns at once):
        # its checks, still passing, must not register it again under the old sidecar
        inst.state = InstancePhase.DRAINING
        await self.registrations.wait_callers_synced(inst.plan, stopping)
        inst.set_health(lifecycle.on_process_lost(inst.health()))
        inst.fast_checks = True
        old_pid = inst.proxy.pid
        await self.procs.restart(inst.proxy, why)
        with trio.move_on_after(timeout):
            while (inst.proxy.pid in (None, old_pid) or inst.state != InstancePhase.READY) and not self.ctx.shutting_down:
                await trio.sleep(0.05)

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": i.plan.name,
                "registry_id": self.registrations.instance_id(i.plan),  # with Consul/Eureka: name@address:port
                "service": i.plan.service,
                "version": i.plan.version,
                "state": i.state,
                "app_address": f"{i.plan.app_host}:{i.plan.app_port}",
                "inbound_address": f"{i.plan.address}:{i.plan.inbound_port}",
                "outbound_address": f"127.0.0.1:{i.plan.outbound_port}",
                "admin_address": f"127.0.0.1:{i.plan.admin_port}",
                "bindings": {s: f"127.0.0.1:{p}" for s, p in i.plan.bindings.items()},
                "app_pid": i.app.pid if i.app else None,
                "proxy_pid": i.proxy.pid,
                "restarts": (i.app.restarts if i.app else 0) + i.proxy.restarts,
                "last_event": max((p.last_event for p in (i.app, i.proxy) if p), key=len, default=""),
            }
            for i in self.instances.values()
        ]
