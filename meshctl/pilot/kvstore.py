"""The rules, their history and the injected faults in Consul's KV store: one set for every host.

With a Consul registry (``meshctl up --registry consul://...``) the rules do
not live in the state directory but in Consul KV, under a prefix that names
the mesh (``settings.meshId`` in mesh.yaml; default: the trust domain), so two
meshes, or two test runs, on one Consul never mix::

    meshctl/<meshId>/rules/current              "7": the revision in force
    meshctl/<meshId>/rules/revisions/000007     {"revision", "time", "change", "resources": [...]}
    meshctl/<meshId>/faults                     {"faults": [...]}  (`meshctl inject-fault`)
    meshctl/<meshId>/pilots/<host key>          one Pilot's proxies and what each ACKed

Writes are check-and-set, so two `route apply` on two hosts at once cannot
lose one: a new revision is one transaction that creates ``revisions/N+1``
only if it does not exist and moves ``current`` only if its ModifyIndex is the
one read. The loser of a race reads the new current revision, applies its
change over it and tries again (``MAX_ATTEMPTS`` times, then a StoreError says
so). The last KEEP_REVISIONS revisions are kept, as in the file store.

Every host's Pilot watches ``rules/current`` and ``faults`` with blocking
queries. When Consul cannot be reached it keeps the rules it has (and a copy
of the last revision it saw in the state directory, ``rules/consul-last.json``,
so a Pilot restarted while Consul is away starts from them), and the watch
resumes with backoff. A fault's expiry is a wall-clock time stored with it:
every host ends it at the same moment, whichever host injected it.

Where the rules live is decided once, at `up` (and `pilot serve`), and
recorded in ``state_dir/rules-location.json`` (0600: it may hold an ACL
token), which the CLI reads: Consul registry → Consul KV; embedded or Eureka →
the files (store.py, faults.py). :func:`open_stores` gives the pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import trio

from ..credentials import write_private
from ..model.istio import Resource
from ..registry import Backoff, parse_registry_url
from ..registry.base import RegistryError
from ..registry.consulkv import AsyncConsulKV, ConsulKV, Entry, KVError, TxnOp, next_index
from .faults import (FaultError, FaultStore, FaultStoreLike, InjectedFault, fault_from_dict, fault_to_dict)
from .store import (KEEP_REVISIONS, Change, Revision, RuleStore, RuleStoreLike, StoreError, plan_apply, plan_delete,
                    revision_from_dict, revision_to_dict)

log = logging.getLogger("meshctl.pilot.kvstore")

LOCATION_FILE = "rules-location.json"
MAX_ATTEMPTS = 20
WATCH_WAIT = 30.0  # seconds one blocking query may be held
REPORT_EVERY = 10.0  # a Pilot republishes its proxies at least this often
REPORT_STALE = 45.0  # proxy-status calls a host's report older than this stale
_MESH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_mesh_id(mesh_id: str) -> str | None:
    """Why ``mesh_id`` cannot name a KV prefix, or None."""
    if not _MESH_ID.match(mesh_id):
        return f"{mesh_id!r} is not a mesh id: letters, digits, '.', '_' and '-', 1-128 characters"
    return None


def kv_prefix(mesh_id: str) -> str:
    return f"meshctl/{mesh_id}/"


def host_name() -> str:
    """How this host is named in proxy-status: $MESHCTL_HOST_NAME, else the machine's name."""
    return os.environ.get("MESHCTL_HOST_NAME") or socket.gethostname()


# ------------------------------------------------------------------ where the rules live


def record_location(state_dir: Path, registry_url: str, mesh_id: str, *, token: str | None = None) -> dict:
    """Decide and record where the rules of the mesh in ``state_dir`` live (see the module doc)."""
    spec = parse_registry_url(registry_url)
    if spec["kind"] == "consul":
        problem = check_mesh_id(mesh_id)
        if problem:
            raise StoreError(problem)
        loc: dict[str, Any] = {"kind": "consul", "registry": registry_url.strip(), "prefix": kv_prefix(mesh_id),
                               "meshId": mesh_id}
        if token:
            loc["token"] = token
    else:
        loc = {"kind": "files"}
    path = Path(state_dir) / LOCATION_FILE
    try:
        if json.loads(path.read_text()) == loc:
            return loc
    except (OSError, ValueError):
        pass
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(loc, indent=1))
    return loc


def read_location(state_dir: Path) -> dict:
    try:
        data = json.loads((Path(state_dir) / LOCATION_FILE).read_text())
    except FileNotFoundError:
        return {"kind": "files"}
    except ValueError as e:
        raise StoreError(f"{Path(state_dir) / LOCATION_FILE}: corrupt ({e}); run `meshctl up` again to rewrite it") from None
    return data if isinstance(data, dict) else {"kind": "files"}


def open_stores(state_dir: Path, *, request_timeout: float = 5.0) -> tuple[RuleStoreLike, FaultStoreLike]:
    loc = read_location(state_dir)
    if loc.get("kind") != "consul":
        return RuleStore(state_dir), FaultStore(state_dir)
    try:
        kv = ConsulKV.from_url(loc["registry"], token=loc.get("token"), request_timeout=request_timeout)
    except (KeyError, RegistryError) as e:
        raise StoreError(f"{Path(state_dir) / LOCATION_FILE}: bad Consul location ({e})") from None
    prefix = str(loc["prefix"])
    return (ConsulRuleStore(kv, prefix, state_dir=Path(state_dir)),
            ConsulFaultStore(kv, prefix, state_dir=Path(state_dir)))


def open_rule_store(state_dir: Path, *, request_timeout: float = 5.0) -> RuleStoreLike:
    """The rule store of the mesh in ``state_dir``: Consul KV when `up` (or `pilot serve`)
    recorded a Consul registry there, else the files. ``request_timeout``: how long one
    Consul call may wait for an answer."""
    return open_stores(Path(state_dir), request_timeout=request_timeout)[0]


def open_fault_store(state_dir: Path) -> FaultStoreLike:
    """The injected faults of the mesh in ``state_dir``: Consul KV or faults.json, as the rules."""
    return open_stores(Path(state_dir))[1]


# ------------------------------------------------------------------ rules


def _store_error(e: KVError) -> StoreError:
    return StoreError(f"rules in Consul KV: {e}")


class ConsulRuleStore:
    """The rule store in Consul KV (module doc); same methods as :class:`RuleStore`."""

    shared = True

    def __init__(self, kv: ConsulKV, prefix: str, *, state_dir: Path | None = None, keep: int = KEEP_REVISIONS,
                 rng: random.Random | None = None) -> None:
        self.kv = kv
        self.akv = AsyncConsulKV(kv)
        self.prefix = prefix
        self.keep = max(2, keep)
        self.state_dir = state_dir
        self._rng = rng or random.Random()
        self.current_key = f"{prefix}rules/current"
        self.revisions_prefix = f"{prefix}rules/revisions/"
        self.pilots_prefix = f"{prefix}pilots/"
        self.reachable = True
        self.last_error = ""
        self._cache = (Path(state_dir) / "rules" / "consul-last.json") if state_dir else None
        self._last_report: tuple[str, float] = ("", 0.0)

    @property
    def location(self) -> str:
        return f"Consul KV {self.kv.url} {self.prefix}rules/"

    def _rev_key(self, number: int) -> str:
        return f"{self.revisions_prefix}{number:06d}"

    # -- reading

    def _current_entry(self) -> tuple[int, int]:
        """(current revision number, ModifyIndex of the current key; 0 when absent)."""
        try:
            e = self.kv.get(self.current_key)
        except KVError as err:
            raise _store_error(err) from None
        if e is None:
            return 0, 0
        return _number(e, self.current_key), e.modify_index

    def current_number(self) -> int:
        return self._current_entry()[0]

    def read(self, number: int) -> Revision:
        try:
            e = self.kv.get(self._rev_key(number))
            if e is None:
                kept = self.kv.keys(self.revisions_prefix)
        except KVError as err:
            raise _store_error(err) from None
        if e is None:
            oldest = min((_key_number(k) for k in kept), default=0)
            if 0 < number < oldest:
                raise StoreError(f"revision {number} was pruned: the history keeps the last {self.keep} "
                                 f"revisions (the oldest is {oldest})")
            raise StoreError(f"no revision {number} in {self.location}")
        return _decode_revision(e)

    def current(self) -> Revision:
        n = self.current_number()
        return Revision(0, 0.0, "empty", ()) if n == 0 else self.read(n)

    def history(self) -> list[Revision]:
        try:
            entries = self.kv.list(self.revisions_prefix)
        except KVError as err:
            raise _store_error(err) from None
        return sorted((_decode_revision(e) for e in entries), key=lambda r: r.number)

    # -- writing: read, plan, check-and-set; on a lost race read again

    def _commit(self, plan: Callable[[Revision], tuple[Sequence[Resource] | None, str]]) -> tuple[Revision, bool]:
        for attempt in range(MAX_ATTEMPTS):
            number, index = self._current_entry()
            cur = Revision(0, 0.0, "empty", ()) if number == 0 else self.read(number)
            resources, summary = plan(cur)
            if resources is None:
                return cur, False
            new = Revision(number + 1, time.time(), summary, tuple(resources))
            try:
                kept = sorted(_key_number(k) for k in self.kv.keys(self.revisions_prefix))
                body = json.dumps(revision_to_dict(new), separators=(",", ":"))
                ops = [TxnOp.cas(self._rev_key(new.number), body, 0),
                       TxnOp.cas(self.current_key, str(new.number), index)]
                # prune what falls out of the history (a few per write; a txn takes at most 64 operations)
                ops += [TxnOp.delete(self._rev_key(n)) for n in kept if n <= new.number - self.keep][:60]
                if self.kv.txn(ops):
                    return new, True
            except KVError as err:
                raise _store_error(err) from None
            log.info("revision %d was taken by another writer; applying again over the new one", new.number)
            time.sleep(self._rng.uniform(0.005, 0.05) * (1 + attempt))
        raise StoreError(f"{self.location}: the rules kept changing under this write ({MAX_ATTEMPTS} attempts lost "
                         "to other writers); nothing was written by this command — try again")

    def apply(self, resources: Sequence[Resource]) -> tuple[Revision, list[Change]]:
        changes: list[Change] = []

        def plan(cur: Revision) -> tuple[Sequence[Resource] | None, str]:
            new, ch, summary = plan_apply(cur.resources, resources)
            changes[:] = ch
            return new, summary

        rev, _ = self._commit(plan)
        return rev, changes

    def delete(self, keys: Sequence[tuple[str, str, str]]) -> tuple[Revision, list[Change]]:
        changes: list[Change] = []

        def plan(cur: Revision) -> tuple[Sequence[Resource] | None, str]:
            new, ch, summary = plan_delete(cur.resources, keys)
            changes[:] = ch
            return new, summary

        rev, _ = self._commit(plan)
        return rev, changes

    def rollback(self, number: int | None = None) -> Revision:
        cur = self.current_number()
        target = cur - 1 if number is None else number
        if target < 1 or target > cur:
            raise StoreError(f"no revision {target} to roll back to (current is {cur})")
        old = self.read(target)
        rev, _ = self._commit(lambda _cur: (old.resources, f"rollback to revision {target}"))
        return rev

    # -- Pilot's side

    def last_known(self) -> Revision:
        """The last revision this host's Pilot saw (Consul is not asked: it may be away)."""
        if self._cache is None:
            return Revision(0, 0.0, "empty", ())
        try:
            return revision_from_dict(json.loads(self._cache.read_text()))
        except FileNotFoundError:
            return Revision(0, 0.0, "empty", ())
        except (ValueError, KeyError, TypeError, Exception) as e:  # a damaged cache: Consul gives it again
            log.warning("ignoring %s: %s", self._cache, e)
            return Revision(0, 0.0, "empty", ())

    def _save_cache(self, rev: Revision) -> None:
        if self._cache is None:
            return
        try:
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            write_private(self._cache, json.dumps(revision_to_dict(rev)))
        except OSError as e:
            log.warning("could not keep a copy of revision %d in %s: %s", rev.number, self._cache, e)

    async def fetch(self) -> Revision:
        rev = await trio.to_thread.run_sync(self.current, abandon_on_cancel=True)
        self._save_cache(rev)
        return rev

    async def watch(self, backoff: Backoff | None = None, wait: float = WATCH_WAIT) -> AsyncIterator[Revision]:
        """Each revision that becomes current, by blocking queries on ``rules/current``.

        Consul away: nothing is yielded (Pilot keeps its rules), ``reachable`` is False
        and the query is retried with backoff; back, the current revision is read
        again. The key gone (a new, empty Consul): the rules in force are kept."""
        backoff = backoff or Backoff(0.2, 5.0, rng=self._rng)
        index = 0
        # (number, time) of the revision in force: a wiped Consul numbers from 1 again, so the
        # number alone does not say "new". It starts as the copy kept here (what Pilot starts with).
        known = self.last_known()
        seen: tuple[int, float] | None = (known.number, known.time) if known.number else None
        modified = -1
        warned = False
        while True:
            try:
                new_index, entry = await self.akv.get_blocking(self.current_key, index, wait)
                rev: Revision | None = None
                if entry is None and seen is not None and seen[0] > 0:
                    if not warned:
                        log.warning("%s has no current revision (a new or wiped Consul?): keeping revision %d "
                                    "until rules are applied again", self.location, seen[0])
                        warned = True
                elif entry is None and seen is None:
                    rev = Revision(0, 0.0, "empty", ())
                elif entry is not None and entry.modify_index != modified:
                    number = _number(entry, self.current_key)
                    rev = await trio.to_thread.run_sync(self.read, number, abandon_on_cancel=True)
                    modified = entry.modify_index
                    if seen == (rev.number, rev.time):
                        rev = None
            except (KVError, StoreError) as e:
                self._fail(str(e))
                index = 0
                await trio.sleep(backoff.next())
                continue
            self._ok()
            backoff.reset()
            index = next_index(index, new_index)
            if rev is not None:
                seen, warned = (rev.number, rev.time), False
                self._save_cache(rev)
                yield rev

    def _fail(self, error: str) -> None:
        if self.reachable or error != self.last_error:
            log.warning("rules watch: %s; keeping the rules in force, retrying", error)
        self.reachable, self.last_error = False, error

    def _ok(self) -> None:
        if not self.reachable:
            log.info("rules watch: %s answers again", self.kv.url)
        self.reachable, self.last_error = True, ""

    # -- proxies of every host (proxy-status)

    def host_key(self) -> str:
        """This Pilot's key: its host name, and its state directory's digest (two meshes of one
        machine in tests, or two meshes of one host, stay apart)."""
        digest = hashlib.sha256(str(Path(self.state_dir or ".").resolve()).encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', host_name())}-{digest}"

    def publish_proxies(self, report: dict) -> None:
        """Put this Pilot's proxy status in KV when it changed, or every REPORT_EVERY seconds."""
        body = json.dumps(report, sort_keys=True, separators=(",", ":"))
        now = time.monotonic()
        if body == self._last_report[0] and now - self._last_report[1] < REPORT_EVERY:
            return
        doc = dict(report, reported=time.time())
        self.kv.put(self.pilots_prefix + self.host_key(), json.dumps(doc, separators=(",", ":")))
        self._last_report = (body, now)

    def withdraw_proxies(self) -> None:
        self.kv.delete(self.pilots_prefix + self.host_key())

    def peer_reports(self) -> list[dict]:
        """Every Pilot's last report (this host's too), oldest reports marked ``stale``."""
        try:
            entries = self.kv.list(self.pilots_prefix)
        except KVError as err:
            raise _store_error(err) from None
        out = []
        now = time.time()
        for e in entries:
            try:
                doc = e.json()
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            doc["key"] = e.key[len(self.pilots_prefix):]
            doc["stale"] = now - float(doc.get("reported") or 0) > REPORT_STALE
            out.append(doc)
        return sorted(out, key=lambda d: (str(d.get("host")), d["key"]))


def _number(e: Entry, key: str) -> int:
    try:
        return int(e.text.strip())
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"{key} in Consul KV is corrupt ({err})") from None


def _key_number(key: str) -> int:
    try:
        return int(key.rsplit("/", 1)[1])
    except (ValueError, IndexError):
        return 0


def _decode_revision(e: Entry) -> Revision:
    try:
        return revision_from_dict(e.json())
    except Exception as err:  # JSON, a missing field, a resource the loader refuses
        raise StoreError(f"{e.key} in Consul KV is corrupt ({err.__class__.__name__}: {err})") from None


# ------------------------------------------------------------------ injected faults


class ConsulFaultStore:
    """``<prefix>faults``: ``{"faults": [...]}``, replaced by check-and-set (FaultStoreLike)."""

    def __init__(self, kv: ConsulKV, prefix: str, *, state_dir: Path | None = None) -> None:
        self.kv = kv
        self.akv = AsyncConsulKV(kv)
        self.key = f"{prefix}faults"
        self._cache = (Path(state_dir) / "faults-consul-last.json") if state_dir else None

    @property
    def location(self) -> str:
        return f"Consul KV {self.kv.url} {self.key}"

    def _read(self) -> tuple[list[InjectedFault], int]:
        try:
            e = self.kv.get(self.key)
        except KVError as err:
            raise FaultError(f"injected faults in Consul KV: {err}") from None
        if e is None:
            return [], 0
        return _decode_faults(e, self.key), e.modify_index

    def load(self) -> list[InjectedFault]:
        return self._read()[0]

    def _update(self, change: Callable[[list[InjectedFault]], list[InjectedFault] | None]) -> None:
        for attempt in range(MAX_ATTEMPTS):
            faults, index = self._read()
            new = change(faults)
            if new is None:
                return
            body = json.dumps({"faults": [fault_to_dict(f) for f in new]}, separators=(",", ":"))
            try:
                if self.kv.put(self.key, body, cas=index):
                    return
            except KVError as err:
                raise FaultError(f"injected faults in Consul KV: {err}") from None
            time.sleep(random.uniform(0.005, 0.05) * (1 + attempt))
        raise FaultError(f"{self.location}: changed by other writers {MAX_ATTEMPTS} times in a row; try again")

    def add(self, fault: InjectedFault, now: float) -> None:
        def change(faults: list[InjectedFault]) -> list[InjectedFault]:
            kept = [f for f in faults if f.active(now)]
            if any(f.id == fault.id for f in kept):
                raise FaultError(f"an injected fault with id {fault.id} already exists")
            return kept + [fault]

        self._update(change)

    def remove(self, pred: Callable[[InjectedFault], bool], now: float) -> list[InjectedFault]:
        removed: list[InjectedFault] = []

        def change(faults: list[InjectedFault]) -> list[InjectedFault] | None:
            removed.clear()
            kept: list[InjectedFault] = []
            for f in faults:
                if not f.active(now):
                    continue
                (removed if pred(f) else kept).append(f)
            return None if len(kept) == len(faults) else kept

        self._update(change)
        return removed

    def prune(self, now: float) -> bool:
        dropped = False

        def change(faults: list[InjectedFault]) -> list[InjectedFault] | None:
            nonlocal dropped
            kept = [f for f in faults if f.active(now)]
            dropped = len(kept) != len(faults)
            return kept if dropped else None

        self._update(change)
        return dropped

    def last_known(self) -> list[InjectedFault]:
        if self._cache is None:
            return []
        try:
            return [fault_from_dict(d) for d in json.loads(self._cache.read_text())["faults"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, FaultError) as e:
            log.warning("ignoring %s: %s", self._cache, e)
            return []

    async def watch(self, backoff: Backoff | None = None, wait: float = WATCH_WAIT) -> AsyncIterator[list[InjectedFault]]:
        """The faults, then each change, by blocking queries; Consul away keeps the faults in force
        (their expiry still ends them: Pilot's timer)."""
        backoff = backoff or Backoff(0.2, 5.0)
        index = 0
        last: bytes | None = None
        failed = ""
        while True:
            try:
                new_index, entry = await self.akv.get_blocking(self.key, index, wait)
                faults = [] if entry is None else _decode_faults(entry, self.key)
            except (KVError, FaultError) as e:
                if str(e) != failed:
                    log.warning("faults watch: %s; keeping the faults in force, retrying", e)
                    failed = str(e)
                index = 0
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            if failed:
                log.info("faults watch: %s answers again", self.kv.url)
                failed = ""
            index = next_index(index, new_index)
            body = b"" if entry is None else entry.value
            if body != last:
                last = body
                if self._cache is not None:
                    try:
                        write_private(self._cache, json.dumps({"faults": [fault_to_dict(f) for f in faults]}))
                    except OSError as e:
                        log.warning("could not keep a copy of the faults in %s: %s", self._cache, e)
                yield faults


def _decode_faults(e: Entry, key: str) -> list[InjectedFault]:
    try:
        items = e.json()["faults"]
    except (ValueError, KeyError, TypeError) as err:
        raise FaultError(f"{key} in Consul KV is corrupt ({err}); delete the key to clear every injected fault") from None
    return [fault_from_dict(d) for d in items]
