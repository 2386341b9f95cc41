"""The mesh's registrations: each ready workload instance and gateway in the registry.

With Consul or Eureka (``settings.registry`` or ``up --registry``) the registry
is pinged before anything starts, and `up` fails naming it when it does not
answer; the embedded registry lives in Pilot and is reached through it once
Pilot runs. Registrations are renewed at the registry's own cadence (a third of
Consul's TTL, Eureka's renewal interval), whatever the health check interval; a
probe task keeps `status` honest about the registry's reachability and, when it
comes back, renews (re-registers) every instance at once and retries the
deregistrations that failed while it was away.

Consul's check. With the agent on this host (a loopback registry URL, the setup
docs/multi-host.md describes) each instance's check is an HTTP check the agent runs
itself against its sidecar's (or gateway's) admin ``/ready``, every keep-alive period;
with a remote agent, which cannot reach that loopback port, it is a TTL check the
keep-alives pass. The HTTP check keeps healthy instances healthy when the agent's own
API stalls: while a Raft leader cut off from the other hosts is replaced, the agents
there answer a TTL pass only once their sync with the lost leader gives up (about 40 s
measured), TTLs of live instances expired meanwhile, and those instances left every
host's routing with the host that was really cut off (tests/multihost).

Instance ids. In the embedded registry (one host) an instance is registered under
its workload name, ``ratings-v1-0``. Consul and Eureka are shared by every host of
a mesh, and each host's mesh.yaml numbers its instances from 0, so two hosts that
both run ratings both have a ``ratings-v1-0``: registered under that id, the second
registration replaced the first wherever the id is the key (one Consul agent serving
both, as on a laptop with two meshes; Eureka always, its instanceId being unique per
app), one host's keep-alives kept the other's entry alive, and one host's `down`
deregistered the other's running instance; with one agent per host Consul kept both,
but `up` and a drain asked Pilot for the id and found the other host's instance.
So in a shared registry the id names the host too, as Consul's own conventions do
(Registrator's ``host:name:port``, Eureka's default ``host:app:port``): the workload
name, ``@``, and the address and port it is registered at, ``ratings-v1-0@10.0.0.12:15006``,
unique as long as two sidecars cannot listen on one address and port
(registry_instance_id). The workload keeps its name everywhere else (status, logs,
`proxy run --workload`, telemetry's workload label, which is the deployment in Istio,
``ratings-v1``, and so the same on every host).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping

import trio

from ..credentials import bearer, mesh_credential
from ..model.base import FrozenDict
from ..pilot.compile import (
    DEFAULT_NAMESPACE, META_GATEWAY, META_LOCALITY, META_NAMESPACE, META_PROTOCOL, META_SERVICE_ACCOUNT, META_SERVICE_PORT, META_SIDECAR,
)
from ..registry import Backoff, open_registry, parse_registry_url
from ..registry.base import Instance, Registry, RegistryError
from ..registry.consul import ConsulRegistry
from . import lifecycle
from .control import ControlPlane
from .errors import UpError
from .lifecycle import InstancePhase, MeshPhase, ProcPhase
from .pilotreg import PilotRegistry
from .plan import GatewayPlan, WorkloadPlan, advertised, gateway_registered_address
from .probes import redact_url
from .records import InstanceState, MeshContext

log = logging.getLogger("meshctl.up")

REGISTRY_PING_TIMEOUT = 15.0  # `up` gives up on an unresponsive registry after this long
REGISTRY_PROBE_INTERVAL = 2.0  # how stale `status` may be about the registry's reachability
REGISTRY_PROBE_TIMEOUT = 5.0
DRAIN_WAIT = 10.0  # longest wait for Pilot to drop a removed instance before its sidecar stops
# Longest wait, before a restarted sidecar is stopped, for the other proxies to run a config
# without it (wait_callers_synced); past it the sidecar stops anyway, the laggards named in a warning.
CALLERS_SYNC_WAIT = 5.0
# A STALE proxy Pilot has not seen for this long is gone (or cut off from Pilot): not waited for
# (wait_callers_synced). A live one is seen between being handed a config and asking again with
# it: its apply, or a reconnect whose backoff is at most 2 s (proxy/pilot_client.py).
CALLER_GONE_AFTER = 3.0


def _namespace_meta(namespace: str) -> dict[str, str]:
    """settings.namespace other than ``default``: the namespace of the instance's identity
    (spiffe://<td>/ns/<namespace>/sa/...) and of the policies that apply to it, for Pilot's
    endpoints and its STRICT registration check alike, and of its service: <svc>.<namespace>.svc.cluster.local
    (compile.discover_services)."""
    return {META_NAMESPACE: namespace} if namespace and namespace != DEFAULT_NAMESPACE else {}


def registry_instance_id(name: str, address: str, port: int) -> str:
    """An instance's id in a registry every host shares (module doc): ``name@address:port``."""
    host = f"[{address}]" if ":" in address else address
    return f"{name}@{host}:{port}"


def workload_instance(w: WorkloadPlan, shared: bool = False) -> Instance:
    """A workload instance in the registry: its sidecar's inbound listener; in a ``shared``
    registry (Consul, Eureka) under an id that names the host (module doc)."""
    return Instance(
        id=registry_instance_id(w.name, w.address, w.inbound_port) if shared else w.name,
        service=w.service,
        address=w.address,
        port=w.inbound_port,
        labels=w.labels,
        meta=FrozenDict({META_SERVICE_PORT: str(w.service_port), META_PROTOCOL: w.protocol, META_SIDECAR: "true",
                         META_SERVICE_ACCOUNT: w.service_account, **({META_LOCALITY: w.locality} if w.locality else {}),
                         **_namespace_meta(w.namespace)}),
    )


def gateway_instances(g: GatewayPlan, advertise: str = "127.0.0.1", shared: bool = False) -> list[Instance]:
    """A gateway in the registry: service ``<name>.istio-system``, one instance per
    mesh.yaml port (the Gateway port as its service port, the host port to reach),
    in the host's locality as the workload instances are, at the address it listens
    on (the host's advertised one when it listens on all); in a ``shared`` registry
    under an id that names the host, as workload instances (module doc)."""
    address = gateway_registered_address(g, advertise)
    return [
        Instance(id=registry_instance_id(f"{g.name}-{gport}", address, hport) if shared else f"{g.name}-{gport}",
                 service=f"{g.name}.istio-system", address=address, port=hport,
                 labels=g.labels, meta=FrozenDict({META_SERVICE_PORT: str(gport), META_PROTOCOL: "http", META_GATEWAY: "true",
                                                   **({META_LOCALITY: g.locality} if g.locality else {}),
                                                   **_namespace_meta(g.namespace)}))
        for gport, hport in sorted(g.ports.items())
    ]


class Registrations:
    def __init__(self, ctx: MeshContext, control: ControlPlane, consul_token: str | None,
                 registry: Registry | None = None) -> None:
        self.ctx = ctx
        self.control = control  # Pilot: the embedded registry, and whom `unseen_by_pilot` asks
        self.consul_token = consul_token
        self.registry: Registry | None = registry  # Consul or Eureka (connect), else Pilot's embedded one
        self.down = False
        self.error = ""  # why the last probe failed
        self.refused = ""  # a registry that answers but refuses a registration at `up` (an ACL, say)
        self.undeleted: set[str] = set()  # deregistrations that failed while the registry was away

    @property
    def embedded(self) -> bool:
        return isinstance(self.registry, PilotRegistry)

    def instance_id(self, w: WorkloadPlan) -> str:
        """The id ``w`` is registered under (module doc)."""
        return w.name if self.embedded else registry_instance_id(w.name, w.address, w.inbound_port)

    def _reg(self) -> Registry:
        assert self.registry is not None, "no registry yet: connect() and use_embedded() come first"
        return self.registry

    async def _register(self, inst: Instance, admin_port: int) -> None:
        """Register ``inst``; with a Consul agent on this host, under an HTTP check of ``admin_port``'s /ready (module doc)."""
        reg = self._reg()
        if isinstance(reg, ConsulRegistry) and reg.agent_is_local:
            await reg.register(inst, http_check_url=f"http://127.0.0.1:{admin_port}/ready",
                               http_check_interval=self.keepalive_period())
        else:
            await reg.register(inst)

    def status(self) -> dict[str, Any]:
        reg = self.registry
        return {
            "url": redact_url(self.ctx.spec.settings.registry),
            "reachable": bool(getattr(reg, "reachable", True)) and not self.down if reg else False,
            "error": (self.error or getattr(reg, "last_error", "") or "") if reg else "",
        }

    async def connect(self) -> None:
        """Open Consul or Eureka and check that it answers, before anything starts.

        The embedded registry lives in Pilot: it is reached once Pilot runs (use_embedded)."""
        url = (self.ctx.spec.settings.registry or "embedded").strip()
        try:
            if parse_registry_url(url)["kind"] == "embedded":
                return
            reg = open_registry(url, self.ctx.state_dir, token=self.consul_token)
        except RegistryError as e:
            raise UpError(str(e)) from None
        ping = getattr(reg, "ping")
        try:
            with trio.fail_after(REGISTRY_PING_TIMEOUT):
                await ping()
        except RegistryError as e:
            await reg.aclose()
            raise UpError(f"the registry does not answer, nothing was started: {e}") from None
        except trio.TooSlowError:
            await reg.aclose()
            raise UpError(f"the registry {redact_url(url)} did not answer within {REGISTRY_PING_TIMEOUT:g}s; nothing was started") from None
        self.registry = reg
        self.ctx.event(f"registry {redact_url(url)} answers")

    def use_embedded(self) -> None:
        """Once Pilot runs: its embedded registry, unless Consul or Eureka was connected."""
        if self.registry is None:
            self.registry = PilotRegistry(self.control.pilot_url, credential=mesh_credential(self.ctx.state_dir))

    async def aclose(self) -> None:
        if self.registry is not None:
            try:
                await self.registry.aclose()
            except Exception:
                pass

    def keepalive_period(self) -> float:
        """How often registrations are renewed: the registry's own cadence
        (Consul: a third of the check's TTL; Eureka: the lease renewal interval)."""
        return lifecycle.keepalive_period(getattr(self.registry, "keepalive_interval", None),
                                          getattr(self.registry, "ttl", None))

    # ------------------------------------------------------------ workload instances

    async def keepalive_loop(self, inst: InstanceState) -> None:
        period = self.keepalive_period()
        while not self.ctx.shutting_down:
            await trio.sleep(period)
            await self.renew(inst)

    async def renew(self, inst: InstanceState) -> None:
        async with inst.lock:
            if not inst.registered or self.ctx.shutting_down:
                return
            try:
                await self._reg().keep_alive(self.instance_id(inst.plan))
            except RegistryError as e:
                log.warning("keep-alive of %s failed: %s", inst.plan.name, e)

    async def register(self, inst: InstanceState) -> None:
        async with inst.lock:
            if self.ctx.shutting_down or inst.state in (InstancePhase.DRAINING, InstancePhase.STOPPED):
                return
            try:
                await self._register(workload_instance(inst.plan, shared=not self.embedded), inst.plan.admin_port)
            except RegistryError as e:
                inst.state = InstancePhase.STARTING
                inst.proxy.last_event = f"registration failed: {e}"
                if self.ctx.phase == MeshPhase.STARTING and not self.embedded and getattr(self.registry, "reachable", False):
                    # The server answered and said no: waiting will not change its mind.
                    self.refused = f"the registry refused to register {inst.plan.name}: {e}"
                self.ctx.event(f"{inst.plan.name}: registration failed ({e}); retrying")
                return
            inst.registered = True
            self.undeleted.discard(self.instance_id(inst.plan))
        was = inst.state
        inst.state = InstancePhase.READY
        for p in (inst.app, inst.proxy):
            if p:
                p.state = ProcPhase.RUNNING
        self.ctx.event(f"{inst.plan.name} {'ready' if was == InstancePhase.STARTING else 'healthy again'}")

    async def deregister(self, inst: InstanceState, *, drain: bool = False) -> None:
        """Take the instance out of the registry; with ``drain``, mark it draining
        first (Consul maintenance, Eureka OUT_OF_SERVICE) so watchers see it leave."""
        async with inst.lock:
            inst.registered = False
            if drain:
                try:
                    await self._reg().set_draining(self.instance_id(inst.plan))
                except RegistryError as e:
                    log.warning("draining %s failed: %s", inst.plan.name, e)
            try:
                await self._reg().deregister(self.instance_id(inst.plan))
            except RegistryError as e:
                self.undeleted.add(self.instance_id(inst.plan))
                log.warning("deregister %s failed: %s", inst.plan.name, e)

    async def drain(self, inst: InstanceState) -> None:
        """One instance leaves a running mesh: draining (Consul maintenance, Eureka
        OUT_OF_SERVICE) until Pilot's watch has dropped it, its sidecar still serving.
        The embedded registry is Pilot's own: deregistering is enough there."""
        if not inst.registered or self.ctx.shutting_down or self.embedded:
            return
        inst.state = InstancePhase.DRAINING
        async with inst.lock:
            try:
                await self._reg().set_draining(self.instance_id(inst.plan))
            except RegistryError as e:
                log.warning("draining %s failed: %s", inst.plan.name, e)
        with trio.move_on_after(DRAIN_WAIT):
            while not await self.unseen_by_pilot([inst.plan]):
                await trio.sleep(0.1)

    async def wait_seen_by_pilot(self, plans: Iterable[WorkloadPlan]) -> None:
        """Until Pilot routes to every one of ``plans`` (at most DRAIN_WAIT): instances
        back in the registry, before others of their service leave it."""
        plans = list(plans)
        if not plans or self.embedded:
            return  # the embedded registry is Pilot's own: registered is seen
        with trio.move_on_after(DRAIN_WAIT):
            while await self.unseen_by_pilot(plans):
                await trio.sleep(0.1)

    async def wait_callers_synced(self, leaving: WorkloadPlan, exclude: Iterable[str]) -> None:
        """Until every proxy Pilot serves but ``exclude`` runs a config without ``leaving``
        (at most CALLERS_SYNC_WAIT): the last step before its sidecar is stopped at once.

        Pilot dropping an instance is not its callers dropping it: they long-poll, and
        each applies the new config some milliseconds later (a gateway once 13 ms after the
        sidecars had stopped: a try and its retries on stopped sidecars, 503 UF). So first
        Pilot no longer routes to ``leaving`` (the embedded registry tells Pilot's watch
        a moment after the deregistration answers; Consul's and Eureka's drain may have
        given up), then every proxy's status is SYNCED: it ACKed (asked again with) the
        config Pilot would hand it now, compiled from endpoints without ``leaving``.

        Not waited for: ``exclude`` (the sidecars stopped with this one, its own among
        them: they do not call anyone meanwhile), a NACKED proxy (it keeps the config it
        runs until something changes), and a STALE proxy Pilot has not seen for
        CALLER_GONE_AFTER. Pilot sees a proxy when its long poll comes in and each time
        the poll is woken by a change; the deregistration woke every open one, so a
        live proxy still STALE was seen since it was handed its config; one that
        stopped keeps its entry (and its last ``last_seen``) in Pilot for good: its long
        poll ended with its connection (httpapi cancels a handler whose client closed),
        so nothing wakes it. A proxy that stopped less than CALLER_GONE_AFTER ago may
        hold the wait until then.

        Proxies of other hosts (their own Pilots) are not asked: a shared registry's
        other hosts drop the instance when their Pilot does, as before."""
        if self.ctx.shutting_down:
            return
        exclude = {*exclude, leaving.name}
        stale: list[str] = []
        why = "Pilot still routes to it"
        import httpx

        from ..loopback import plain_http_client

        with trio.move_on_after(CALLERS_SYNC_WAIT) as bound:
            while await self.unseen_by_pilot([leaving]) != {leaving.name}:
                await trio.sleep(0.05)
            why = "Pilot does not answer"
            async with plain_http_client(timeout=2.0, headers=bearer(mesh_credential(self.ctx.state_dir))) as client:
                while True:
                    try:
                        proxies = (await client.get(f"{self.control.pilot_url}/v1/status")).json()["proxies"]
                        now = time.time()
                        stale = sorted(p["proxy"] for p in proxies if p["proxy"] not in exclude and p["status"] == "STALE"
                                       and now - float(p.get("last_seen") or 0.0) < CALLER_GONE_AFTER)
                    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                        why = f"Pilot does not answer ({e.__class__.__name__}: {e})"
                    else:
                        if not stale:
                            return
                        why = "STALE: " + ", ".join(stale)
                    await trio.sleep(0.05)
        if bound.cancelled_caught:
            log.warning("%s: stopping its sidecar although not every other proxy is known to run a config without it "
                        "after %gs (%s)", leaving.name, CALLERS_SYNC_WAIT, why)

    async def unseen_by_pilot(self, plans: Iterable[WorkloadPlan]) -> set[str]:
        """The names of those of ``plans`` Pilot does not route to: their registrations
        missing from its endpoints, unhealthy or draining (by registry id: another host's
        instance of the same name is not this one)."""
        ids = {self.instance_id(w): w.name for w in plans}
        names = set(ids.values())
        import httpx

        from ..loopback import plain_http_client

        try:
            async with plain_http_client(timeout=2.0, headers=bearer(mesh_credential(self.ctx.state_dir))) as client:
                data = (await client.get(f"{self.control.pilot_url}/v1/registry")).json()
            # routed to: healthy and not draining (Pilot keeps a service's last instances as
            # unhealthy, and Eureka's OUT_OF_SERVICE ones as draining: neither gets requests)
            seen = {i.get("id") for instances in data.values() for i in instances
                    if i.get("healthy", True) and not i.get("draining", False)}
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return names
        return {name for iid, name in ids.items() if iid not in seen}

    async def probe_loop(self, instances: Mapping[str, InstanceState]) -> None:
        """Ping Consul/Eureka every few seconds so `status` says when it is away;
        when it is back, renew every registration at once (a registry that lost
        them gets them again) and retry the deregistrations that failed."""
        reg = self.registry
        ping = getattr(reg, "ping", None)
        if reg is None or ping is None:
            return
        url = redact_url(self.ctx.spec.settings.registry)
        backoff = Backoff(initial=0.5, maximum=2.0)  # a refused connect is cheap: notice the return soon
        while not self.ctx.shutting_down:
            ok, why = False, f"{url}: no answer to a ping within {REGISTRY_PROBE_TIMEOUT:g}s"
            with trio.move_on_after(REGISTRY_PROBE_TIMEOUT):
                try:
                    await ping()
                    ok = True
                except RegistryError as e:
                    why = str(e)
            self.error = "" if ok else why
            if not ok and not self.down:
                self.down = True
                self.ctx.event(f"registry {url} unreachable ({why}); proxies keep the endpoints they know; retrying")
            elif ok and self.down:
                self.down = False
                self.ctx.event(f"registry {url} reachable again: renewing registrations")
                by_id = {self.instance_id(i.plan): i for i in instances.values()}
                for name in sorted(self.undeleted):
                    if name in by_id and by_id[name].registered:
                        self.undeleted.discard(name)
                        continue
                    try:
                        await reg.deregister(name)
                        self.undeleted.discard(name)
                    except RegistryError as e:
                        log.warning("deregister %s failed again: %s", name, e)
                for inst in list(instances.values()):
                    await self.renew(inst)
                self.ctx.changed()
            if ok:
                backoff.reset()
                await trio.sleep(REGISTRY_PROBE_INTERVAL)
            else:
                await trio.sleep(backoff.next())

    # ------------------------------------------------------------ gateways

    async def register_gateway(self, g: GatewayPlan, renewed: float | None) -> float | None:
        """Register the gateway's instances (``renewed`` None) or renew them; returns
        when they were renewed now, None when that failed (register again next time)."""
        try:
            for inst in gateway_instances(g, advertised(self.ctx.spec), shared=not self.embedded):
                if renewed is None:
                    await self._register(inst, g.admin_port)
                else:
                    await self._reg().keep_alive(inst.id)
        except RegistryError as e:
            log.warning("gateway %s: registration failed: %s", g.name, e)
            return None
        return trio.current_time()

    async def deregister_gateway(self, g: GatewayPlan) -> None:
        if self.registry is None:
            return
        for inst in gateway_instances(g, advertised(self.ctx.spec), shared=not self.embedded):
            try:
                await self.registry.deregister(inst.id)
            except RegistryError as e:
                log.warning("deregister %s failed: %s", inst.id, e)
