"""The control plane in `meshctl up`: the roles of ``roles.CONTROL_ROLES`` as
supervised processes, started side by side and stopped in the list's order,
and the URL each serves at (what sidecars and gateways are started with)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from ..launch import proxy_argv
from ..state import write_control
from .errors import UpError
from .lifecycle import ProcPhase
from .plan import Plan
from .probes import http_ok, leaves, tail
from .processes import Processes
from .records import MeshContext, ProcState
from .roles import CONTROL_ROLES, Role, RoleContext

ROLE_START_TIMEOUT = 20.0  # seconds for Pilot, Mixer or Citadel to answer after it starts


class ControlPlane:
    def __init__(self, ctx: MeshContext, procs: Processes, consul_token: str | None) -> None:
        self.ctx = ctx
        self.procs = procs
        self.consul_token = consul_token
        # the control roles (roles.CONTROL_ROLES) by name, and the URL each serves at
        self.roles: dict[str, ProcState] = {}
        self.urls: dict[str, str] = {}

    @property
    def pilot(self) -> ProcState | None:
        return self.roles.get("pilot")

    @property
    def pilot_url(self) -> str:
        return self.urls.get("pilot", "")

    @property
    def mixer_url(self) -> str:
        return self.urls.get("mixer", "")

    @property
    def citadel_url(self) -> str:
        return self.urls.get("citadel", "")

    def role_status(self, name: str) -> dict[str, Any]:
        p = self.roles.get(name)
        return {"url": self.urls.get(name, ""), "state": p.state if p else ProcPhase.STOPPED, "pid": p.pid if p else None}

    def proxy_argv(self, name: str, node_file: Path, admin_port: int) -> list[str]:
        """`meshctl proxy run` for a sidecar or gateway of this mesh: its Pilot, its
        node file, its access log and (with Mixer) global rate-limit quotas and telemetry."""
        args = ["--access-log", str(self.ctx.logs / f"{name}.access.log")]
        if self.mixer_url:
            args += ["--mixer", self.mixer_url]
        return proxy_argv("--pilot", self.pilot_url, "--node", str(node_file), "--admin-port", str(admin_port),
                          "--state-dir", str(self.ctx.state_dir), *args)

    def record_rules_location(self) -> None:
        """Rules in Consul KV when the registry is Consul, else in the state directory (pilot/kvstore.py)."""
        from ..pilot.kvstore import record_location
        from ..pilot.store import StoreError
        from ..registry.base import RegistryError

        s = self.ctx.spec.settings
        try:
            record_location(self.ctx.state_dir, s.registry or "embedded", s.mesh_id or s.trust_domain,
                            token=self.consul_token)
        except (StoreError, RegistryError) as e:
            raise UpError(str(e)) from None

    async def start(self, plan: Plan) -> None:
        self.record_rules_location()
        self.urls["pilot"] = f"http://127.0.0.1:{plan.pilot_port}"
        write_control(self.ctx.state_dir, pilot=self.pilot_url, supervisor_pid=os.getpid())
        rc = RoleContext(plan, self.ctx.spec.settings, self.ctx.state_dir, self.consul_token)
        # The three roles start side by side: none needs another to come up.
        try:
            async with trio.open_nursery() as roles:
                for role in CONTROL_ROLES:
                    roles.start_soon(self._start_role, role, rc)
        except BaseExceptionGroup as group:
            first = next((e for e in leaves(group) if isinstance(e, UpError)), None)
            if first is None:
                raise
            raise first from None

    async def _start_role(self, role: Role, rc: RoleContext) -> None:
        if role.pre_start is not None:
            role.pre_start(rc)
        port = role.port(rc.plan)
        p = ProcState(name=role.name, kind="control-plane", argv=role.argv(rc), env=role.env(rc),
                      cwd=str(self.ctx.state_dir), log=self.ctx.logs / f"{role.name}.log")
        self.roles[role.name] = p
        url = self.urls[role.name] = f"http://127.0.0.1:{port}"
        if role.announce:
            write_control(self.ctx.state_dir, **{role.name: url})
        await self._run_role(p, role.title, port, role.ready_path)
        self.ctx.event(role.ready_event(rc, url))

    async def _run_role(self, p: ProcState, what: str, port: int, path: str, timeout: float = ROLE_START_TIMEOUT) -> None:
        """Run a control-plane process under supervision and wait until GET ``path`` on
        ``port`` answers; UpError naming its log if it exits or stays silent."""
        p.ready_check = (port, path)
        await self.ctx.tasks().start(self.procs.keep_running, p)
        with trio.move_on_after(timeout) as cs:
            while not await http_ok("127.0.0.1", port, path):
                if p.state == ProcPhase.FAILED or p.restarts:
                    break
                await trio.sleep(0.05)
        if cs.cancelled_caught or p.restarts or p.state == ProcPhase.FAILED:
            raise UpError(f"{what} did not start: see {p.log}:\n{tail(p.log)}")
        p.state = ProcPhase.READY

    async def stop(self) -> None:
        """The control roles, one after the other, in CONTROL_ROLES' order."""
        for role in CONTROL_ROLES:
            await self.procs.stop(self.roles.get(role.name))
            if role.clear_on_stop:
                write_control(self.ctx.state_dir, **{role.name: None})
