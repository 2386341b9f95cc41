"""The supervisor behind `meshctl up`: start, watch and stop the whole mesh.

One trio task per process (control plane, each app, each sidecar, each
gateway) restarts it with backoff when it dies; one health task per workload
instance checks the app (mesh.yaml healthCheck, else a TCP connect) and the
sidecar's /ready, and keeps the instance registered only while both pass.
Everything observable goes to ``status.json`` in the state directory, which
`meshctl status` reads, and to ``logs/``.

Shutdown (SIGTERM, SIGINT or `meshctl down`): instances are marked draining
and deregistered first, so Pilot moves traffic away, then sidecars and apps
get SIGTERM, then SIGKILL after a grace period; the control plane goes last.

With Consul or Eureka (``settings.registry`` or ``up --registry``) the
registry is pinged before anything starts, and `up` fails naming it when it
does not answer. Registrations are renewed at the registry's own cadence
(a third of Consul's TTL, Eureka's renewal interval), whatever the health
check interval; a probe task keeps `status` honest about the registry's
reachability and, when it comes back, renews (re-registers) every instance
at once and retries the deregistrations that failed while it was away.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import trio

from ..credentials import bearer, mesh_credential, private_dir
from ..launch import meshctl_argv, proxy_argv  # the same from a virtualenv or the one-file build
from ..loader.codec import to_data
from ..model.base import FrozenDict
from ..model.mesh import HealthCheck, MeshSpec
from ..pilot.compile import META_LOCALITY, META_PROTOCOL, META_SERVICE_ACCOUNT, META_SERVICE_PORT, META_SIDECAR
from ..registry import Backoff, parse_registry_url
from ..registry.base import Instance, Registry, RegistryError
from ..state import write_control
from . import lifecycle
from .citadel import proxy_env
from .errors import UpError
from .lifecycle import (BACKOFF_START, Deregister, GiveUp, Health, InstancePhase, MeshPhase, ProcPhase, Register,
                        Thresholds)
from .pilotreg import PilotRegistry
from .plan import GatewayPlan, Plan, WorkloadPlan, gateway_node, load_mesh, make_plan, workload_node
from .roles import CONTROL_ROLES, Role, RoleContext

log = logging.getLogger("meshctl.up")

ROLE_START_TIMEOUT = 20.0  # seconds for Pilot, Mixer or Citadel to answer after it starts
STOP_GRACE = 8.0
REGISTRY_PING_TIMEOUT = 15.0  # `up` gives up on an unresponsive registry after this long
REGISTRY_PROBE_INTERVAL = 2.0  # how stale `status` may be about the registry's reachability
REGISTRY_PROBE_TIMEOUT = 5.0
DRAIN_WAIT = 10.0  # longest wait for Pilot to drop a removed instance before its sidecar stops


__all__ = ["Supervisor", "UpError", "http_get_json", "redact_url"]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class ProcState:
    name: str
    kind: str  # app | sidecar | gateway | control-plane
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: Path
    pid: int | None = None
    restarts: int = 0
    state: ProcPhase = ProcPhase.STARTING
    last_event: str = ""
    process: trio.Process | None = None
    # control-plane roles: (port, path) that answers once the process serves; after a
    # restart the state goes starting → ready by it (not "restarting" for ever)
    ready_check: tuple[int, str] | None = None


@dataclass
class InstanceState:
    plan: WorkloadPlan
    app: ProcState | None
    proxy: ProcState
    state: InstancePhase = InstancePhase.STARTING
    registered: bool = False
    ok_streak: int = 0
    fail_streak: int = 0
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    # One registry call at a time per instance: a renewal that finds the
    # instance gone re-registers it, which must not undo a deregistration.
    lock: trio.Lock = field(default_factory=trio.Lock)

    def health(self) -> Health:
        return Health(self.state, self.registered, self.ok_streak, self.fail_streak)

    def set_health(self, h: Health) -> None:
        self.state, self.ok_streak, self.fail_streak = h.phase, h.ok_streak, h.fail_streak


def gateway_instances(g: GatewayPlan) -> list[Instance]:
    """A gateway in the registry: service ``<name>.istio-system``, one instance per
    mesh.yaml port (the Gateway port as its service port, the host port to reach)."""
    return [
        Instance(id=f"{g.name}-{gport}", service=f"{g.name}.istio-system", address="127.0.0.1", port=hport,
                 labels=g.labels, meta=FrozenDict({META_SERVICE_PORT: str(gport), META_PROTOCOL: "http"}))
        for gport, hport in sorted(g.ports.items())
    ]


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
        self.logs = self.state_dir / "logs"
        # Logs (requests, peers) and nodes are the mesh user's alone, like the CA: 0700 / 0600.
        private_dir(self.logs)
        private_dir(self.state_dir / "nodes")
        mesh_credential(self.state_dir)  # the CLI's and the supervisor's key to the control plane (0600)
        self.registry_override = registry_url  # `up --registry`, wins over settings.registry
        self.locality_override = locality  # `up --locality`, wins over settings.locality
        self.consul_token = consul_token or None
        self.advertise_override = (advertise or "").strip()  # `up --advertise`, wins over settings.advertise
        self.spec: MeshSpec = self._load_spec()
        self.plan: Plan | None = None
        self.instances: dict[str, InstanceState] = {}
        self.gateways: dict[str, ProcState] = {}
        self.gateway_plans: dict[str, GatewayPlan] = {}
        self._gateway_scopes: dict[str, trio.CancelScope] = {}
        # the control roles (roles.CONTROL_ROLES) by name, and the URL each serves at
        self.roles: dict[str, ProcState] = {}
        self.role_urls: dict[str, str] = {}
        self.registry: Registry | None = None  # Consul or Eureka (connect_registry), else Pilot's embedded one
        self.state = MeshPhase.STARTING
        self.error = ""
        self.shutting_down = False
        self._nursery: trio.Nursery | None = None
        self._status_dirty = trio.Event()
        self._registry_down = False
        self._registry_error = ""  # why the last probe failed
        self._refused = ""  # a registry that answers but refuses a registration at `up` (an ACL, say)
        self._undeleted: set[str] = set()  # deregistrations that failed while the registry was away

    @property
    def pilot(self) -> ProcState | None:
        return self.roles.get("pilot")

    @property
    def pilot_url(self) -> str:
        return self.role_urls.get("pilot", "")

    @property
    def mixer_url(self) -> str:
        return self.role_urls.get("mixer", "")

    @property
    def citadel_url(self) -> str:
        return self.role_urls.get("citadel", "")

    def _role_status(self, name: str) -> dict:
        p = self.roles.get(name)
        return {"url": self.role_urls.get(name, ""), "state": p.state if p else ProcPhase.STOPPED, "pid": p.pid if p else None}

    def sidecar_args(self, name: str) -> list[str]:
        """Extra `proxy run` arguments for a sidecar or gateway of this mesh."""
        args = ["--access-log", str(self.logs / f"{name}.access.log")]
        if self.mixer_url:
            args += ["--mixer", self.mixer_url]  # global rate-limit quotas, telemetry
        return args

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

    def status(self) -> dict:
        reg = self.registry
        return {
            "pid": os.getpid(),
            "mesh": str(self.mesh_path),
            "state": self.state,
            "error": self.error,
            "locality": self.spec.settings.locality,  # this host's (settings.locality or `up --locality`)
            "advertise": self.spec.settings.advertise or "127.0.0.1",
            "registry": {
                "url": redact_url(self.spec.settings.registry),
                "reachable": bool(getattr(reg, "reachable", True)) and not self._registry_down if reg else False,
                "error": (self._registry_error or getattr(reg, "last_error", "") or "") if reg else "",
            },
            "control_plane": {
                "pilot": self.pilot_url,
                "state": self.pilot.state if self.pilot else ProcPhase.STOPPED,
                "pid": self.pilot.pid if self.pilot else None,
                "mixer": self._role_status("mixer"),
                "citadel": self._role_status("citadel"),
            },
            "workloads": [
                {
                    "name": i.plan.name,
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
            ],
            "gateways": [
                {
                    "name": name,
                    "address": ", ".join(f"127.0.0.1:{h}" for _, h in sorted(self._gateway_plan(name).ports.items())),
                    "ports": {str(g): h for g, h in self._gateway_plan(name).ports.items()},
                    "state": p.state,
                    "pid": p.pid,
                    "restarts": p.restarts,
                }
                for name, p in self.gateways.items()
            ],
        }

    def _gateway_plan(self, name: str) -> GatewayPlan:
        return self.gateway_plans[name]

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
        for g in plan.gateways:
            if self.gateway_plans.get(g.name) != g:  # a gateway running as planned holds its own ports
                mine = {h for h in self.gateway_plans[g.name].ports.values()} if g.name in self.gateway_plans else set()
                fixed += [(h, f"gateway {g.name} port {gp}") for gp, h in g.ports.items() if h not in mine]
        for w in plan.workloads:
            if not any(i.plan.name == w.name for i in self.instances.values()):
                fixed += [(p, f"upstream binding {s} of {w.name}") for s, p in w.bindings.items()]
        if not self.pilot:
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
            return json.loads((self.state_dir / "ports.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def make_plan(self) -> Plan:
        from .plan import PlanError

        prev = self._previous_allocations()
        live = set()
        for i in self.instances.values():
            live |= {i.plan.app_port, i.plan.inbound_port, i.plan.outbound_port, i.plan.admin_port, *i.plan.bindings.values()}
        if self.plan:
            live.add(self.plan.pilot_port)
        try:
            plan = make_plan(self.spec, self.mesh_path.parent, lambda p: p in live or port_is_free(p), prev)
        except PlanError as e:
            raise UpError(str(e)) from None
        (self.state_dir / "ports.json").write_text(json.dumps(dict(plan.allocations), indent=1))
        return plan

    # ------------------------------------------------------------ processes

    async def _spawn(self, p: ProcState) -> trio.Process:
        f = os.fdopen(os.open(p.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab", buffering=0)
        f.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(p.argv)}\n".encode())
        try:
            proc = await trio.lowlevel.open_process(
                p.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=proxy_env(self, p), cwd=p.cwd,
                start_new_session=True
            )
        finally:
            f.close()
        p.process, p.pid = proc, proc.pid
        return proc

    async def keep_running(self, p: ProcState, on_exit: Callable[[], None] | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run p until shutdown; restart it with exponential backoff whenever it dies."""
        backoff = BACKOFF_START
        first = True
        while True:
            try:
                proc = await self._spawn(p)
            except OSError as e:
                p.state, p.last_event = ProcPhase.FAILED, f"cannot start {p.argv[0]}: {e.strerror}"
                self.event(f"{p.kind} {p.name}: {p.last_event}")
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
            elif p.ready_check is not None and self._nursery is not None:
                p.state = ProcPhase.STARTING
                self._nursery.start_soon(self._await_ready, p, proc)
            started = trio.current_time()
            code = await proc.wait()
            verdict = lifecycle.on_exit(p.state, backoff, started, trio.current_time(), shutting_down=self.shutting_down)
            if isinstance(verdict, GiveUp):
                return
            if on_exit:
                on_exit()
            p.restarts += 1
            p.pid = None  # dead: status must not show its pid while the restart waits
            p.state = ProcPhase.RESTARTING
            p.last_event = f"exited with code {code}; restart #{p.restarts} in {verdict.after:.1f}s (log: {p.log})"
            self.event(f"{p.kind} {p.name} {p.last_event}")
            await trio.sleep(verdict.after)
            backoff = verdict.backoff

    async def _await_ready(self, p: ProcState, proc: trio.Process) -> None:
        """A restarted control-plane role is "ready" again once its ready check answers."""
        assert p.ready_check is not None
        port, path = p.ready_check
        while proc.returncode is None and not self.shutting_down and p.state == ProcPhase.STARTING:
            if await http_ok("127.0.0.1", port, path):
                p.state = ProcPhase.READY
                self.event(f"{p.kind} {p.name} ready again (pid {proc.pid})")
                return
            await trio.sleep(0.1)

    async def stop_proc(self, p: ProcState | None, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
        if p is None or p.process is None:
            return
        p.state = ProcPhase.STOPPED
        proc = p.process
        if proc.returncode is None:
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
        # Children the app left behind in its session go too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------ registry

    async def connect_registry(self) -> None:
        """Open Consul or Eureka and check that it answers, before anything starts.

        The embedded registry lives in Pilot: it is reached once Pilot runs."""
        url = (self.spec.settings.registry or "embedded").strip()
        try:
            if parse_registry_url(url)["kind"] == "embedded":
                return
            from ..registry import open_registry

            reg = open_registry(url, self.state_dir, token=self.consul_token)
        except RegistryError as e:
            raise UpError(str(e)) from None
        try:
            with trio.fail_after(REGISTRY_PING_TIMEOUT):
                await reg.ping()
        except RegistryError as e:
            await reg.aclose()
            raise UpError(f"the registry does not answer, nothing was started: {e}") from None
        except trio.TooSlowError:
            await reg.aclose()
            raise UpError(f"the registry {redact_url(url)} did not answer within {REGISTRY_PING_TIMEOUT:g}s; nothing was started") from None
        self.registry = reg
        self.event(f"registry {redact_url(url)} answers")

    def keepalive_period(self) -> float:
        """How often registrations are renewed: the registry's own cadence
        (Consul: a third of the check's TTL; Eureka: the lease renewal interval)."""
        return lifecycle.keepalive_period(getattr(self.registry, "keepalive_interval", None),
                                          getattr(self.registry, "ttl", None))

    async def keepalive_loop(self, inst: InstanceState) -> None:
        period = self.keepalive_period()
        while not self.shutting_down:
            await trio.sleep(period)
            await self._renew(inst)

    async def _renew(self, inst: InstanceState) -> None:
        async with inst.lock:
            if not inst.registered or self.shutting_down:
                return
            try:
                await self.registry.keep_alive(inst.plan.name)
            except RegistryError as e:
                log.warning("keep-alive of %s failed: %s", inst.plan.name, e)

    async def registry_probe_loop(self) -> None:
        """Ping Consul/Eureka every few seconds so `status` says when it is away;
        when it is back, renew every registration at once (a registry that lost
        them gets them again) and retry the deregistrations that failed."""
        reg = self.registry
        if not hasattr(reg, "ping"):
            return
        url = redact_url(self.spec.settings.registry)
        backoff = Backoff(initial=0.5, maximum=2.0)  # a refused connect is cheap: notice the return soon
        while not self.shutting_down:
            ok, why = False, f"{url}: no answer to a ping within {REGISTRY_PROBE_TIMEOUT:g}s"
            with trio.move_on_after(REGISTRY_PROBE_TIMEOUT):
                try:
                    await reg.ping()
                    ok = True
                except RegistryError as e:
                    why = str(e)
            self._registry_error = "" if ok else why
            if not ok and not self._registry_down:
                self._registry_down = True
                self.event(f"registry {url} unreachable ({why}); proxies keep the endpoints they know; retrying")
            elif ok and self._registry_down:
                self._registry_down = False
                self.event(f"registry {url} reachable again: renewing registrations")
                for name in sorted(self._undeleted):
                    if name in self.instances and self.instances[name].registered:
                        self._undeleted.discard(name)
                        continue
                    try:
                        await reg.deregister(name)
                        self._undeleted.discard(name)
                    except RegistryError as e:
                        log.warning("deregister %s failed again: %s", name, e)
                for inst in list(self.instances.values()):
                    await self._renew(inst)
                self.write_status()
            if ok:
                backoff.reset()
                await trio.sleep(REGISTRY_PROBE_INTERVAL)
            else:
                await trio.sleep(backoff.next())

    # ------------------------------------------------------------ control plane

    async def start_control_plane(self, plan: Plan) -> None:
        self.role_urls["pilot"] = f"http://127.0.0.1:{plan.pilot_port}"
        write_control(self.state_dir, pilot=self.pilot_url, supervisor_pid=os.getpid())
        assert self._nursery is not None
        ctx = RoleContext(plan, self.spec.settings, self.state_dir, self.consul_token)
        # The three roles start side by side: none needs another to come up.
        try:
            async with trio.open_nursery() as roles:
                for role in CONTROL_ROLES:
                    roles.start_soon(self._start_control_role, role, ctx)
        except BaseExceptionGroup as group:
            first = next((e for e in _leaves(group) if isinstance(e, UpError)), None)
            if first is None:
                raise
            raise first from None
        if self.registry is None:  # embedded: Consul and Eureka were opened by connect_registry
            self.registry = PilotRegistry(self.pilot_url, credential=mesh_credential(self.state_dir))
        self._nursery.start_soon(self.registry_probe_loop)

    async def _start_control_role(self, role: Role, ctx: RoleContext) -> None:
        if role.pre_start is not None:
            role.pre_start(ctx)
        port = role.port(ctx.plan)
        p = ProcState(name=role.name, kind="control-plane", argv=role.argv(ctx), env=role.env(ctx),
                      cwd=str(self.state_dir), log=self.logs / f"{role.name}.log")
        self.roles[role.name] = p
        url = self.role_urls[role.name] = f"http://127.0.0.1:{port}"
        if role.announce:
            write_control(self.state_dir, **{role.name: url})
        await self.start_role(p, role.title, port, role.ready_path)
        self.event(role.ready_event(ctx, url))

    async def stop_control_plane(self) -> None:
        """The control roles, one after the other, in CONTROL_ROLES' order."""
        for role in CONTROL_ROLES:
            await self.stop_proc(self.roles.get(role.name))
            if role.clear_on_stop:
                write_control(self.state_dir, **{role.name: None})

    async def start_role(self, p: ProcState, what: str, port: int, path: str, timeout: float = ROLE_START_TIMEOUT) -> None:
        """Run a control-plane process under supervision and wait until GET ``path`` on
        ``port`` answers; UpError naming its log if it exits or stays silent."""
        assert self._nursery is not None
        p.ready_check = (port, path)
        await self._nursery.start(self.keep_running, p)
        with trio.move_on_after(timeout) as cs:
            while not await http_ok("127.0.0.1", port, path):
                if p.state == ProcPhase.FAILED or p.restarts:
                    break
                await trio.sleep(0.05)
        if cs.cancelled_caught or p.restarts or p.state == ProcPhase.FAILED:
            raise UpError(f"{what} did not start: see {p.log}:\n{tail(p.log)}")
        p.state = ProcPhase.READY

    # ------------------------------------------------------------ workloads

    def _new_instance(self, w: WorkloadPlan) -> InstanceState:
        node = workload_node(w, self.spec)
        node_file = self.state_dir / "nodes" / f"{w.name}.json"
        node_file.write_text(json.dumps(to_data(node), indent=1))
        app = None
        if w.command:
            env = {**os.environ, **w.env}
            app = ProcState(w.name, "app", list(w.command), env, w.cwd, self.logs / f"{w.name}.app.log")
        proxy = ProcState(
            w.name,
            "sidecar",
            proxy_argv("--pilot", self.pilot_url, "--node", str(node_file), "--admin-port", str(w.admin_port),
                         "--state-dir", str(self.state_dir), *self.sidecar_args(w.name)),
            {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")},
            str(self.state_dir),
            self.logs / f"{w.name}.proxy.log",
        )
        return InstanceState(w, app, proxy)

    def _instance(self, w: WorkloadPlan) -> Instance:
        return Instance(
            id=w.name,
            service=w.service,
            address=w.address,
            port=w.inbound_port,
            labels=w.labels,
            meta=FrozenDict({META_SERVICE_PORT: str(w.service_port), META_PROTOCOL: w.protocol, META_SIDECAR: "true",
                             META_SERVICE_ACCOUNT: w.service_account, **({META_LOCALITY: w.locality} if w.locality else {})}),
        )

    async def run_instance(self, inst: InstanceState) -> None:
        with inst.cancel:
            async with trio.open_nursery() as n:
                def lost() -> None:
                    inst.set_health(lifecycle.on_process_lost(inst.health()))

                if inst.app:
                    await n.start(self.keep_running, inst.app, lost)
                await n.start(self.keep_running, inst.proxy, lost)
                n.start_soon(self.health_loop, inst)
                n.start_soon(self.keepalive_loop, inst)

    async def health_loop(self, inst: InstanceState) -> None:
        w = inst.plan
        svc = next(s for s in self.spec.services if s.name == w.service)
        hc = svc.health_check or HealthCheck(tcp=True, interval=1.0)
        interval = float(hc.interval)
        thresholds = Thresholds(healthy=hc.healthy_threshold, unhealthy=hc.unhealthy_threshold)
        fast = True  # check often until the first success, so `up` is quick
        while not self.shutting_down and inst.state not in (InstancePhase.DRAINING, InstancePhase.STOPPED):
            ok_app = await (http_ok(w.app_host, w.app_port, hc.http, timeout=float(hc.timeout)) if hc.http
                            else tcp_ok(w.app_host, w.app_port, timeout=float(hc.timeout)))
            ok_proxy = ok_app and await http_ok("127.0.0.1", w.admin_port, "/ready", timeout=1.0)
            health, verdict = lifecycle.on_health(inst.health(), ok_app, ok_proxy, thresholds)
            inst.ok_streak, inst.fail_streak = health.ok_streak, health.fail_streak
            if isinstance(verdict, Register):
                await self._register(inst)  # registering again is harmless: same id, same data
            elif isinstance(verdict, Deregister):
                await self._deregister(inst)
                inst.state = verdict.phase
                self.event(f"{w.name} unhealthy ({verdict.failed} check failed {verdict.streak}x): taken out of the endpoints")
            pause, fast = lifecycle.next_check(fast, inst.registered, interval)
            await trio.sleep(pause)

    async def _register(self, inst: InstanceState) -> None:
        async with inst.lock:
            if self.shutting_down or inst.state in (InstancePhase.DRAINING, InstancePhase.STOPPED):
                return
            try:
                await self.registry.register(self._instance(inst.plan))
            except RegistryError as e:
                inst.state = InstancePhase.STARTING
                inst.proxy.last_event = f"registration failed: {e}"
                if self.state == MeshPhase.STARTING and not isinstance(self.registry, PilotRegistry) and getattr(self.registry, "reachable", False):
                    # The server answered and said no: waiting will not change its mind.
                    self._refused = f"the registry refused to register {inst.plan.name}: {e}"
                self.event(f"{inst.plan.name}: registration failed ({e}); retrying")
                return
            inst.registered = True
            self._undeleted.discard(inst.plan.name)
        was = inst.state
        inst.state = InstancePhase.READY
        for p in (inst.app, inst.proxy):
            if p:
                p.state = ProcPhase.RUNNING
        self.event(f"{inst.plan.name} {'ready' if was == InstancePhase.STARTING else 'healthy again'}")

    async def _deregister(self, inst: InstanceState, *, drain: bool = False) -> None:
        """Take the instance out of the registry; with ``drain``, mark it draining
        first (Consul maintenance, Eureka OUT_OF_SERVICE) so watchers see it leave."""
        async with inst.lock:
            inst.registered = False
            if drain:
                try:
                    await self.registry.set_draining(inst.plan.name)
                except RegistryError as e:
                    log.warning("draining %s failed: %s", inst.plan.name, e)
            try:
                await self.registry.deregister(inst.plan.name)
            except RegistryError as e:
                self._undeleted.add(inst.plan.name)
                log.warning("deregister %s failed: %s", inst.plan.name, e)

    async def stop_instance(self, inst: InstanceState) -> None:
        if inst.registered and not self.shutting_down and not isinstance(self.registry, PilotRegistry):
            # One instance leaves a running mesh: draining (Consul maintenance,
            # Eureka OUT_OF_SERVICE) until Pilot's watch has dropped it, its
            # sidecar still serving; then deregistered and stopped.
            inst.state = InstancePhase.DRAINING
            async with inst.lock:
                try:
                    await self.registry.set_draining(inst.plan.name)
                except RegistryError as e:
                    log.warning("draining %s failed: %s", inst.plan.name, e)
            with trio.move_on_after(DRAIN_WAIT):
                while not await self._unseen_by_pilot({inst.plan.name}):
                    await trio.sleep(0.1)
        if inst.registered:
            await self._deregister(inst, drain=inst.state != InstancePhase.DRAINING)
        inst.state = InstancePhase.STOPPED
        # Deregistered above; now the sidecar drains: on SIGTERM it serves
        # settings.drainDuration more while callers move away (Istio's
        # terminationDrainDuration); when the whole mesh stops nobody is left to
        # move, so SIGINT: it stops at once, finishing in-flight requests. The app goes after it.
        drain = float(self.spec.settings.drain_duration)
        await self.stop_proc(inst.proxy, signal.SIGINT if self.shutting_down else signal.SIGTERM,
                             STOP_GRACE + (0.0 if self.shutting_down else drain))
        await self.stop_proc(inst.app)
        inst.cancel.cancel()

    async def run_gateway(self, g: GatewayPlan) -> None:
        node = gateway_node(g, self.spec)
        node_file = self.state_dir / "nodes" / f"{g.name}.json"
        node_file.write_text(json.dumps(to_data(node), indent=1))
        p = ProcState(
            g.name, "gateway",
            proxy_argv("--pilot", self.pilot_url, "--node", str(node_file), "--admin-port", str(g.admin_port),
                         "--state-dir", str(self.state_dir), *self.sidecar_args(g.name)),
            dict(os.environ), str(self.state_dir), self.logs / f"{g.name}.gateway.log",
        )
        self.gateways[g.name] = p
        self.gateway_plans[g.name] = g
        scope = self._gateway_scopes[g.name] = trio.CancelScope()
        assert self._nursery is not None
        await self._nursery.start(self.keep_running, p)
        with scope:
            await self._watch_gateway(g, p)

    async def _deregister_gateway(self, g: GatewayPlan) -> None:
        if self.registry is None:
            return
        for inst in gateway_instances(g):
            try:
                await self.registry.deregister(inst.id)
            except RegistryError as e:
                log.warning("deregister %s failed: %s", inst.id, e)

    async def stop_gateway(self, name: str) -> None:
        self._gateway_scopes.pop(name).cancel()
        await self._deregister_gateway(self.gateway_plans[name])
        await self.stop_proc(self.gateways.pop(name))
        del self.gateway_plans[name]

    async def _watch_gateway(self, g: GatewayPlan, p: ProcState) -> None:
        """Readiness, and the gateway's registration as the service
        ``<name>.istio-system`` (as Istio's gateways are Kubernetes services there),
        one instance per mesh.yaml port: sidecars reach an egress gateway by it."""
        renewed: float | None = None  # when its registrations were last renewed; None: not registered
        while not self.shutting_down:
            ok = await http_ok("127.0.0.1", g.admin_port, "/ready", timeout=1.0)
            new = lifecycle.gateway_phase(ok, p.state)
            if new is not None:
                p.state = new
                self.event(f"gateway {g.name} {new}")
            if ok and lifecycle.renewal_due(renewed, time.monotonic(), self.keepalive_period()):
                try:
                    for inst in gateway_instances(g):
                        if renewed is None:
                            await self.registry.register(inst)
                        else:
                            await self.registry.keep_alive(inst.id)
                    renewed = time.monotonic()
                except RegistryError as e:
                    log.warning("gateway %s: registration failed: %s", g.name, e)
                    renewed = None
            await trio.sleep(0.05 if not ok else 1.0)

    # ------------------------------------------------------------ the whole mesh

    async def apply_plan(self, plan: Plan) -> None:
        """Start what is new, stop what is gone, restart what changed; leave the rest alone."""
        assert self._nursery is not None
        wanted = {w.name: w for w in plan.workloads}
        for name in list(self.instances):
            inst = self.instances[name]
            if name not in wanted or wanted[name] != inst.plan:
                self.event(f"{name}: {'removed' if name not in wanted else 'changed'}, stopping")
                await self.stop_instance(inst)
                del self.instances[name]
        for name, w in wanted.items():
            if name not in self.instances:
                inst = self._new_instance(w)
                self.instances[name] = inst
                self._nursery.start_soon(self.run_instance, inst)
        wanted_gw = {g.name: g for g in plan.gateways}
        for name in list(self.gateway_plans):
            if wanted_gw.get(name) != self.gateway_plans[name]:
                self.event(f"gateway {name}: {'removed' if name not in wanted_gw else 'changed'}, stopping")
                await self.stop_gateway(name)
        for g in plan.gateways:
            if g.name not in self.gateways:
                self._nursery.start_soon(self.run_gateway, g)
        self.plan = plan
        self.write_status()

    async def wait_ready(self) -> None:
        timeout = float(self.spec.settings.ready_timeout)
        deadline = trio.current_time() + timeout
        while True:
            if self._refused:
                raise UpError(self._refused)
            pending = [i.plan.name for i in self.instances.values() if i.state != InstancePhase.READY]
            pending += [f"gateway {n}" for n, p in self.gateways.items() if p.state != ProcPhase.READY]
            if self.plan:
                pending += [f"gateway {g.name}" for g in self.plan.gateways if g.name not in self.gateways]
            if not pending and not isinstance(self.registry, PilotRegistry):
                # Registered in Consul/Eureka is not yet routable: Pilot learns of it
                # by its watch (Eureka: the next delta poll, a few seconds later).
                unseen = await self._unseen_by_pilot({i.plan.name for i in self.instances.values()})
                pending += [f"{n} (registered; Pilot has not seen it in the registry yet)" for n in sorted(unseen)]
            if not pending:
                return
            if trio.current_time() > deadline:
                details = []
                for i in self.instances.values():
                    if i.state != InstancePhase.READY:
                        details.append(f"{i.plan.name} is {i.state}:")
                        for p in (i.app, i.proxy):
                            if p is None:
                                continue
                            details.append(f"  {p.kind}: {p.last_event if p.restarts else f'log {p.log}'}")
                            details += [f"    | {line}" for line in tail(p.log, 3).splitlines()]
                raise UpError(f"not ready after {timeout:.0f}s: {', '.join(pending)}\n" + "\n".join(details))
            await trio.sleep(0.05)

    async def _unseen_by_pilot(self, names: set[str]) -> set[str]:
        """Those of ``names`` missing from the endpoints Pilot routes with."""
        import httpx

        from ..loopback import plain_http_client

        try:
            async with plain_http_client(timeout=2.0, headers=bearer(mesh_credential(self.state_dir))) as client:
                data = (await client.get(f"{self.pilot_url}/v1/registry")).json()
            seen = {i.get("id") for instances in data.values() for i in instances}
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return names
        return names - seen

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bring the mesh up, report started, then supervise until a signal says stop."""
        (self.state_dir / "supervisor.pid").write_text(str(os.getpid()))
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        plan = self.make_plan()
                        self.preflight(plan)
                        self.write_status()
                        await self.connect_registry()
                        await self.start_control_plane(plan)
                        await self.apply_plan(plan)
                        await self.wait_ready()
                    except BaseException as e:
                        self.state = MeshPhase.FAILED
                        self.error = str(e) if isinstance(e, UpError) else f"{e.__class__.__name__}: {e}"
                        self.write_status()
                        await self.shutdown()
                        nursery.cancel_scope.cancel()
                        if isinstance(e, (UpError, trio.Cancelled, KeyboardInterrupt)):
                            raise
                        raise UpError(self.error) from e
                    self.state = MeshPhase.RUNNING
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
        """`up` again on a running mesh: re-read mesh.yaml and apply the difference."""
        try:
            spec = self._load_spec()
            if (spec.settings.registry or "embedded") != (self.spec.settings.registry or "embedded"):
                raise UpError(
                    f"the registry changed ({redact_url(self.spec.settings.registry)} → {redact_url(spec.settings.registry)}): "
                    "a running mesh keeps its registry; `meshctl down`, then `up` again"
                )
            self.spec = spec
            plan = self.make_plan()
            self.preflight(plan)
        except Exception as e:
            self.error = f"reload refused: {e}"
            self.event(self.error)
            return
        self.error = ""
        self.state = MeshPhase.UPDATING
        await self.apply_plan(plan)
        try:
            await self.wait_ready()
            self.state = MeshPhase.RUNNING
            self.event("mesh updated")
        except UpError as e:
            self.state = MeshPhase.RUNNING
            self.error = str(e)
            self.event(str(e))

    async def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.state = MeshPhase.STOPPING
        self.event("stopping the mesh")
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as n:
                for inst in list(self.instances.values()):
                    n.start_soon(self.stop_instance, inst)
                for p in self.gateways.values():
                    n.start_soon(self.stop_proc, p)
                for g in self.gateway_plans.values():
                    n.start_soon(self._deregister_gateway, g)
            await self.stop_control_plane()
            if self.registry is not None:
                try:
                    await self.registry.aclose()
                except Exception:
                    pass
            self.state = MeshPhase.STOPPED
            write_control(self.state_dir, pilot=None, supervisor_pid=None)
            self.event("mesh stopped")


# ------------------------------------------------------------------ small probes


async def tcp_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    with trio.move_on_after(timeout):
        try:
            s = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await s.aclose()
        return True
    return False


async def http_ok(host: str, port: int, path: str, timeout: float = 1.0) -> bool:
    """GET path answers 2xx or 3xx."""
    with trio.move_on_after(timeout):
        try:
            s = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        try:
            await s.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = await s.receive_some(1024)
                if not chunk:
                    break
                data += chunk
            parts = data.split(b" ", 2)
            return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
        except (trio.BrokenResourceError, OSError):
            return False
        finally:
            await s.aclose()
    return False


def redact_url(url: str) -> str:
    """A registry URL fit for status and logs: an ACL token in it is hidden."""
    from urllib.parse import urlsplit, urlunsplit

    text = url or "embedded"
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(("token=***" if q.startswith("token=") else q) for q in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def http_get_json(address: str, path: str, timeout: float = 2.0):
    """GET http://ADDRESS/PATH as JSON, blocking (for CLI commands); None on any failure."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _leaves(e: BaseException):
    """Every exception in e, looking inside exception groups."""
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from _leaves(sub)
    else:
        yield e


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
