"""Pilot: rules + registry → one ProxyConfig per proxy, served by long-poll.

HTTP API (JSON; debuggable with curl)::

    PUT  /v1/proxies/<name>            the proxy's Node (workload + listeners)
    GET  /v1/config/<name>?version=V&wait=30s
                                       200 + ProxyConfig when it differs from V,
                                       304 when nothing changed before `wait`,
                                       404 when Pilot does not know the proxy
    POST /v1/ack/<name>                {"version": V, "error": "..."}: a NACK; the ACK is
                                       implicit (the next long-poll names the version run)
    GET  /v1/status                    every proxy: versions sent / acked / nacked
    POST /v1/rules/reload              re-read the rule store now (the CLI pokes this)
    GET  /v1/registry                  the endpoints snapshot Pilot routes with
    PUT  /v1/registry/instances/<id>   register (embedded registry only) ...
    DELETE /v1/registry/instances/<id>, POST .../heartbeat, POST .../drain
    GET  /healthz                      200 once serving (no credential needed)

Every other call needs a credential (meshctl/credentials.py), as istiod gives
config only to a caller that proves the workload's identity: the mesh
credential (CLI, supervisor) may do anything; a proxy's credential may PUT
only its own node, read and ACK only its own config, and register, keep alive,
drain or delete only its own instance. No credential: 401; a credential that
may not: 403.

Endpoints in a namespace whose PeerAuthentication is STRICT must carry the
identity they claim: a sidecar endpoint registered by a proxy must name that
proxy's own service account, and an endpoint without sidecar metadata (which
callers would reach in plaintext) is refused unless the mesh credential
registers it as a foreign host (``"foreign": true``) or as one of the mesh's gateways
(``meshctl.io/gateway``: a Gateway's servers, not PeerAuthentication, decide their
TLS, as in Istio). An instance's namespace, for
the identity it claims and the PeerAuthentication that applies, is its
``meshctl.io/namespace`` metadata (`meshctl up` puts settings.namespace there), else
``default``: the namespace compile gives its endpoint's identity. A keep-alive for an
instance Pilot does not know (deleted, or lost with a restart) answers 404
"unknown-instance", and the supervisor registers it again.

The embedded registry lives in this process; Consul and Eureka are watched.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from .. import httpapi
from ..credentials import Caller, Forbidden, mesh_credential, private_dir, write_private
from ..httpapi import HTTPError, Request, Response
from ..loader.codec import from_data, to_data
from ..loader.proxyconfig import dump_proxy_config
from ..model.proxyconfig import ProxyConfig
from ..registry.base import Instance, Registry, Snapshot
from ..registry.embedded import EmbeddedRegistry
from ..model.proxyconfig import Workload
from ..registry.base import RegistryError
from .compile import (DEFAULT_NAMESPACE, META_GATEWAY, META_NAMESPACE, META_SERVICE_ACCOUNT, META_SIDECAR, Inputs, Node, compile_proxy, jwks_wanted,
                      mtls_mode_for)
from .jwks import JwksResolver
from .faults import FaultError, FaultStoreLike, InjectedFault, active_faults, next_expiry
from .kvstore import host_name, open_stores
from .store import Revision, RuleStoreLike, StoreError

log = logging.getLogger("meshctl.pilot")

MAX_WAIT = 300.0
FORGET_AFTER = 600.0  # seconds a service with no instance left is still routed (to 503)
META_FOREIGN = "meshctl.io/foreign"  # registered by the mesh credential as a host outside the mesh


def body_limit(method: str, path: str) -> int:
    """Small request bodies per endpoint (413 above): a node may list many gateway listeners."""
    if method == "PUT" and path.startswith("/v1/proxies/"):
        return 1024 * 1024
    if method in ("PUT", "POST"):
        return 64 * 1024
    return 0


def parse_wait(text: str | None, default: float = 30.0) -> float:
    """Consul's ``wait`` syntax: ``30s``, ``5m``, ``1500ms``; capped at 5 minutes."""
    if not text:
        return default
    try:
        if text.endswith("ms"):
            v = float(text[:-2]) / 1000
        elif text.endswith("s"):
            v = float(text[:-1])
        elif text.endswith("m"):
            v = float(text[:-1]) * 60
        else:
            v = float(text)
    except ValueError:
        raise HTTPError(400, f"bad wait {text!r}: use a duration like 30s") from None
    if not math.isfinite(v) or v < 0:
        raise HTTPError(400, f"bad wait {text!r}")
    return min(v, MAX_WAIT)


@dataclass(slots=True)
class ProxyState:
    node: Node
    sent: str = ""  # last version handed out
    acked: str = ""
    nacked: str = ""
    nack_error: str = ""
    last_seen: float = 0.0
    config: ProxyConfig | None = None
    generation: int = -1  # Pilot generation the cached config was compiled at
    # config version → the rules revision it was compiled from (the last few sent), for proxy-status
    revisions: dict[str, int] = field(default_factory=dict)

    def revision_of(self, version: str, current: str, revision: int) -> int | None:
        if not version:
            return None
        if version == current:
            return revision
        return self.revisions.get(version)

    def status(self, current: str) -> str:
        if self.nacked and self.nacked == current:
            return "NACKED"
        if self.acked == current:
            return "SYNCED"
        return "STALE"


@dataclass
class Pilot:
    state_dir: Path
    registry: Registry
    trust_domain: str = "cluster.local"
    # Files in the state directory, or Consul KV shared by every host (kvstore.py).
    store: RuleStoreLike = field(init=False)
    fault_store: FaultStoreLike = field(init=False)
    proxies: dict[str, ProxyState] = field(default_factory=dict)
    snapshot: Snapshot = field(default_factory=dict)
    revision: int = 0
    generation: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)
    # No config is served before the registry has been read once: a restarted
    # Pilot must not push "no endpoints" to every proxy.
    _first_snapshot: trio.Event = field(default_factory=trio.Event)
    _inputs: Inputs | None = None
    _last_seen: dict[str, tuple[Instance, ...]] = field(default_factory=dict)
    _vanished: dict[str, float] = field(default_factory=dict)
    # `meshctl inject-fault`: every stored fault, and the ids of those compiled in.
    _faults: list[InjectedFault] = field(default_factory=list)
    _fault_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.mesh_secret = mesh_credential(Path(self.state_dir))
        self.store, self.fault_store = open_stores(Path(self.state_dir))
        self._faults = self.fault_store.last_known()
        self._refresh_faults(time.time())
        self._expiry_changed = trio.Event()
        self._nodes_file = Path(self.state_dir) / "pilot" / "nodes.json"
        private_dir(self._nodes_file.parent)
        self._load_nodes()
        self.jwks = JwksResolver(self.state_dir, self._bump)  # jwksUri → keys, pushed in configs
        self._resources: list = []
        self._rules_stamp: tuple[int, float] = (-1, 0.0)
        self._set_rules(self.store.last_known())

    # ------------------------------------------------------------ state changes

    def _bump(self) -> None:
        self.generation += 1
        self._inputs = None
        self._notify()

    def _notify(self) -> None:
        """Wake every long-poll: each compares its proxy's config with what it has."""
        self._changed.set()
        self._changed = trio.Event()

    def _set_rules(self, rev: Revision) -> bool:
        # (number, time): a wiped Consul numbers revisions from 1 again
        if (rev.number, rev.time) == self._rules_stamp and self._inputs is not None:
            return False
        self._rules_stamp = (rev.number, rev.time)
        self.revision = rev.number
        self._resources = list(rev.resources)
        self.jwks.want(jwks_wanted(self._resources))
        self._bump()
        log.info("rules at revision %d (%d resources)", rev.number, len(rev.resources))
        return True

    async def _reload_rules(self) -> None:
        try:
            self._set_rules(await self.store.fetch())
        except StoreError as e:  # keep the rules in force; the watch retries
            log.warning("rules not reloaded: %s", e)

    def _set_faults(self, faults: list[InjectedFault]) -> None:
        self._faults = faults
        self._refresh_faults(time.time())
        self._expiry_changed.set()

    def _refresh_faults(self, now: float) -> bool:
        """Recompile if the set of faults in force changed (one added, cleared, expired)."""
        ids = tuple(f.id for f in active_faults(self._faults, now))
        if ids == self._fault_ids:
            return False
        self._fault_ids = ids
        self._bump()
        log.info("injected faults in force: %s", ", ".join(ids) or "none")
        return True

    def set_snapshot(self, snap: Snapshot) -> None:
        self._first_snapshot.set()
        merged = self._with_vanished(snap, time.monotonic())
        if merged != self.snapshot:
            self.snapshot = merged
            self._bump()

    def _with_vanished(self, snap: Snapshot, now: float) -> dict[str, tuple[Instance, ...]]:
        """A service whose last healthy instance went away is still a service: keep its
        last instances, marked unhealthy, so callers get 503 "no healthy upstream"
        (as with Istio) rather than 404 "no route". Forgotten after FORGET_AFTER."""
        merged = dict(snap)
        for svc, insts in snap.items():
            if insts:
                self._last_seen[svc] = insts
                self._vanished.pop(svc, None)
        for svc, insts in list(self._last_seen.items()):
            if merged.get(svc):
                continue
            since = self._vanished.setdefault(svc, now)
            if now - since > FORGET_AFTER:
                del self._last_seen[svc], self._vanished[svc]
                continue
            merged[svc] = tuple(replace(i, healthy=False) for i in insts)
        return merged

    def inputs(self) -> Inputs:
        if self._inputs is None:
            by_id = {f.id: f for f in self._faults}
            faults = tuple(by_id[i] for i in self._fault_ids if i in by_id)
            self._inputs = Inputs(self._resources, self.snapshot, trust_domain=self.trust_domain, faults=faults,
                                  jwks=dict(self.jwks.keys))
        return self._inputs

    def config_for(self, name: str) -> ProxyConfig:
        st = self.proxies[name]
        if st.config is None or st.generation != self.generation:
            st.config = compile_proxy(self.inputs(), st.node)
            st.generation = self.generation
        return st.config

    def _load_nodes(self) -> None:
        try:
            data = json.loads(self._nodes_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        for name, nd in data.items():
            try:
                self.proxies[name] = ProxyState(node=from_data(Node, nd))
            except Exception as e:  # an old or damaged entry: the proxy re-registers anyway
                log.warning("dropping stored node %s: %s", name, e)

    def _save_nodes(self) -> None:
        data = {n: to_data(st.node) for n, st in self.proxies.items()}
        write_private(self._nodes_file, json.dumps(data, indent=1))

    # ------------------------------------------------------------ background loops

    async def watch_rules(self) -> None:
        """Follow the store: the file store is polled once a second (the CLI pokes us too);
        Consul KV is watched with blocking queries, and its being away keeps the rules."""
        async for rev in self.store.watch():
            self._set_rules(rev)

    async def watch_faults(self) -> None:
        """Follow the stored faults; end each fault at its expiry (a wall-clock time stored with
        it, the same on every host) even when no CLI is running, and drop it from the store."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_faults)
            async for faults in self.fault_store.watch():
                self._set_faults(faults)

    async def _expire_faults(self) -> None:
        while True:
            now = time.time()
            nxt = next_expiry(self._faults, now)
            with trio.move_on_after(60.0 if nxt is None else max(0.0, nxt - now)):
                await self._expiry_changed.wait()
            self._expiry_changed = trio.Event()
            now = time.time()
            if tuple(f.id for f in active_faults(self._faults, now)) != self._fault_ids:
                # Drop the ended faults from the store first (a CLI reading it then agrees with the
                # proxies), but never hold the push back long: Consul may be away.
                with trio.move_on_after(1.0):
                    try:
                        await trio.to_thread.run_sync(self.fault_store.prune, now, abandon_on_cancel=True)
                    except (OSError, FaultError) as e:
                        log.warning("could not drop expired faults from %s: %s", self.fault_store.location, e)
                self._faults = [f for f in self._faults if f.active(now)]
                self._refresh_faults(now)

    async def publish_proxies(self, period: float = 1.0) -> None:
        """Put this host's proxies and what each ACKed where every host's `proxy-status` reads
        them (Consul KV; nothing for the file store)."""
        if not self.store.shared:
            return
        try:
            while True:
                await trio.sleep(period)
                try:
                    await trio.to_thread.run_sync(self.store.publish_proxies, self.report(), abandon_on_cancel=True)
                except (RegistryError, StoreError, OSError) as e:
                    log.debug("proxy status not published: %s", e)
        finally:  # a Pilot that stops takes its proxies out of every host's proxy-status
            with trio.move_on_after(2.0, shield=True):
                try:
                    await trio.to_thread.run_sync(self.store.withdraw_proxies, abandon_on_cancel=True)
                except (RegistryError, StoreError, OSError):
                    pass

    async def watch_registry(self) -> None:
        async for snap in self.registry.watch():
            self.set_snapshot(snap)

    # ------------------------------------------------------------ HTTP

    async def handle(self, req: Request) -> Response:
        if req.method == "GET" and req.path in ("/healthz", "/ready"):
            return Response.json({"ok": True})
        caller = httpapi.authenticate(req, self.mesh_secret)
        try:
            return await self._route(req, caller)
        except Forbidden as e:
            log.warning("refused %s %s to %s: %s", req.method, req.path, caller.describe(), e)
            raise HTTPError(403, f"{req.method} {req.path}: {e}") from None

    async def _route(self, req: Request, caller: Caller) -> Response:
        parts = [p for p in req.path.split("/") if p]
        if len(parts) < 2 or parts[0] != "v1":
            raise HTTPError(404, f"no such API: {req.method} {req.path}")
        route = (req.method, parts[1])
        if route == ("PUT", "proxies") and len(parts) == 3:
            caller.require_proxy(parts[2], "registering the node")
            return self._put_proxy(parts[2], req)
        if route == ("GET", "config") and len(parts) == 3:
            caller.require_proxy(parts[2], "reading the config")
            return await self._get_config(parts[2], req)
        if route == ("POST", "ack") and len(parts) == 3:
            caller.require_proxy(parts[2], "acknowledging the config")
            return self._ack(parts[2], req)
        if route == ("GET", "status"):
            caller.require_mesh("reading every proxy's status")
            return Response.json(self.status())
        if route == ("POST", "rules") and parts[2:] == ["reload"]:
            caller.require_mesh("reloading the rules")
            await self._reload_rules()
            return Response.json({"revision": self.revision, "generation": self.generation})
        if route == ("POST", "faults") and parts[2:] == ["reload"]:
            caller.require_mesh("reloading the injected faults")
            try:
                self._set_faults(await trio.to_thread.run_sync(self.fault_store.load, abandon_on_cancel=True))
            except FaultError as e:  # keep the faults we had; the CLI reports the same error
                log.warning("injected faults not reloaded: %s", e)
            return Response.json({"faults": list(self._fault_ids), "generation": self.generation})
        if parts[1] == "registry":
            return await self._registry_api(req, parts[2:], caller)
        raise HTTPError(404, f"no such API: {req.method} {req.path}")

    def _put_proxy(self, name: str, req: Request) -> Response:
        try:
            node = from_data(Node, req.json())
        except HTTPError:
            raise
        except Exception as e:
            raise HTTPError(400, f"bad node for proxy {name}: {e}") from None
        if node.workload.name != name:
            raise HTTPError(400, f"node for proxy {name} names workload {node.workload.name!r}")
        st = self.proxies.get(name)
        if st is None or st.node != node:
            self.proxies[name] = ProxyState(node=node, last_seen=time.time())
            self._save_nodes()
            self._notify()
            log.info("proxy %s registered (%s)", name, node.workload.service)
        return Response.json({"proxy": name, "version": self.config_for(name).version})

    async def _get_config(self, name: str, req: Request) -> Response:
        if name not in self.proxies:
            raise HTTPError(404, f"unknown proxy {name}: PUT /v1/proxies/{name} first")
        # ``version`` is what the proxy runs: asking with it is as good as an ACK
        # (a restarted Pilot learns this way what every proxy already has).
        have = req.query.get("version", "")
        wait = parse_wait(req.query.get("wait"))
        with trio.move_on_after(wait):
            await self._first_snapshot.wait()
        if not self._first_snapshot.is_set():
            raise HTTPError(503, f"registry {self.registry.url} not read yet: no config until its endpoints are known")
        with trio.move_on_after(wait):
            while True:
                st = self.proxies[name]
                st.last_seen = time.time()
                if have:
                    st.acked = have
                cfg = self.config_for(name)
                # A version the proxy rejected is not sent again until something changes.
                if cfg.version != have and cfg.version != st.nacked:
                    st.sent = cfg.version
                    st.revisions[cfg.version] = self.revision
                    while len(st.revisions) > 8:
                        del st.revisions[next(iter(st.revisions))]
                    return Response.json(dump_proxy_config(cfg), compact=True)
                await self._changed.wait()
        return Response(304, b"", [("x-meshctl-version", have)])

    def _ack(self, name: str, req: Request) -> Response:
        st = self.proxies.get(name)
        if st is None:
            raise HTTPError(404, f"unknown proxy {name}")
        body = req.json() or {}
        version = str(body.get("version", ""))
        if body.get("error"):
            st.nacked, st.nack_error = version, str(body["error"])
            log.warning("proxy %s rejected config %s: %s", name, version, st.nack_error)
        else:
            st.acked = version
            if st.nacked == version:
                st.nacked, st.nack_error = "", ""
        return Response.json({"ok": True})

    def status(self) -> dict[str, Any]:
        out = []
        for name in sorted(self.proxies):
            st = self.proxies[name]
            current = self.config_for(name).version
            out.append(
                {
                    "proxy": name,
                    "service": st.node.workload.service,
                    "status": st.status(current),
                    "current": current,
                    "sent": st.sent,
                    "acked": st.acked,
                    "nacked": st.nacked,
                    "error": st.nack_error,
                    "last_seen": st.last_seen,
                    "acked_revision": st.revision_of(st.acked, current, self.revision),
                }
            )
        return {"revision": self.revision, "host": host_name(), "rules": self.store.location, "proxies": out}

    def report(self) -> dict[str, Any]:
        """What this Pilot publishes for `proxy-status` on every host (publish_proxies)."""
        st = self.status()
        return {"host": st["host"], "revision": st["revision"],
                "proxies": [{k: p[k] for k in ("proxy", "service", "status", "current", "acked", "acked_revision",
                                               "error")} for p in st["proxies"]]}

    async def _registry_api(self, req: Request, rest: list[str], caller: Caller) -> Response:
        if req.method == "GET" and not rest:
            caller.require_mesh("reading the registry")
            return Response.json({s: [to_data(i) for i in insts] for s, insts in sorted(self.snapshot.items())})
        if len(rest) < 2 or rest[0] != "instances":
            raise HTTPError(404, f"no such API: {req.method} {req.path}")
        iid = rest[1]
        action = rest[2] if len(rest) > 2 else None
        caller.require_proxy(iid, "changing the registry instance")
        reg: Any = self.registry
        if req.method == "PUT" and action is None:
            body = req.json() or {}
            if not isinstance(body, dict):
                raise HTTPError(400, f"bad instance {iid}: the body must be a JSON object")
            try:
                inst = from_data(Instance, body.get("instance", body))
            except Exception as e:
                raise HTTPError(400, f"bad instance {iid}: {e}") from None
            if inst.id != iid:
                raise HTTPError(400, f"instance registered as {iid} has id {inst.id!r}")
            self._check_identity(inst, caller, foreign=body.get("foreign") is True)
            ttl = body.get("ttl")
            if ttl is not None and isinstance(reg, EmbeddedRegistry):
                await reg.register(inst, ttl=float(ttl))
            else:
                await reg.register(inst)
            return Response.json({"ok": True})
        if req.method == "DELETE" and action is None:
            await reg.deregister(iid)
            return Response.json({"ok": True})
        if req.method == "POST" and action == "heartbeat":
            try:
                await reg.keep_alive(iid)
            except RegistryError as e:  # deleted, expired or lost: the caller registers it again
                raise HTTPError(404, f"unknown instance {iid}: {e}; register it again", "unknown-instance") from None
            return Response.json({"ok": True})
        if req.method == "POST" and action == "drain":
            await reg.set_draining(iid)
            return Response.json({"ok": True})
        raise HTTPError(404, f"no such API: {req.method} {req.path}")

    def _check_identity(self, inst: Instance, caller: Caller, *, foreign: bool) -> None:
        """Under STRICT mTLS an endpoint must carry the identity it claims (module doc)."""
        # the namespace of its identity and policies: meshctl.io/namespace (settings.namespace, a
        # WorkloadEntry's), else default: where its registry service lives too (compile.discover_services);
        # the same namespace compile gives the endpoint's expected identity
        namespace = inst.meta.get(META_NAMESPACE) or DEFAULT_NAMESPACE
        sidecar = inst.meta.get(META_SIDECAR) == "true"
        claimed = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{inst.meta.get(META_SERVICE_ACCOUNT) or inst.service}"
        if not caller.is_mesh:
            if not sidecar:
                raise Forbidden(f"a proxy registers only its own sidecar endpoint: {inst.id} has no "
                                f"{META_SIDECAR} metadata")
            st = self.proxies.get(caller.proxy)
            own = st.node.workload.spiffe_id if st else None
            if own != claimed:
                raise Forbidden(f"instance {inst.id} claims identity {claimed}, but proxy {caller.proxy} is "
                                f"{own or 'not registered (PUT /v1/proxies first)'}")
        # a mesh.yaml gateway (meshctl.io/gateway, registered by the supervisor with the mesh
        # credential): as in Istio, PeerAuthentication does not apply to a gateway's servers
        gateway = inst.meta.get(META_GATEWAY) == "true"
        if sidecar or foreign or gateway:
            if (foreign or gateway) and not caller.is_mesh:
                raise Forbidden("only the mesh credential registers foreign hosts and gateways")
            return
        wl = Workload(name=inst.id, service=inst.service, namespace=namespace, labels=inst.labels)
        if mtls_mode_for(self.inputs(), wl, None) == "STRICT":
            raise Forbidden(
                f"namespace {namespace} requires mutual TLS (PeerAuthentication STRICT), and instance {inst.id} "
                f"has no sidecar ({META_SIDECAR}) to present its identity: callers would reach it in plaintext. "
                'Give it a sidecar, or register it with the mesh credential as a foreign host ("foreign": true)'
            )


async def run_pilot(pilot: Pilot, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pilot.watch_rules)
        nursery.start_soon(pilot.watch_registry)
        nursery.start_soon(pilot.watch_faults)
        nursery.start_soon(pilot.publish_proxies)
        nursery.start_soon(pilot.jwks.run)
        limits = httpapi.Limits(body_limit=body_limit)
        bound = await nursery.start(partial(httpapi.serve, pilot.handle, host, port, limits=limits))
        task_status.started(bound)
