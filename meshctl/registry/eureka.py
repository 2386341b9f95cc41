"""Eureka as the registry, through its REST API (v2 paths, JSON) over httpx.

* register: ``POST {base}/apps/{APP}`` with the instance document (app =
  service upper-cased, vipAddress = service, port, status UP, MyOwn data
  center, leaseInfo, and labels in ``metadata``);
* keep_alive: ``PUT {base}/apps/{APP}/{id}`` (a lease renewal); a 404 means
  the server lost the instance (restart or eviction) and it is registered again;
* set_draining: ``PUT .../status?value=OUT_OF_SERVICE`` (a status override, which
  Eureka keeps across registrations of an instance it still has: a registration
  that is not draining sets UP and clears it, ``PUT`` then ``DELETE .../status?value=UP``);
* deregister: ``DELETE {base}/apps/{APP}/{id}`` (which also drops the override); a
  re-registration (keep_alive, set_draining) in flight when the instance is
  deregistered takes it out again once its POST is done.
* watch: ``GET {base}/apps`` once, then ``GET {base}/apps/delta`` every
  ``poll_interval`` seconds, applying ADDED/MODIFIED/DELETED; when the
  local copy's reconcile hash code differs from the server's, fetch in full.

Services are named by ``vipAddress`` lower-cased, so instances registered by
Spring Cloud or any other Eureka client appear too; their labels are their
metadata. Only instances with status UP are in snapshots. The server being
down never ends a watch: the last snapshot stays, ``reachable`` turns False
with ``last_error`` set, and fetching resumes (in full) with backoff.
"""

from __future__ import annotations

import json
import logging
import random
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
import trio

from ..model.base import FrozenDict
from .watch import Backoff, BackgroundWatcher, WatchedRegistry, make_snapshot
from .base import Instance, RegistryError, Snapshot

log = logging.getLogger("meshctl.registry.eureka")

LABELS_KEY = "meshctl-labels"
META_KEY = "meshctl-meta"
_JSON = {"Accept": "application/json"}


@dataclass(slots=True)
class _Registration:
    instance: Instance
    draining: bool = False


class EurekaRegistry(WatchedRegistry):
    """A :class:`~meshctl.registry.base.Registry` backed by a Eureka server.

    ``base_url``: the server's REST root, e.g. ``http://127.0.0.1:8761/eureka``.
    ``renewal_interval`` / ``lease_duration``: the lease we ask for (Eureka
    evicts an instance whose lease was not renewed for ``lease_duration``);
    callers run keep_alive every ``keepalive_interval`` (= renewal_interval).
    ``poll_interval``: how often a watch fetches the delta.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8761/eureka",
        *,
        url: str | None = None,
        renewal_interval: float = 10.0,
        lease_duration: float = 30.0,
        poll_interval: float = 5.0,
        request_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if renewal_interval <= 0 or lease_duration <= 0 or poll_interval <= 0:
            raise ValueError("renewal_interval, lease_duration and poll_interval must be positive")
        self.base_url = base_url.rstrip("/")
        self.url = url or self.base_url
        self.renewal_interval = renewal_interval
        self.lease_duration = lease_duration
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._backoff_args = (backoff_initial, backoff_max)
        self._rng = rng or random.Random()
        self._registered: dict[str, _Registration] = {}
        self._client: httpx.AsyncClient | None = None
        self._watcher = BackgroundWatcher(self.url, self._watch_loop)
        self._closed = False
        self.full_fetches = 0  # counters for `meshctl status` and tests
        self.delta_fetches = 0

    # -- status ---------------------------------------------------------------------

    @property
    def keepalive_interval(self) -> float:
        return self.renewal_interval

    # -- the Registry protocol --------------------------------------------------------

    async def ping(self) -> None:
        """Raise RegistryError unless the server answers ``GET /apps``."""
        await self._request("GET", "/apps", "fetch the registry")

    async def register(self, instance: Instance) -> None:
        """Register (or replace) ``instance``. It is remembered even when the
        server cannot be reached (RegistryError is raised): keep_alive then
        retries the registration."""
        self._check_open()
        if not instance.id or not instance.service:
            raise RegistryError(f"{self.url}: an instance needs an id and a service name (got {instance!r})")
        reg = _Registration(instance)
        self._registered[instance.id] = reg
        await self._register(reg)

    async def deregister(self, instance_id: str) -> None:
        self._check_open()
        reg = self._registered.pop(instance_id, None)
        app = _app_name(reg.instance.service) if reg else await self._find_app(instance_id)
        if app is None:
            return
        await self._request("DELETE", f"/apps/{app}/{instance_id}", f"deregister {instance_id!r}", ok_404=True)

    async def keep_alive(self, instance_id: str) -> None:
        """Renew the lease; register again if the server does not know the instance."""
        self._check_open()
        reg = self._get(instance_id, "keep_alive")
        app = _app_name(reg.instance.service)
        resp = await self._request("PUT", f"/apps/{app}/{instance_id}", f"renew the lease of {instance_id!r}", ok_404=True)
        # Not when it was deregistered through us while this call was in flight:
        # that DELETE is why the server forgot it.
        if resp.status_code == 404 and self._registered.get(instance_id) is reg:
            log.info("%s: server does not know %s; registering it again", self.url, instance_id)
            await self._register(reg)

    async def set_draining(self, instance_id: str) -> None:
        """Mark the instance OUT_OF_SERVICE (kept across lease renewals)."""
        self._check_open()
        reg = self._registered.get(instance_id)
        if reg is not None:
            reg.draining = True
            app: str | None = _app_name(reg.instance.service)
        else:
            app = await self._find_app(instance_id)
            if app is None:
                raise RegistryError(f"{self.url}: set_draining: the server has no instance {instance_id!r}")
        resp = await self._request(
            "PUT",
            f"/apps/{app}/{instance_id}/status",
            f"mark {instance_id!r} OUT_OF_SERVICE",
            params={"value": "OUT_OF_SERVICE"},
            ok_404=True,
        )
        if resp.status_code == 404:
            if reg is None:
                raise RegistryError(f"{self.url}: set_draining: the server has no instance {instance_id!r}")
            if self._registered.get(instance_id) is reg:  # not deregistered meanwhile (keep_alive)
                await self._register(reg)

    def watch(self) -> AsyncIterator[Snapshot]:
        return self._watcher.snapshots()

    async def aclose(self) -> None:
        self._closed = True
        await self._watcher.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- registration -------------------------------------------------------------------

    async def _register(self, reg: _Registration) -> None:
        inst = reg.instance
        body = instance_document(
            inst, renewal_interval=self.renewal_interval, lease_duration=self.lease_duration
        )
        app = _app_name(inst.service)
        await self._request("POST", f"/apps/{app}", f"register {inst.id!r} (app {app})", json_body=body)
        if reg.draining:
            await self._request(
                "PUT",
                f"/apps/{app}/{inst.id}/status",
                f"mark {inst.id!r} OUT_OF_SERVICE",
                params={"value": "OUT_OF_SERVICE"},
            )
        else:
            # Eureka keeps our drain's OUT_OF_SERVICE across a new registration of an
            # instance it still has (as its status override, or as the lease's status when
            # the override is gone): a restarted sidecar reusing the id after a DELETE that
            # never arrived stayed OUT_OF_SERVICE for good. Set UP, then drop the override
            # (DELETE .../status only changes the status when an override exists).
            for method in ("PUT", "DELETE"):
                await self._request(
                    method,
                    f"/apps/{app}/{inst.id}/status",
                    f"mark {inst.id!r} UP",
                    params={"value": "UP"},
                    ok_404=True,
                )
        if inst.id not in self._registered:
            # Deregistered while this registration was in flight (a keep-alive's or a
            # drain's re-registration): its DELETE may have reached the server before our
            # POST, which brought the instance back. Take it out again.
            await self._request("DELETE", f"/apps/{app}/{inst.id}", f"deregister {inst.id!r}", ok_404=True)

    async def _find_app(self, instance_id: str) -> str | None:
        state = self._watcher.state
        if state.snapshot:
            for service, items in state.snapshot.items():
                if any(i.id == instance_id for i in items):
                    return _app_name(service)
        resp = await self._request("GET", f"/instances/{instance_id}", f"look up {instance_id!r}", ok_404=True)
        if resp.status_code == 404:
            return None
        doc = _json(resp, self.url).get("instance") or {}
        return doc.get("app")

    # -- watching -------------------------------------------------------------------------

    async def _watch_loop(self, state) -> None:
        local: dict[str, dict[str, Any]] = {}  # instanceId → instance document
        backoff = Backoff(*self._backoff_args, rng=self._rng)
        full = True
        while True:
            try:
                if full:
                    resp = await self._request("GET", "/apps", "fetch the registry (GET /apps)")
                    self.full_fetches += 1
                    apps = _json(resp, self.url).get("applications") or {}
                    local = {doc_id: doc for doc_id, doc in _instances(apps)}
                    full = False
                else:
                    resp = await self._request("GET", "/apps/delta", "fetch changes (GET /apps/delta)")
                    self.delta_fetches += 1
                    merged = apply_delta(local, _json(resp, self.url).get("applications") or {})
                    if merged is None:
                        full = True  # our copy drifted from the server's: fetch everything now
                        continue
                    local = merged
            except RegistryError as exc:
                state.fail(str(exc))
                full = True
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            state.publish(snapshot_from_documents(local.values()))
            await trio.sleep(self.poll_interval)

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"{self.url}: registry client is closed")

    def _get(self, instance_id: str, what: str) -> _Registration:
        reg = self._registered.get(instance_id)
        if reg is None:
            raise RegistryError(f"{self.url}: {what}: {instance_id!r} was not registered through this client")
        return reg

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=_JSON, timeout=self.request_timeout
            )
        return self._client

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        ok_404: bool = False,
    ) -> httpx.Response:
        """One HTTP call; library errors and non-2xx answers become RegistryError
        naming the server, the operation and the cause."""
        try:
            resp = await self._http().request(method, self.base_url + path, params=params, json=json_body)
        except httpx.ConnectError as exc:
            reason = _connect_reason(exc)
            err = RegistryError(f"{self.url}: {what}: cannot connect ({reason}) — is the Eureka server running?")
        except httpx.TimeoutException as exc:
            err = RegistryError(f"{self.url}: {what}: no answer within {self.request_timeout:g}s ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            err = RegistryError(f"{self.url}: {what}: {type(exc).__name__}: {exc}")
        else:
            self._watcher.state.ok()
            if resp.is_success or (ok_404 and resp.status_code == 404):
                return resp
            body = " ".join(resp.text.split())[:200]
            raise RegistryError(
                f"{self.url}: {what}: {method} {path} answered {resp.status_code}" + (f": {body}" if body else "")
            )
        self._watcher.state.fail(str(err))
        raise err


def _connect_reason(exc: BaseException) -> str:
    """The root cause of a failed connect, in a few words."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, socket.gaierror):
            return "host name not found"
        todo.extend(getattr(cur, "exceptions", ()))  # anyio tries every address, then groups the errors
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return str(exc) or type(exc).__name__


# -- documents ------------------------------------------------------------------------------


def _app_name(service: str) -> str:
    return service.upper()


def instance_document(inst: Instance, *, renewal_interval: float, lease_duration: float) -> dict[str, Any]:
    """The body of ``POST /apps/{APP}`` for ``inst``."""
    metadata = {k: v for k, v in inst.labels.items() if _xml_safe_key(k)}
    # Exact labels and meta as JSON too: metadata keys must be XML element names.
    metadata[LABELS_KEY] = json.dumps(dict(inst.labels), sort_keys=True, separators=(",", ":"))
    if inst.meta:
        metadata[META_KEY] = json.dumps(dict(inst.meta), sort_keys=True, separators=(",", ":"))
    return {
        "instance": {
            "instanceId": inst.id,
            "hostName": inst.address,
            "app": _app_name(inst.service),
            "ipAddr": inst.address,
            "vipAddress": inst.service,
            "secureVipAddress": inst.service,
            "status": "UP",
            "port": {"$": inst.port, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "leaseInfo": {
                "renewalIntervalInSecs": max(1, round(renewal_interval)),
                "durationInSecs": max(1, round(lease_duration)),
            },
            "metadata": metadata,
        }
    }


def _xml_safe_key(key: str) -> bool:
    return bool(key) and (key[0].isalpha() or key[0] == "_") and all(c.isalnum() or c in "-_." for c in key)


def _as_list(value: Any) -> list[Any]:
    # Eureka's JSON gives a list, but some codecs give a lone object for one element.
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _instances(applications: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for app in _as_list(applications.get("application")):
        for doc in _as_list((app or {}).get("instance")):
            if isinstance(doc, dict):
                doc_id = str(doc.get("instanceId") or f"{doc.get('hostName')}:{doc.get('app')}:{_port(doc)}")
                out.append((doc_id, doc))
    return out


def apply_delta(local: dict[str, dict[str, Any]], delta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Apply a ``GET /apps/delta`` answer (its ``applications`` object) to a
    copy of ``local`` (instanceId → document). Returns None when the result's
    reconcile hash code differs from the server's: the caller must then
    fetch the whole registry."""
    merged = dict(local)
    for doc_id, doc in _instances(delta):
        if doc.get("actionType") == "DELETED":
            merged.pop(doc_id, None)
        else:
            merged[doc_id] = doc
    if reconcile_hash(merged.values()) != (delta.get("apps__hashcode") or ""):
        return None
    return merged


def reconcile_hash(docs: Any) -> str:
    """Eureka's apps hash code: ``STATUS_count_`` for each status, sorted by status."""
    counts = Counter(str(d.get("status") or "UNKNOWN") for d in docs)
    return "".join(f"{status}_{counts[status]}_" for status in sorted(counts))


def _port(doc: dict[str, Any]) -> int:
    port = doc.get("port")
    if isinstance(port, dict):
        port = port.get("$")
    try:
        return int(port or 0)
    except (TypeError, ValueError):
        return 0


def decode_instance(doc: dict[str, Any]) -> Instance:
    """One Eureka instance document → an Instance (healthy iff status UP)."""
    metadata = {k: v for k, v in (doc.get("metadata") or {}).items() if not k.startswith("@")}
    labels: dict[str, str]
    if LABELS_KEY in metadata:
        try:
            labels = {str(k): str(v) for k, v in json.loads(metadata[LABELS_KEY]).items()}
        except (ValueError, AttributeError):
            labels = {}
    else:
        labels = {str(k): str(v) for k, v in metadata.items() if not k.startswith("meshctl-")}
    meta: dict[str, str] = {}
    if META_KEY in metadata:
        try:
            meta = {str(k): str(v) for k, v in json.loads(metadata[META_KEY]).items()}
        except (ValueError, AttributeError):
            meta = {}
    status = str(doc.get("status") or "UNKNOWN")
    meta["meshctl.io/eureka-status"] = status
    vip = str(doc.get("vipAddress") or doc.get("app") or "").split(",")[0].strip()
    return Instance(
        id=str(doc.get("instanceId") or doc.get("hostName")),
        service=vip.lower(),
        address=str(doc.get("ipAddr") or doc.get("hostName") or ""),
        port=_port(doc),
        labels=FrozenDict(labels),
        healthy=status in ("UP", "OUT_OF_SERVICE"),
        draining=status == "OUT_OF_SERVICE",
        meta=FrozenDict(meta),
    )


def snapshot_from_documents(docs: Any) -> Snapshot:
    by_service: dict[str, list[Instance]] = {}
    for doc in docs:
        inst = decode_instance(doc)
        if not inst.service:
            continue
        items = by_service.setdefault(inst.service, [])
        if inst.healthy and not inst.draining:
            items.append(inst)
    return make_snapshot(by_service)


def _json(resp: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as exc:
        raise RegistryError(f"{url}: {resp.request.method} {resp.request.url.path} did not answer JSON: {resp.text[:120]!r}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{url}: {resp.request.method} {resp.request.url.path} answered unexpected JSON")
    return data
