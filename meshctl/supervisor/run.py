"""The supervisor behind `meshctl up`: start, watch and stop the whole mesh.

The Supervisor holds mesh.yaml's plan and the mesh's phase, and hands the work
to collaborators it declares here, each in a file of its own:

- ``processes.Processes``: spawn each process, restart it with backoff when it
  dies (the rules: ``lifecycle.on_exit``), stop it;
- ``control.ControlPlane``: Pilot, Mixer and Citadel (``roles.CONTROL_ROLES``);
- ``registration.Registrations``: the registry (embedded in Pilot, Consul or
  Eureka), registration, keep-alive and the reachability probe;
- ``workloads.Workloads``: each app with its sidecar and its health loop
  (the rules: ``lifecycle.on_health``);
- ``gateways.Gateways``: the gateways, their readiness and registration;
- ``reload.settings_change``: what a changed ``settings`` block does to a
  running mesh.

Everything observable goes to ``status.json`` in the state directory, which
`meshctl status` reads, and to ``logs/``.

Shutdown (SIGTERM, SIGINT or `meshctl down`): instances are marked draining
and deregistered first, so Pilot moves traffic away, then sidecars and apps
get SIGTERM, then SIGKILL after a grace period; the control plane goes last.
SIGHUP (`up` on a running mesh) re-reads mesh.yaml and applies the difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import trio

from ..credentials import mesh_credential, private_dir
from ..model.mesh import MeshSpec
from ..state import write_control
from .citadel import proxy_env
from .control import ControlPlane
from .errors import UpError
from .gateways import Gateways
from .lifecycle import InstancePhase, MeshPhase, ProcPhase
from .plan import Plan, PlanError, load_mesh, make_plan
from .probes import http_get_json, port_is_free, redact_url, tail
from .processes import Processes
from .records import MeshContext, ProcState
from .registration import Registrations
from .reload import settings_change
from .roles import CONTROL_ROLES
from .workloads import Workloads

log = logging.getLogger("meshctl.up")

__all__ = ["Supervisor", "UpError", "http_get_json", "redact_url"]


class Supervisor:
    def __init__(
        self,
        mesh_path: Path,
        state_dir: Path,
        on_event: Callable[[str], None] | None = None,
        *,
        registry_url: str | None = None,
        consul_token: str | None = None,
        locality: str | None = None,
        advertise: str | None = None,
    ) -> None:
        self.mesh_path = mesh_path.resolve()
        self.state_dir = state_dir.resolve()
        self.on_event = on_event or (lambda msg: None)
        logs = self.state_dir / "logs"
        # Logs (requests, peers) and nodes are the mesh user's alone, like the CA: 0700 / 0600.
        private_dir(logs)
        private_dir(self.state_dir / "nodes")
        mesh_credential(self.state_dir)  # the CLI's and the supervisor's key to the control plane (0600)
        self.registry_override = registry_url  # `up --registry`, wins over settings.registry
        self.locality_override = locality  # `up --locality`, wins over settings.locality
        consul_token = consul_token or None
        self.advertise_override = (advertise or "").strip()  # `up --advertise`, wins over settings.advertise
        self.ctx = MeshContext(self.state_dir, logs, self._load_spec(), self.event, self.write_status)
        self.procs = Processes(self.ctx, self._proxy_env)
        self.control = ControlPlane(self.ctx, self.procs, consul_token)
        self.registrations = Registrations(self.ctx, self.control, consul_token)
        self.workloads = Workloads(self.ctx, self.procs, self.control, self.registrations)
        self.gateways = Gateways(self.ctx, self.procs, self.control, self.registrations)
        self.plan: Plan | None = None
        self.error = ""

    @property
    def spec(self) -> MeshSpec:
        return self.ctx.spec

    @property
    def citadel_url(self) -> str:
        return self.control.citadel_url

    def _proxy_env(self, p: ProcState) -> dict[str, str]:
        return proxy_env(self, p)

    def _load_spec(self) -> MeshSpec:
        spec = load_mesh(self.mesh_path)
        if self.registry_override:
            spec = replace(spec, settings=replace(spec.settings, registry=self.registry_override.strip()))
        if self.locality_override is not None:
            spec = replace(spec, settings=replace(spec.settings, locality=self.locality_override.strip()))
        if self.advertise_override:
            from .plan import advertise_problem

            if why := advertise_problem(self.advertise_override):
                raise UpError(f"--advertise: {why}")
            spec = replace(spec, settings=replace(spec.settings, advertise=self.advertise_override))
        return spec

    # ------------------------------------------------------------ events and status

    def event(self, msg: str) -> None:
        log.info("%s", msg)
        self.on_event(msg)
        self.write_status()

    def status(self) -> dict[str, Any]:
        pilot = self.control.pilot
        return {
            "pid": os.getpid(),
            "mesh": str(self.mesh_path),
            "state": self.ctx.phase,
            "error": self.error,
            "locality": self.spec.settings.locality,  # this host's (settings.locality or `up --locality`)
            "advertise": self.spec.settings.advertise or "127.0.0.1",
            "registry": self.registrations.status(),
            "rules": self.rules_location(),
            "control_plane": {
                "pilot": self.control.pilot_url,
                "state": pilot.state if pilot else ProcPhase.STOPPED,
                "pid": pilot.pid if pilot else None,
                "mixer": self.control.role_status("mixer"),
                "citadel": self.control.role_status("citadel"),
            },
            "workloads": self.workloads.status(),
            "gateways": self.gateways.status(),
        }

    def rules_location(self) -> str:
        """Where the rules live, for `meshctl status` (pilot/kvstore.py)."""
        from ..pilot.kvstore import read_location

        try:
            loc = read_location(self.state_dir)
        except Exception as e:  # status renders whatever the file holds
            return f"unknown ({e})"
        if loc.get("kind") == "consul":
            return f"Consul KV {redact_url(str(loc.get('registry', '')))} {loc.get('prefix', '')}rules/"
        return f"files in {self.state_dir / 'rules'}"

    def write_status(self) -> None:
        path = self.state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        tmp.replace(path)
        from ..mixer import promconfig

        promconfig.write(self.state_dir)  # Prometheus scrape config of every sidecar and gateway

    # ------------------------------------------------------------ preflight

    def preflight(self, plan: Plan) -> None:
        problems = []
        for svc in self.spec.services:
            for v in svc.versions:
                if not v.command:
                    continue
                cwd = Path(self.mesh_path.parent / svc.cwd) if svc.cwd else self.mesh_path.parent
                exe = v.command[0]
                found = (cwd / exe).exists() if "/" in exe else shutil.which(exe) is not None
                if not found:
                    problems.append(f"service {svc.name} version {v.name}: command {exe!r} not found" + (f" in {cwd}" if "/" in exe else " on PATH"))
                for arg in v.command[1:2]:
                    if arg.endswith(".py") and not (cwd / arg).exists():
                        problems.append(f"service {svc.name} version {v.name}: {arg} does not exist in {cwd}")
        fixed: list[tuple[int, str]] = []
        running_gw = self.gateways.plans
        for g in plan.gateways:
            if running_gw.get(g.name) != g:  # a gateway running as planned holds its own ports
                mine = set(running_gw[g.name].ports.values()) if g.name in running_gw else set()
                fixed += [(h, f"gateway {g.name} port {gp}") for gp, h in g.ports.items() if h not in mine]
        for w in plan.workloads:
            if w.name not in self.workloads.instances:
                fixed += [(p, f"upstream binding {s} of {w.name}") for s, p in w.bindings.items()]
        if not self.control.pilot:
            fixed += [(r.port(plan), r.title) for r in CONTROL_ROLES]
        for port, what in fixed:
            if not port_is_free(port):
                problems.append(f"127.0.0.1:{port} ({what}) is already in use by another program")
        address = self.spec.settings.advertise
        if address and not port_is_free(0, address):
            problems.append(f"the advertised address {address} (settings.advertise, --advertise) is not an address "
                            "of this host: sidecars cannot listen on it")
        if problems:
            raise UpError("; ".join(problems))

    def _previous_allocations(self) -> dict[str, int]:
        try:
            prev: dict[str, int] = json.loads((self.state_dir / "ports.json").read_text())
            return prev
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def make_plan(self) -> Plan:
        prev = self._previous_allocations()
        live: set[int] = set()
        for i in self.workloads.instances.values():
            live |= {i.plan.app_port, i.plan.inbound_port, i.plan.outbound_port, i.plan.admin_port, *i.plan.bindings.values()}
        if self.plan:
            live.add(self.plan.pilot_port)
        try:
            plan = make_plan(self.spec, self.mesh_path.parent, lambda p: p in live or port_is_free(p), prev)
        except PlanError as e:
            raise UpError(str(e)) from None
        (self.state_dir / "ports.json").write_text(json.dumps(dict(plan.allocations), indent=1))
        return plan

    # ------------------------------------------------------------ the whole mesh

    async def apply_plan(self, plan: Plan) -> None:
        """Start what is new, stop what is gone, restart what changed; leave the rest alone."""
        wanted = {w.name: w for w in plan.workloads}
        for name, inst in list(self.workloads.instances.items()):
            if name not in wanted or wanted[name] != inst.plan:
                self.event(f"{name}: {'removed' if name not in wanted else 'changed'}, stopping")
                await self.workloads.stop(name)
        for name, w in wanted.items():
            if name not in self.workloads.instances:
                self.workloads.start(w)
        wanted_gw = {g.name: g for g in plan.gateways}
        for name in list(self.gateways.plans):
            if wanted_gw.get(name) != self.gateways.plans[name]:
                self.event(f"gateway {name}: {'removed' if name not in wanted_gw else 'changed'}, stopping")
                await self.gateways.stop(name)
        for g in plan.gateways:
            if g.name not in self.gateways.running:
                self.gateways.start(g)
        self.plan = plan
        self.write_status()

    async def wait_ready(self) -> None:
        timeout = float(self.spec.settings.ready_timeout)
        deadline = trio.current_time() + timeout
        instances = self.workloads.instances
        while True:
            if self.registrations.refused:
                raise UpError(self.registrations.refused)
            pending = [i.plan.name for i in instances.values() if i.state != InstancePhase.READY]
            pending += [f"gateway {n}" for n, p in self.gateways.running.items() if p.state != ProcPhase.READY]
            if self.plan:
                pending += [f"gateway {g.name}" for g in self.plan.gateways if g.name not in self.gateways.running]
            if not pending and not self.registrations.embedded:
                # Registered in Consul/Eureka is not yet routable: Pilot learns of it
                # by its watch (Eureka: the next delta poll, a few seconds later).
                unseen = await self.registrations.unseen_by_pilot([i.plan for i in instances.values()])
                pending += [f"{n} (registered; Pilot has not seen it in the registry yet)" for n in sorted(unseen)]
            if not pending:
                return
            if trio.current_time() > deadline:
                details = []
                for i in instances.values():
                    if i.state != InstancePhase.READY:
                        details.append(f"{i.plan.name} is {i.state}:")
                        for p in (i.app, i.proxy):
                            if p is None:
                                continue
                            details.append(f"  {p.kind}: {p.last_event if p.restarts else f'log {p.log}'}")
                            details += [f"    | {line}" for line in tail(p.log, 3).splitlines()]
                raise UpError(f"not ready after {timeout:.0f}s: {', '.join(pending)}\n" + "\n".join(details))
            await trio.sleep(0.05)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring the mesh up, report started, then supervise until a signal says stop."""
        (self.state_dir / "supervisor.pid").write_text(str(os.getpid()))
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    self.ctx.nursery = nursery
                    try:
                        plan = self.make_plan()
                        self.preflight(plan)
                        self.write_status()
                        await self.registrations.connect()
                        await self.control.start(plan)
                        self.registrations.use_embedded()
                        nursery.start_soon(self.registrations.probe_loop, self.workloads.instances)
                        await self.apply_plan(plan)
                        await self.wait_ready()
                    except BaseException as e:
                        self.ctx.phase = MeshPhase.FAILED
                        self.error = str(e) if isinstance(e, UpError) else f"{e.__class__.__name__}: {e}"
                        self.write_status()
                        await self.shutdown()
                        nursery.cancel_scope.cancel()
                        if isinstance(e, (UpError, trio.Cancelled, KeyboardInterrupt)):
                            raise
                        raise UpError(self.error) from e
                    self.ctx.phase = MeshPhase.RUNNING
                    self.event("mesh is up")
                    task_status.started()
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            await self.reload()
                            continue
                        break
                    await self.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            try:
                (self.state_dir / "supervisor.pid").unlink()
            except FileNotFoundError:
                pass

    async def reload(self) -> None:
        """`up` again on a running mesh: re-read mesh.yaml and apply the difference.
        A changed ``settings`` block is carried out or refused by name (reload.py)."""
        try:
            spec = self._load_spec()
            if (spec.settings.registry or "embedded") != (self.spec.settings.registry or "embedded"):
                raise UpError(
                    f"the registry changed ({redact_url(self.spec.settings.registry)} → {redact_url(spec.settings.registry)}): "
                    "a running mesh keeps its registry; `meshctl down`, then `up` again"
                )
            change = settings_change(self.spec.settings, spec.settings)
            if change.refused:
                raise UpError(change.refusal())
            old = self.spec
            self.ctx.spec = spec
            try:
                plan = self.make_plan()
                self.preflight(plan)
            except Exception:
                self.ctx.spec = old
                raise
        except Exception as e:
            self.error = f"reload refused: {e}"
            self.event(self.error)
            return
        self.error = ""
        self.ctx.phase = MeshPhase.UPDATING
        await self.apply_plan(plan)
        if change.proxies:
            why = f"{', '.join(change.proxies)} changed in mesh.yaml"
            self.event(f"{why}: starting every sidecar and gateway again with the new settings")
            await self.workloads.restart_sidecars(why, timeout=float(spec.settings.ready_timeout))
            await self.gateways.restart_changed(why)
        try:
            await self.wait_ready()
            self.ctx.phase = MeshPhase.RUNNING
            self.event("mesh updated")
        except UpError as e:
            self.ctx.phase = MeshPhase.RUNNING
            self.error = str(e)
            self.event(str(e))

    async def shutdown(self) -> None:
        if self.ctx.shutting_down:
            return
        self.ctx.shutting_down = True
        self.ctx.phase = MeshPhase.STOPPING
        self.event("stopping the mesh")
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as n:
                n.start_soon(self.workloads.stop_all)
                n.start_soon(self.gateways.stop_all)
            await self.control.stop()
            await self.registrations.aclose()
            self.ctx.phase = MeshPhase.STOPPED
            write_control(self.state_dir, pilot=None, supervisor_pid=None)
            self.event("mesh stopped")
