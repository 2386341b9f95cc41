"""The rules store: applied Istio resources, with every revision kept.

Layout in the state directory::

    rules/revisions/000001.json   {"revision", "time", "change", "resources": [...]}
    rules/current                 "7"  (the revision in force; rollback moves it)
    rules/.lock                   flock, so CLI and Pilot never write at once

Each revision is the whole set, so rollback is choosing a file and history is
listing them. The history is capped: the last ``keep`` revisions (KEEP_REVISIONS,
100) are kept and older ones pruned at each write, so a big rule set applied
again and again does not grow the state directory without end (fields are
bounded by the loader: loader/source.py). A revision is written to a temporary file and renamed: a crash
never leaves a half-written rule set. The CLI writes here directly and then
pokes Pilot, so `route apply` works the same with Pilot up or down.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Protocol, Sequence

import trio

from ..loader.codec import from_data, to_data
from ..model.base import FrozenDict
from ..model.istio import SPEC_TYPES, Resource


KEEP_REVISIONS = 100

log = logging.getLogger("meshctl.pilot.store")


class StoreError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Revision:
    number: int
    time: float
    change: str
    resources: tuple[Resource, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """What one apply or delete did to one resource, kubectl-style."""

    kind: str
    namespace: str
    name: str
    action: str  # created | configured | unchanged | deleted | not found

    def __str__(self) -> str:
        ns = "" if self.namespace == "default" else f"{self.namespace}/"
        return f"{self.kind.lower()}.{_group_of(self.kind)}/{ns}{self.name} {self.action}"


def _group_of(kind: str) -> str:
    for (group, k) in SPEC_TYPES:
        if k == kind:
            return group
    return "unknown"


def resource_to_dict(r: Resource) -> dict:
    meta: dict = {"name": r.name, "namespace": r.namespace}
    if r.labels:
        meta["labels"] = dict(r.labels)
    out: dict[str, Any] = {"apiVersion": r.api_version, "kind": r.kind, "metadata": meta, "spec": to_data(r.spec) or {}}
    if r.source:
        out["metadata"]["annotations"] = {"meshctl.io/source": r.source}
    return out


def resource_from_dict(d: dict) -> Resource:
    group = d["apiVersion"].split("/", 1)[0]
    cls = SPEC_TYPES[(group, d["kind"])]
    meta = d.get("metadata", {})
    return Resource(
        api_version=d["apiVersion"],
        kind=d["kind"],
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        spec=from_data(cls, d.get("spec") or {}),
        labels=FrozenDict(meta.get("labels") or {}),
        source=(meta.get("annotations") or {}).get("meshctl.io/source"),
    )


class RuleStore:
    def __init__(self, state_dir: Path, *, keep: int = KEEP_REVISIONS) -> None:
        self.keep = max(2, keep)
        self.root = Path(state_dir) / "rules"
        self.revisions = self.root / "revisions"
        self.revisions.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reading

    def current_number(self) -> int:
        try:
            return int((self.root / "current").read_text().strip())
        except FileNotFoundError:
            return 0
        except ValueError as e:
            raise StoreError(f"{self.root / 'current'}: corrupt ({e})") from e

    def read(self, number: int) -> Revision:
        path = self.revisions / f"{number:06d}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            oldest = min((int(p.stem) for p in self.revisions.glob("*.json")), default=0)
            if 0 < number < oldest:
                raise StoreError(f"revision {number} was pruned: the history keeps the last {self.keep} "
                                 f"revisions (the oldest is {oldest})") from None
            raise StoreError(f"no revision {number} in {self.revisions}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: corrupt ({e})") from e
        return revision_from_dict(data)

    def current(self) -> Revision:
        n = self.current_number()
        if n == 0:
            return Revision(0, 0.0, "empty", ())
        return self.read(n)

    def history(self) -> list[Revision]:
        out = []
        for p in sorted(self.revisions.glob("*.json")):
            out.append(self.read(int(p.stem)))
        return out

    def stamp(self) -> tuple[int, float]:
        """Cheap change detection for Pilot: (current revision, its file's mtime)."""
        p = self.root / "current"
        try:
            return (self.current_number(), p.stat().st_mtime)
        except FileNotFoundError:
            return (0, 0.0)

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self, resources: Sequence[Resource], change: str) -> Revision:
        existing = [int(p.stem) for p in self.revisions.glob("*.json")]
        number = max(existing, default=0) + 1
        rev = Revision(number, time.time(), change, tuple(resources))
        _atomic_write(self.revisions / f"{number:06d}.json", json.dumps(revision_to_dict(rev), indent=1))
        _atomic_write(self.root / "current", f"{number}\n")
        for old in sorted(existing)[: max(0, len(existing) + 1 - self.keep)]:
            try:
                (self.revisions / f"{old:06d}.json").unlink()
            except FileNotFoundError:
                pass
        return rev

    def apply(self, resources: Sequence[Resource]) -> tuple[Revision, list[Change]]:
        """Create or replace each resource by (kind, namespace, name), like kubectl apply."""
        with self._locked():
            cur = self.current()
            new, changes, summary = plan_apply(cur.resources, resources)
            if new is None:
                return cur, changes
            return self._write(new, summary), changes

    def delete(self, keys: Sequence[tuple[str, str, str]]) -> tuple[Revision, list[Change]]:
        with self._locked():
            cur = self.current()
            new, changes, summary = plan_delete(cur.resources, keys)
            if new is None:
                return cur, changes
            return self._write(new, summary), changes

    def rollback(self, number: int | None = None) -> Revision:
        """Make an earlier revision's rule set current again, as a new revision."""
        with self._locked():
            cur = self.current_number()
            if number is None:
                number = cur - 1
            if number < 1 or number > cur and number > max((int(p.stem) for p in self.revisions.glob("*.json")), default=0):
                raise StoreError(f"no revision {number} to roll back to (current is {cur})")
            old = self.read(number)
            return self._write(old.resources, f"rollback to revision {number}")

    # ------------------------------------------------------------ Pilot's side

    # One host's files: no other host reads them (ConsulRuleStore: True).
    shared = False

    @property
    def location(self) -> str:
        return f"files in {self.root}"

    def last_known(self) -> Revision:
        """The rules Pilot starts with: the current revision."""
        return self.current()

    async def fetch(self) -> Revision:
        return self.current()

    async def watch(self, poll: float = 1.0) -> AsyncIterator[Revision]:
        """The current revision, then each new one (the CLI also pokes Pilot; this is the fallback)."""
        last: tuple[int, float] | None = None
        while True:
            stamp = self.stamp()
            if stamp != last:
                try:
                    rev = self.current()
                except StoreError as e:
                    log.warning("rules not reloaded: %s", e)
                else:
                    last = stamp
                    yield rev
            await trio.sleep(poll)

    def publish_proxies(self, report: dict) -> None:
        """Only a shared store (Consul KV) publishes each host's proxies."""

    def withdraw_proxies(self) -> None:
        pass

    def host_key(self) -> str:
        return ""

    def peer_reports(self) -> list[dict]:
        return []


# ------------------------------------------------------------ pure: what a change does


def plan_apply(current: Sequence[Resource], resources: Sequence[Resource]) -> tuple[list[Resource] | None, list[Change], str]:
    """The rule set after applying ``resources`` over ``current`` (None: nothing changes),
    what happened to each resource, and the revision's summary."""
    by_key = {r.key: r for r in current}
    changes = []
    for r in resources:
        old = by_key.get(r.key)
        if old is None:
            action = "created"
        elif old.spec == r.spec and old.api_version == r.api_version and old.labels == r.labels:
            action = "unchanged"
        else:
            action = "configured"
        by_key[r.key] = r
        changes.append(Change(r.kind, r.namespace, r.name, action))
    if all(c.action == "unchanged" for c in changes):
        return None, changes, ""
    summary = "apply " + ", ".join(f"{c.kind}/{c.name}" for c in changes if c.action != "unchanged")
    return sorted(by_key.values(), key=lambda r: r.key), changes, summary


def plan_delete(current: Sequence[Resource], keys: Sequence[tuple[str, str, str]]) -> tuple[list[Resource] | None, list[Change], str]:
    by_key = {r.key: r for r in current}
    # Kinds are matched case-insensitively: `route delete virtualservice reviews`.
    lower = {(k.lower(), ns, n): key for key in by_key for (k, ns, n) in [key]}
    changes = []
    for kind, ns, name in keys:
        real = lower.get((kind.lower(), ns, name))
        if real is None or real not in by_key:
            changes.append(Change(kind, ns, name, "not found"))
        else:
            del by_key[real]
            changes.append(Change(real[0], ns, name, "deleted"))
    if not any(c.action == "deleted" for c in changes):
        return None, changes, ""
    summary = "delete " + ", ".join(f"{c.kind}/{c.name}" for c in changes if c.action == "deleted")
    return sorted(by_key.values(), key=lambda r: r.key), changes, summary


def revision_to_dict(rev: Revision) -> dict:
    return {"revision": rev.number, "time": rev.time, "change": rev.change,
            "resources": [resource_to_dict(r) for r in rev.resources]}


def revision_from_dict(data: dict) -> Revision:
    return Revision(number=int(data["revision"]), time=float(data["time"]), change=str(data["change"]),
                    resources=tuple(resource_from_dict(r) for r in data["resources"]))


class RuleStoreLike(Protocol):
    """What the CLI and Pilot use: :class:`RuleStore` (files) or
    :class:`~meshctl.pilot.kvstore.ConsulRuleStore` (Consul KV, across hosts)."""

    keep: int
    shared: bool  # every host of the mesh reads it (and each Pilot publishes its proxies there)

    @property
    def location(self) -> str: ...
    def current_number(self) -> int: ...
    def read(self, number: int) -> Revision: ...
    def current(self) -> Revision: ...
    def history(self) -> list[Revision]: ...
    def apply(self, resources: Sequence[Resource]) -> tuple[Revision, list[Change]]: ...
    def delete(self, keys: Sequence[tuple[str, str, str]]) -> tuple[Revision, list[Change]]: ...
    def rollback(self, number: int | None = None) -> Revision: ...
    def last_known(self) -> Revision: ...
    async def fetch(self) -> Revision: ...
    def watch(self) -> AsyncIterator[Revision]: ...
    def publish_proxies(self, report: dict) -> None: ...
    def withdraw_proxies(self) -> None: ...
    def host_key(self) -> str: ...
    def peer_reports(self) -> list[dict]: ...


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
