"""Gateways in `meshctl up`: one `meshctl proxy run` per mesh.yaml gateway, its
readiness, and its registration as the service ``<name>.istio-system`` (as
Istio's gateways are Kubernetes services there), one instance per mesh.yaml
port: sidecars reach an egress gateway by it.

Status shows a gateway's ports as it serves them: the mesh.yaml ``ports:`` map,
and the ports Gateway resources opened live on a port mesh.yaml does not map
(loader/gateways.py), read from the gateway's admin ``/listeners`` (listeners
named ``gateway-<Gateway port>``) each time its readiness is checked."""

from __future__ import annotations

import json
import os
from typing import Any

import trio

from ..loader.codec import to_data
from ..model.proxyconfig import Node
from . import lifecycle
from .control import ControlPlane
from .lifecycle import ProcPhase
from .plan import GatewayPlan, gateway_node
from .probes import http_get_json, http_ok
from .processes import Processes
from .records import MeshContext, ProcState
from .registration import Registrations


class Gateways:
    def __init__(self, ctx: MeshContext, procs: Processes, control: ControlPlane, registrations: Registrations) -> None:
        self.ctx = ctx
        self.procs = procs
        self.control = control
        self.registrations = registrations
        self.running: dict[str, ProcState] = {}
        self.plans: dict[str, GatewayPlan] = {}
        self.nodes: dict[str, Node] = {}
        self.live: dict[str, dict[int, int]] = {}  # gateway → its listeners now: Gateway port → host port
        self._scopes: dict[str, trio.CancelScope] = {}

    def _write_node(self, name: str, node: Node) -> None:
        (self.ctx.state_dir / "nodes" / f"{name}.json").write_text(json.dumps(to_data(node), indent=1))

    def start(self, g: GatewayPlan) -> None:
        self.ctx.tasks().start_soon(self._run, g)

    async def _run(self, g: GatewayPlan) -> None:
        node = self.nodes[g.name] = gateway_node(g, self.ctx.spec)
        self._write_node(g.name, node)
        p = ProcState(
            g.name, "gateway", self.control.proxy_argv(g.name, self.ctx.state_dir / "nodes" / f"{g.name}.json", g.admin_port),
            dict(os.environ), str(self.ctx.state_dir), self.ctx.logs / f"{g.name}.gateway.log",
        )
        self.running[g.name] = p
        self.plans[g.name] = g
        scope = self._scopes[g.name] = trio.CancelScope()
        await self.ctx.tasks().start(self.procs.keep_running, p)
        with scope:
            await self._watch(g, p)

    async def stop(self, name: str) -> None:
        self._scopes.pop(name).cancel()
        await self.registrations.deregister_gateway(self.plans[name])
        await self.procs.stop(self.running.pop(name))
        del self.plans[name]
        self.nodes.pop(name, None)
        self.live.pop(name, None)

    async def stop_all(self) -> None:
        """The mesh stops: every gateway stops and leaves the registry, side by side."""
        async with trio.open_nursery() as n:
            for p in self.running.values():
                n.start_soon(self.procs.stop, p)
            for g in self.plans.values():
                n.start_soon(self.registrations.deregister_gateway, g)

    async def restart_changed(self, why: str) -> None:
        """Start every gateway whose node differs under mesh.yaml as now in force again with its new node."""
        for name in sorted(self.running):
            node = gateway_node(self.plans[name], self.ctx.spec)
            if node == self.nodes.get(name):
                continue
            self.nodes[name] = node
            self._write_node(name, node)
            await self.procs.restart(self.running[name], why)

    async def _watch(self, g: GatewayPlan, p: ProcState) -> None:
        """Readiness by /ready, and the registrations, renewed at the registry's cadence."""
        renewed: float | None = None  # when its registrations were last renewed; None: not registered
        while not self.ctx.shutting_down:
            ok = await http_ok("127.0.0.1", g.admin_port, "/ready", timeout=1.0)
            new = lifecycle.gateway_phase(ok, p.state)
            if new is not None:
                p.state = new
                self.ctx.event(f"gateway {g.name} {new}")
            if ok:
                await self._read_listeners(g)
            if ok and lifecycle.renewal_due(renewed, trio.current_time(), self.registrations.keepalive_period()):
                renewed = await self.registrations.register_gateway(g, renewed)
            await trio.sleep(0.05 if not ok else 1.0)

    async def _read_listeners(self, g: GatewayPlan) -> None:
        """The gateway's listeners as it has them bound now; status.json rewritten when they change."""
        got = await trio.to_thread.run_sync(http_get_json, f"127.0.0.1:{g.admin_port}", "/listeners", 1.0)
        if not isinstance(got, dict):
            return
        live: dict[int, int] = {}
        for lname, address in got.items():
            gp, host_port = str(lname).removeprefix("gateway-"), str(address).rpartition(":")[2]
            if str(lname).startswith("gateway-") and gp.isdigit() and host_port.isdigit():
                live[int(gp)] = int(host_port)
        if self.live.get(g.name) != live and g.name in self.plans:
            self.live[g.name] = live
            self.ctx.changed()

    def ports(self, name: str) -> dict[int, int]:
        """Gateway port → host port: mesh.yaml's map and what Gateway resources opened live."""
        return {**self.plans[name].ports, **self.live.get(name, {})}

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name, p in self.running.items():
            ports = sorted(self.ports(name).items())
            out.append({
                "name": name,
                "address": ", ".join(f"{self.plans[name].address}:{h}" for _, h in ports),
                "listen": self.plans[name].address,
                "ports": {str(gp): h for gp, h in ports},
                "state": p.state,
                "pid": p.pid,
                "restarts": p.restarts,
            })
        return out
