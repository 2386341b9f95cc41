"""The embedded registry: the default, owned by the control-plane process.

Instances live in memory and in ``<state_dir>/registry.json`` (rewritten
atomically: temp file, fsync, rename), so a restarted control plane and
read-only CLI commands (:func:`load_snapshot`) see them.

Health is TTL-based. An instance registered with a TTL must be kept alive
(``keep_alive``) within every TTL; otherwise it turns unhealthy and drops out
of snapshots until its next keep-alive. An instance without a TTL is healthy
until deregistered. The clock is ``trio.current_time()``, so tests drive it
with ``trio.testing.MockClock``. TTL deadlines are not persisted (trio's clock
means nothing to another process): after a restart every healthy TTL
instance gets one fresh TTL to check in again.

Snapshots contain the instances that should get traffic: healthy and not
draining. :meth:`EmbeddedRegistry.instances` lists everything with its flags.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from ..model.base import FrozenDict
from .watch import make_snapshot
from .base import Instance, RegistryError, Snapshot

FILE_NAME = "registry.json"
FORMAT_VERSION = 1


@dataclass(slots=True)
class _Entry:
    instance: Instance  # healthy/draining kept in the entry fields below, not here
    ttl: float | None
    healthy: bool = True
    draining: bool = False
    deadline: float | None = None  # trio time; None = not armed yet (or no TTL)

    def view(self) -> Instance:
        return replace(self.instance, healthy=self.healthy, draining=self.draining)


class EmbeddedRegistry:
    """In-process registry persisted in ``state_dir/registry.json``.

    ``default_ttl``: TTL (seconds) for instances registered without one;
    None means "no TTL, healthy until deregistered".
    """

    reachable = True
    last_error = ""

    def __init__(self, state_dir: Path | str, *, default_ttl: float | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE_NAME
        self.url = "embedded"
        self.default_ttl = _check_ttl(default_ttl)
        self._entries: dict[str, _Entry] = {}
        self._changed = trio.Event()
        self._closed = False
        for item in _read_file(self.path):
            entry = _entry_from_json(item, self.path)
            self._entries[entry.instance.id] = entry

    # -- the Registry protocol -------------------------------------------------

    @property
    def keepalive_interval(self) -> float:
        """How often callers should call keep_alive: a third of the shortest TTL."""
        ttls = [e.ttl for e in self._entries.values() if e.ttl]
        if self.default_ttl:
            ttls.append(self.default_ttl)
        return min(ttls) / 3 if ttls else 10.0

    async def ping(self) -> None:
        self._check_open()

    async def register(self, instance: Instance, *, ttl: float | None = None) -> None:
        """Add or replace ``instance``. ``ttl`` overrides ``default_ttl``.

        The instance starts healthy (its first TTL runs from now) and not
        draining; re-registering an id replaces the old record."""
        self._check_open()
        if not instance.id or not instance.service:
            raise RegistryError(f"{self.url}: an instance needs an id and a service name (got {instance!r})")
        if not (0 < instance.port < 65536):
            raise RegistryError(f"{self.url}: instance {instance.id!r} has invalid port {instance.port}")
        ttl = _check_ttl(ttl) if ttl is not None else self.default_ttl
        now = trio.current_time()
        entry = _Entry(
            instance=replace(instance, healthy=True, draining=False),
            ttl=ttl,
            deadline=now + ttl if ttl else None,
        )
        self._entries[instance.id] = entry
        self._save_and_notify()

    async def deregister(self, instance_id: str) -> None:
        """Remove the instance. Removing an unknown id is not an error."""
        self._check_open()
        if self._entries.pop(instance_id, None) is not None:
            self._save_and_notify()

    async def keep_alive(self, instance_id: str) -> None:
        self._check_open()
        entry = self._get(instance_id, "keep_alive")
        now = trio.current_time()
        self._arm(now)
        if entry.ttl:
            entry.deadline = now + entry.ttl
        if not entry.healthy:
            entry.healthy = True
            self._save_and_notify()

    async def set_draining(self, instance_id: str) -> None:
        self._check_open()
        entry = self._get(instance_id, "set_draining")
        if not entry.draining:
            entry.draining = True
            self._save_and_notify()

    async def watch(self) -> AsyncIterator[Snapshot]:
        """Yield the current snapshot, then a new one after every change
        (registration, deregistration, drain, TTL expiry or recovery)."""
        last: Snapshot | None = None
        while not self._closed:
            event = self._changed
            now = trio.current_time()
            self._expire(now)
            snap = self.snapshot()
            if snap != last:
                last = snap
                yield snap
                continue
            with trio.move_on_at(self._next_deadline()):
                await event.wait()

    async def aclose(self) -> None:
        self._closed = True
        self._notify()

    # -- extras ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current snapshot (healthy, non-draining instances). TTLs are
        checked first when called inside trio."""
        self._refresh()
        by_service: dict[str, list[Instance]] = {}
        for entry in self._entries.values():
            items = by_service.setdefault(entry.instance.service, [])
            if entry.healthy and not entry.draining:
                items.append(entry.view())
        return make_snapshot(by_service)

    def instances(self) -> list[Instance]:
        """Every registered instance, with its ``healthy`` and ``draining`` flags, sorted by id."""
        self._refresh()
        return [self._entries[k].view() for k in sorted(self._entries)]

    # -- internals -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"{self.url} ({self.path}): registry is closed")

    def _get(self, instance_id: str, what: str) -> _Entry:
        entry = self._entries.get(instance_id)
        if entry is None:
            raise RegistryError(f"{self.url} ({self.path}): {what}: no instance {instance_id!r} is registered")
        return entry

    def _refresh(self) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio: report what we last knew
            return
        self._expire(now)

    def _arm(self, now: float) -> None:
        # Entries loaded from disk get their first deadline on first use in trio.
        for entry in self._entries.values():
            if entry.ttl and entry.deadline is None:
                entry.deadline = now + entry.ttl

    def _expire(self, now: float) -> None:
        self._arm(now)
        expired = False
        for entry in self._entries.values():
            if entry.healthy and entry.deadline is not None and entry.deadline <= now:
                entry.healthy = False
                expired = True
        if expired:
            self._save_and_notify()

    def _next_deadline(self) -> float:
        deadlines = [e.deadline for e in self._entries.values() if e.healthy and e.deadline is not None]
        return min(deadlines) if deadlines else math.inf

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _save_and_notify(self) -> None:
        self._save()
        self._notify()

    def _save(self) -> None:
        data = {
            "version": FORMAT_VERSION,
            "instances": [_entry_to_json(self._entries[k]) for k in sorted(self._entries)],
        }
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".registry.", suffix=".tmp", dir=self.state_dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            raise RegistryError(f"{self.url}: cannot write {self.path}: {exc.strerror or exc}") from exc


def load_snapshot(state_dir: Path | str) -> Snapshot:
    """Read the snapshot saved by the embedded registry in ``state_dir``,
    synchronously (for CLI commands). No file yet means an empty registry.

    TTL expiry is as last recorded by the owning process."""
    by_service: dict[str, list[Instance]] = {}
    for inst in load_instances(state_dir):
        items = by_service.setdefault(inst.service, [])
        if inst.healthy and not inst.draining:
            items.append(inst)
    return make_snapshot(by_service)


def load_instances(state_dir: Path | str) -> list[Instance]:
    """Every instance saved in ``state_dir``, with healthy/draining flags, sorted by id."""
    path = Path(state_dir) / FILE_NAME
    entries = [_entry_from_json(item, path) for item in _read_file(path)]
    return sorted((e.view() for e in entries), key=lambda i: i.id)


# -- file format -------------------------------------------------------------------


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise RegistryError(f"embedded registry: TTL must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RegistryError(f"embedded registry: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"embedded registry: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
        raise RegistryError(f"embedded registry: {path} has no 'instances' list")
    if data.get("version") != FORMAT_VERSION:
        raise RegistryError(
            f"embedded registry: {path} has format version {data.get('version')!r}, expected {FORMAT_VERSION}"
        )
    return data["instances"]


def _entry_to_json(entry: _Entry) -> dict[str, Any]:
    inst = entry.instance
    return {
        "id": inst.id,
        "service": inst.service,
        "address": inst.address,
        "port": inst.port,
        "labels": dict(inst.labels),
        "meta": dict(inst.meta),
        "ttl": entry.ttl,
        "healthy": entry.healthy,
        "draining": entry.draining,
    }


def _entry_from_json(item: Any, path: Path) -> _Entry:
    try:
        if not isinstance(item, dict):
            raise TypeError("not an object")
        ttl = item.get("ttl")
        inst = Instance(
            id=str(item["id"]),
            service=str(item["service"]),
            address=str(item["address"]),
            port=int(item["port"]),
            labels=FrozenDict({str(k): str(v) for k, v in (item.get("labels") or {}).items()}),
            meta=FrozenDict({str(k): str(v) for k, v in (item.get("meta") or {}).items()}),
        )
        return _Entry(
            instance=inst,
            ttl=float(ttl) if ttl else None,
            healthy=bool(item.get("healthy", True)),
            draining=bool(item.get("draining", False)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RegistryError(f"embedded registry: bad instance record in {path}: {item!r} ({exc})") from exc
