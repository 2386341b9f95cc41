"""Consul as the registry, through its HTTP API (py-consul, called in threads).

Registering an instance puts it in the local agent's catalog:

* ``ID`` = instance id, ``Name`` = service, ``Address``/``Port``;
* ``Tags``: ``meshctl`` plus one ``key=value`` tag per label (``version=v2``),
  which keep labels exact whatever their key;
* ``Meta``: each label whose key Consul accepts as a meta key (letters,
  digits, ``-`` and ``_``), and ``meshctl-meta`` = the instance's ``meta`` as JSON;
* one check: a TTL check (``meshctl:<id>``) passed by :meth:`keep_alive`, or,
  with ``register(..., http_check_url=...)``, an HTTP check run by Consul.

Draining puts the service in Consul's maintenance mode, which fails it out of
``?passing`` queries. The client remembers what it registered: when the agent
has forgotten an instance (it restarted; a dev agent keeps nothing), the next
``keep_alive``/``set_draining`` registers it again, and so does the watch
loop when it sees the agent come back.

``watch()`` follows Consul's blocking queries: ``/v1/catalog/services``
for the set of services, and ``/v1/health/service/<name>?passing`` per
service, each with ``index``/``wait``. Services registered by anything else
appear too; their labels come from their Meta and ``key=value`` tags. The
agent being down never ends the watch: it keeps the last snapshot, sets
``reachable = False`` and ``last_error``, and retries with backoff.

After a failed query (the agent restarted, or its host was cut off from the
servers) the watch publishes nothing new until the agent's own node passes its
node checks again (``serfHealth``): until the cluster has seen the node rejoin,
Consul still answers with this node's services failed, and publishing that
would take the host's own healthy instances out of its routing. The last
snapshot stays in force meanwhile, at most ``SETTLE_MAX`` seconds. Then every
service is asked again (a query still waiting on a Raft leader that was lost may
hold an answer from before), and for one check TTL instances of the snapshot
from before the failure stay in what is published (``keep_held``): an agent
that restarted may report the checks it restored as critical until they pass
again (an HTTP check at its next poll, a TTL check at its owner's next
keep-alive), and an agent cut off from the servers answers with whatever its
side last knew.
New instances come at once; those really gone leave when that TTL is over.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

import consul
import requests
from consul.callback import CB
from consul.exceptions import ACLPermissionDenied, ConsulException
import trio

from ..model.base import FrozenDict
from .watch import Backoff, BackgroundWatcher, WatchedRegistry, make_snapshot
from .base import Instance, RegistryError, Snapshot

log = logging.getLogger("meshctl.registry.consul")

T = TypeVar("T")

MANAGED_TAG = "meshctl"
META_KEY = "meshctl-meta"
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Consul's own service, present in every catalog: not a mesh service.
_SKIP_SERVICES = frozenset({"consul"})
SETTLE_MAX = 30.0  # longest wait, once the agent answers again, for its node to pass its checks


@dataclass(slots=True)
class _Registration:
    instance: Instance
    ttl: float | None
    http_check_url: str | None
    http_check_interval: float
    draining: bool = False


class ConsulRegistry(WatchedRegistry):
    """A :class:`~meshctl.registry.base.Registry` backed by a Consul agent.

    ``ttl``: TTL of the check of instances registered without an HTTP check
    (callers keep it passing with ``keep_alive`` every ``keepalive_interval``
    seconds). ``wait``: how long one blocking query may be held by Consul.
    ``deregister_critical_after``: let Consul drop instances whose check has
    been failing this long (a Go duration such as ``"1m"``), or None.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        scheme: str = "http",
        token: str | None = None,
        url: str | None = None,
        ttl: float = 10.0,
        wait: float = 30.0,
        request_timeout: float = 5.0,
        deregister_critical_after: str | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if ttl <= 0 or wait <= 0:
            raise ValueError("ttl and wait must be positive")
        self.host, self.port, self.scheme = host, port, scheme
        self.url = url or (f"consul://{host}:{port}" if scheme == "http" else f"consul+https://{host}:{port}")
        self._token = token
        self.ttl = float(ttl)
        self.wait = float(wait)
        self.request_timeout = request_timeout
        self.deregister_critical_after = deregister_critical_after
        self._backoff_args = (backoff_initial, backoff_max)
        self._rng = rng or random.Random()
        self._local = threading.local()
        self._registered: dict[str, _Registration] = {}
        # Blocking queries hold a thread each: give them their own pool.
        self._watch_limiter = trio.CapacityLimiter(128)
        self._watcher = BackgroundWatcher(self.url, self._watch_loop)
        self._closed = False

    @property
    def agent_is_local(self) -> bool:
        """The agent is on this host (a loopback URL): it can run checks against this host's loopback ports."""
        return self.host in ("127.0.0.1", "localhost", "::1", "[::1]")

    # -- status for `meshctl status` ----------------------------------------------

    @property
    def keepalive_interval(self) -> float:
        return self.ttl / 3

    # -- the Registry protocol ----------------------------------------------------

    async def ping(self) -> None:
        """Raise RegistryError unless the agent answers and has a leader."""
        leader = await self._call("check the agent (GET /v1/status/leader)", lambda c: c.status.leader())
        if not leader:
            raise RegistryError(f"{self.url}: the agent answers but has no cluster leader yet")

    async def register(
        self,
        instance: Instance,
        *,
        ttl: float | None = None,
        http_check_url: str | None = None,
        http_check_interval: float = 5.0,
    ) -> None:
        """Register ``instance`` with the agent (replacing an older record).

        With ``http_check_url`` Consul itself polls that URL and keep_alive
        only re-registers if the agent lost the instance. The instance is
        remembered even if the agent cannot be reached now (RegistryError is
        raised): keep_alive retries the registration."""
        self._check_open()
        if not instance.id or not instance.service:
            raise RegistryError(f"{self.url}: an instance needs an id and a service name (got {instance!r})")
        reg = _Registration(
            instance=instance,
            ttl=float(ttl) if ttl else None,
            http_check_url=http_check_url,
            http_check_interval=http_check_interval,
        )
        self._registered[instance.id] = reg
        await self._register(reg)

    async def deregister(self, instance_id: str) -> None:
        self._check_open()
        self._registered.pop(instance_id, None)
        await self._call(
            f"deregister {instance_id!r}", lambda c: c.agent.service.deregister(instance_id)
        )

    async def keep_alive(self, instance_id: str) -> None:
        """Pass the instance's TTL check; register it again if the agent
        no longer knows it."""
        self._check_open()
        reg = self._registered.get(instance_id)
        if reg is None:
            raise RegistryError(f"{self.url}: keep_alive: {instance_id!r} was not registered through this client")
        if reg.http_check_url:
            known = await self._call(
                f"look up {instance_id!r}", lambda c: c.agent.service_definition(instance_id)
            )
            if not known and self._registered.get(instance_id) is reg:
                log.info("%s: agent lost %s; registering it again", self.url, instance_id)
                await self._register(reg)
            return
        passed = await self._call(
            f"pass the TTL check of {instance_id!r}", lambda c: c.agent.check.ttl_pass(_check_id(instance_id))
        )
        # 404: the agent does not know the check (restarted, or deregistered by someone).
        # Not when it was deregistered through us while this call was in flight.
        if not passed and self._registered.get(instance_id) is reg:
            log.info("%s: agent lost %s; registering it again", self.url, instance_id)
            await self._register(reg)

    async def set_draining(self, instance_id: str) -> None:
        """Put the instance in maintenance mode: it leaves ``?passing`` results."""
        self._check_open()
        reg = self._registered.get(instance_id)
        if reg is not None:
            reg.draining = True
        ok = await self._call(
            f"put {instance_id!r} in maintenance",
            lambda c: c.agent.service.maintenance(instance_id, "true", "meshctl: draining"),
        )
        if not ok:
            if reg is None:
                raise RegistryError(f"{self.url}: set_draining: the agent has no service with id {instance_id!r}")
            if self._registered.get(instance_id) is reg:  # not deregistered meanwhile (keep_alive)
                await self._register(reg)  # registers and re-applies maintenance

    def watch(self) -> AsyncIterator[Snapshot]:
        return self._watcher.snapshots()

    async def aclose(self) -> None:
        self._closed = True
        await self._watcher.aclose()

    # -- registration ---------------------------------------------------------------

    async def _register(self, reg: _Registration) -> None:
        inst = reg.instance
        payload = registration_payload(
            inst,
            ttl=reg.ttl or self.ttl,
            http_check_url=reg.http_check_url,
            http_check_interval=reg.http_check_interval,
            deregister_critical_after=self.deregister_critical_after,
        )

        def do(c: consul.Consul) -> bool:
            return c.http.put(
                CB.boolean(),
                "/v1/agent/service/register",
                params=[("replace-existing-checks", "true")],
                headers=c.prepare_headers(),
                data=json.dumps(payload),
            )

        await self._call(f"register {inst.id!r} (service {inst.service!r})", do)
        if reg.draining:
            await self._call(
                f"put {inst.id!r} in maintenance",
                lambda c: c.agent.service.maintenance(inst.id, "true", "meshctl: draining"),
            )
        if inst.id not in self._registered:
            # Deregistered while this registration was in flight (a keep-alive's or a
            # drain's re-registration): the deregistration may have reached the agent
            # first, and our registration brought the service back. Take it out again.
            await self._call(f"deregister {inst.id!r}", lambda c: c.agent.service.deregister(inst.id))

    async def _reregister_all(self) -> None:
        for reg in list(self._registered.values()):
            try:
                await self._register(reg)
            except RegistryError as exc:
                log.warning("%s", exc)

    # -- watching ---------------------------------------------------------------------

    async def _watch_loop(self, state) -> None:
        health: dict[str, tuple[Instance, ...]] = {}
        names: set[str] = set()
        scopes: dict[str, trio.CancelScope] = {}
        backoff = Backoff(*self._backoff_args, rng=self._rng)
        # After a failed query (settling), nothing new is published until this agent's node
        # passes its node checks; then, for one check TTL (held), instances of the last
        # snapshot before the failure stay in what is published, whatever Consul says.
        settling = False
        held: Snapshot | None = None
        generation = 0

        def publish() -> None:
            if names <= set(health) and not settling:
                snap = make_snapshot({n: health[n] for n in names})
                state.publish(keep_held(held, snap) if held is not None else snap)

        async def settle(gen: int) -> None:
            nonlocal settling, held
            answered: float | None = None
            while True:
                try:
                    passing = await self._call("check this agent's node (GET /v1/health/node/<node>)", _node_passing)
                except RegistryError:
                    await trio.sleep(0.5)
                    continue
                now = trio.current_time()
                answered = answered if answered is not None else now
                if passing:
                    break
                if now - answered > SETTLE_MAX:
                    log.warning("%s: this agent's node still fails its node checks after %gs; using its answers anyway",
                                self.url, SETTLE_MAX)
                    break
                await trio.sleep(0.2)
            if gen != generation:
                return
            rewatch()
            settling = False
            log.info("%s answers again; instances known before the failure stay routable for %gs more", self.url, self.ttl)
            publish()
            await trio.sleep(self.ttl)
            if gen == generation:
                held = None
                log.info("%s: routing on what Consul says alone again", self.url)
                publish()

        def rewatch() -> None:
            # Every service is asked again before anything is published: a query that did not
            # fail may still hang on a lost Raft leader, its last answer older than the failure.
            for name in names:
                scopes[name].cancel()
                health.pop(name, None)
                scopes[name] = trio.CancelScope()
                nursery.start_soon(watch_service, name, scopes[name])

        def unsettle(exc: RegistryError) -> None:
            nonlocal settling, held, generation
            if not settling:
                settling = True
                if held is None:
                    held = state.snapshot
                log.warning("%s; routing on the last snapshot until this agent's node passes its checks", exc)
                generation += 1
                nursery.start_soon(settle, generation)

        async def watch_service(name: str, scope: trio.CancelScope) -> None:
            index = 0
            svc_backoff = Backoff(*self._backoff_args, rng=self._rng)
            with scope:
                while True:
                    try:
                        new_index, entries = await self._call(
                            f"watch service {name!r} (GET /v1/health/service/{name}?passing)",
                            lambda c: c.health.service(name, index=index, wait=_go_duration(self.wait), passing=True),
                            blocking=True,
                        )
                    except RegistryError as exc:
                        state.fail(str(exc))
                        unsettle(exc)
                        index = 0
                        await trio.sleep(svc_backoff.next())
                        continue
                    svc_backoff.reset()
                    new_index = int(new_index or 0)
                    # An index that goes backwards means the agent's state was reset.
                    index = new_index if new_index > index else (0 if new_index < index else index)
                    health[name] = tuple(decode_health_entry(e) for e in entries or ())
                    publish()

        async with trio.open_nursery() as nursery:
            index = 0
            was_down = False
            while True:
                try:
                    new_index, services = await self._call(
                        "list services (GET /v1/catalog/services)",
                        lambda c: c.catalog.services(index=index, wait=_go_duration(self.wait)),
                        blocking=True,
                    )
                except RegistryError as exc:
                    state.fail(str(exc))
                    unsettle(exc)
                    was_down = True
                    index = 0
                    await trio.sleep(backoff.next())
                    continue
                backoff.reset()
                new_index = int(new_index or 0)
                reset = new_index < index
                if was_down or reset:
                    # The agent is back (maybe with an empty catalog): put our instances back.
                    was_down = False
                    if self._registered:
                        await self._reregister_all()
                        index = 0
                        continue
                index = 0 if reset else new_index
                current = {n for n in (services or {}) if n not in _SKIP_SERVICES}
                for gone in names - current:
                    scopes.pop(gone).cancel()
                    health.pop(gone, None)
                for new in sorted(current - names):
                    scopes[new] = trio.CancelScope()
                    nursery.start_soon(watch_service, new, scopes[new])
                names.clear()
                names.update(current)
                publish()

    # -- plumbing -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"{self.url}: registry client is closed")

    def _client(self) -> consul.Consul:
        client = getattr(self._local, "client", None)
        if client is None:
            client = consul.Consul(host=self.host, port=self.port, scheme=self.scheme)
            if self._token:  # else py-consul's default: CONSUL_HTTP_TOKEN, if set
                client.token = self._token
            client.http.connections_timeout = self.request_timeout
            self._local.client = client
        return client

    async def _call(self, what: str, fn: Callable[[consul.Consul], T], *, blocking: bool = False) -> T:
        """Run one py-consul call in a worker thread; turn its exceptions into
        RegistryError naming the agent, the operation and the cause."""

        def run() -> T:
            return fn(self._client())

        try:
            result = await trio.to_thread.run_sync(
                run, abandon_on_cancel=True, limiter=self._watch_limiter if blocking else None
            )
        except requests.exceptions.ConnectionError as exc:
            err = RegistryError(f"{self.url}: {what}: cannot connect ({_connect_reason(exc)}) — is the Consul agent running?")
            self._note_failure(err, blocking)
            raise err from exc
        except requests.exceptions.Timeout as exc:
            err = RegistryError(f"{self.url}: {what}: no answer within {self.request_timeout:g}s")
            self._note_failure(err, blocking)
            raise err from exc
        except ACLPermissionDenied as exc:
            raise RegistryError(
                f"{self.url}: {what}: permission denied by Consul ACLs — set CONSUL_HTTP_TOKEN or ?token= "
                f"to a token allowed to do this ({_short(exc)})"
            ) from exc
        except ConsulException as exc:
            raise RegistryError(f"{self.url}: {what}: Consul refused: {_short(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            err = RegistryError(f"{self.url}: {what}: {_short(exc)}")
            self._note_failure(err, blocking)
            raise err from exc
        self._watcher.state.ok()
        return result

    def _note_failure(self, err: RegistryError, blocking: bool) -> None:
        self._watcher.state.fail(str(err))


# -- encoding -------------------------------------------------------------------------


def keep_held(held: Snapshot, snap: Snapshot) -> Snapshot:
    """``snap`` plus the instances of ``held`` it lacks (same id, address and port), service by service.

    After Consul was unreachable, a restarted agent may report the checks it restored
    as critical until they pass again (within a keep-alive interval): for one TTL
    the instances known before stay routable rather than blink out."""
    out: dict[str, list[Instance]] = {n: list(insts) for n, insts in snap.items()}
    for name, insts in held.items():
        have = {(i.id, i.address, i.port) for i in out.get(name, ())}
        out.setdefault(name, []).extend(i for i in insts if (i.id, i.address, i.port) not in have)
    return make_snapshot(out)


def _node_passing(c: consul.Consul) -> bool:
    """Whether this agent's own node passes its node checks (serfHealth, maintenance)."""
    node = c.agent.self()["Config"]["NodeName"]
    _, checks = c.health.node(node)
    return all(ch.get("Status") == "passing" for ch in checks or () if not ch.get("ServiceID"))


def _check_id(instance_id: str) -> str:
    return f"meshctl:{instance_id}"


def _go_duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def registration_payload(
    inst: Instance,
    *,
    ttl: float,
    http_check_url: str | None = None,
    http_check_interval: float = 5.0,
    deregister_critical_after: str | None = None,
) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for ``inst``."""
    tags = [MANAGED_TAG] + [f"{k}={v}" for k, v in sorted(inst.labels.items())]
    meta = {k: v for k, v in sorted(inst.labels.items()) if _META_KEY_RE.match(k) and not k.startswith("consul-") and len(v) <= 512}
    if inst.meta:
        meta_json = json.dumps(dict(inst.meta), sort_keys=True, separators=(",", ":"))
        if len(meta_json) <= 512:
            meta[META_KEY] = meta_json
    if http_check_url:
        check: dict[str, Any] = {
            "CheckID": _check_id(inst.id),
            "Name": f"meshctl HTTP check of {inst.id}",
            "HTTP": http_check_url,
            "Interval": _go_duration(http_check_interval),
            "Timeout": _go_duration(min(http_check_interval, 5.0)),
            "Status": "passing",  # registered once ready: routable at once, not after a first poll
        }
    else:
        check = {
            "CheckID": _check_id(inst.id),
            "Name": f"meshctl keep-alive of {inst.id}",
            "TTL": _go_duration(ttl),
            "Status": "passing",
        }
    if deregister_critical_after:
        check["DeregisterCriticalServiceAfter"] = deregister_critical_after
    return {
        "ID": inst.id,
        "Name": inst.service,
        "Tags": tags,
        "Meta": meta,
        "Address": inst.address,
        "Port": inst.port,
        "Checks": [check],
    }


def decode_health_entry(entry: dict[str, Any]) -> Instance:
    """One element of ``/v1/health/service/<name>`` → an Instance.

    Labels come from Meta (except meshctl's own keys) overlaid with
    ``key=value`` tags; the address falls back to the node's."""
    svc = entry.get("Service") or {}
    node = entry.get("Node") or {}
    raw_meta = svc.get("Meta") or {}
    labels = {k: str(v) for k, v in raw_meta.items() if k != META_KEY}
    for tag in svc.get("Tags") or ():
        key, eq, value = tag.partition("=")
        if eq and key:
            labels[key] = value
    meta: dict[str, str] = {}
    if META_KEY in raw_meta:
        try:
            meta = {str(k): str(v) for k, v in json.loads(raw_meta[META_KEY]).items()}
        except (ValueError, AttributeError):
            meta = {}
    if node.get("Node"):
        meta.setdefault("meshctl.io/consul-node", str(node["Node"]))
    return Instance(
        id=str(svc.get("ID") or svc.get("Service")),
        service=str(svc.get("Service")),
        address=str(svc.get("Address") or node.get("Address") or ""),
        port=int(svc.get("Port") or 0),
        labels=FrozenDict(labels),
        meta=FrozenDict(meta),
    )


def _connect_reason(exc: Exception) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text:
        return "host name not found"
    if "timed out" in text.lower():
        return "connect timed out"
    return _short(exc)


def _short(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
