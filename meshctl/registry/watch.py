"""What the remote registries share: snapshots, backoff, the watch loop and keep-alives.

- :func:`make_snapshot`: service → its instances, immutable and comparable;
- :class:`Backoff`: exponential backoff with injected jitter for reconnect loops;
- :class:`WatchState`, :class:`BackgroundWatcher`, :class:`WatchedRegistry`: the
  "last snapshot, reachable, last error" record that ``meshctl status`` shows, and
  the one refresh task per registry client that keeps it current;
- :func:`keep_alive_loop`: the heartbeat task for an instance someone registered.

The backends (consul, eureka, embedded) import these from here, and the package's
``__init__`` picks a backend: so the package and its backends import no circle.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, AsyncIterator, Mapping

import trio

from ..model.base import FrozenDict
from .base import Instance, Registry, RegistryError, Snapshot

log = logging.getLogger("meshctl.registry")

__all__ = ["EMPTY_SNAPSHOT", "Backoff", "BackgroundWatcher", "WatchState", "WatchedRegistry", "keep_alive_loop",
           "make_snapshot"]


def make_snapshot(instances: Mapping[str, list[Instance]] | Mapping[str, tuple[Instance, ...]]) -> Snapshot:
    """service → its instances sorted by id, as an immutable, comparable mapping."""
    return FrozenDict(
        (service, tuple(sorted(items, key=lambda i: i.id))) for service, items in sorted(instances.items())
    )


EMPTY_SNAPSHOT: Snapshot = FrozenDict()


class Backoff:
    """Exponential backoff with jitter for reconnect loops.

    ``next()`` returns how long to wait before the next try; ``reset()`` after
    a success. The random source is injected so that tests can fix it.
    """

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._current = initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * 2)
        # ±20 % jitter so that many sidecars do not retry in lockstep.
        return delay * (0.8 + 0.4 * self._rng.random())

    def reset(self) -> None:
        self._current = self.initial


class WatchState:
    """The latest view of a remote registry, shared by all ``watch()`` callers.

    A background task (one per registry object, started by the first watcher
    and stopped when the last watcher leaves or on ``aclose()``) keeps it up
    to date; watchers wait on :meth:`changed`.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None  # None until the first successful fetch
        self.reachable: bool = False
        self.last_error: str = ""
        self.version = 0
        self._event = trio.Event()

    def publish(self, snapshot: Snapshot) -> None:
        self.reachable = True
        self.last_error = ""
        if snapshot != self.snapshot:
            self.snapshot = snapshot
            self._bump()

    def ok(self) -> None:
        """The server answered (whatever the snapshot)."""
        if not self.reachable:
            self.reachable = True
            self.last_error = ""
            self._bump()

    def fail(self, error: str) -> None:
        changed = self.reachable or error != self.last_error
        self.reachable = False
        self.last_error = error
        if changed:
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, version: int) -> None:
        """Return once ``self.version`` differs from ``version``."""
        while self.version == version:
            await self._event.wait()


class WatchedRegistry:
    """``reachable`` and ``last_error`` (what `meshctl status` shows) of a registry
    client whose watch loop runs in ``self._watcher`` (a BackgroundWatcher)."""

    _watcher: "BackgroundWatcher"

    @property
    def reachable(self) -> bool:
        return self._watcher.state.reachable

    @property
    def last_error(self) -> str:
        return self._watcher.state.last_error


class BackgroundWatcher:
    """Runs one registry's refresh loop while anyone is watching.

    ``watch()`` is an async generator, and an async generator must not hold a
    nursery open across ``yield``; so the loop runs as a trio system task with
    its own cancel scope, cancelled when the last watcher goes away (its
    ``finally`` runs on ``aclose()`` or when trio finalizes the generator).
    """

    def __init__(self, name: str, run: Any) -> None:
        self._name = name
        self._run = run  # async callable(state) that never returns normally
        self.state = WatchState()
        self._users = 0
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None

    def _start(self) -> None:
        if self._scope is not None:
            return
        scope = trio.CancelScope()
        done = trio.Event()
        self._scope, self._done = scope, done

        async def runner() -> None:
            # A system task must never raise, and a watch must never end: an
            # unexpected error (a server answering nonsense, say) is recorded
            # as last_error and the loop starts over after a pause.
            backoff = Backoff(initial=0.5, maximum=10.0)
            try:
                with scope:
                    while True:
                        try:
                            await self._run(self.state)
                        except Exception as exc:
                            log.exception("%s: watch loop failed; restarting it", self._name)
                            self.state.fail(f"{self._name}: watch loop failed: {type(exc).__name__}: {exc}")
                        await trio.sleep(backoff.next())
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    log.exception("%s: watch loop stopped", self._name)
            finally:
                done.set()

        trio.lowlevel.spawn_system_task(runner, name=f"{self._name} watch")

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        self._users += 1
        self._start()
        last: Snapshot | None = None
        try:
            while True:
                version = self.state.version
                snap = self.state.snapshot
                if snap is not None and snap != last:
                    last = snap
                    yield snap
                    continue
                await self.state.wait_past(version)
        finally:
            self._users -= 1
            if self._users == 0:
                self.stop()

    async def aclose(self) -> None:
        self.stop()
        done = self._done
        if done is not None:
            with trio.move_on_after(5):
                await done.wait()


async def keep_alive_loop(registry: Registry, instance_id: str, interval: float | None = None) -> None:
    """Call ``registry.keep_alive(instance_id)`` forever, every ``interval``
    seconds (default: the registry's own ``keepalive_interval``). Failures are
    logged and retried on the next tick; they never end the loop."""
    period = interval if interval is not None else float(getattr(registry, "keepalive_interval", 5.0))
    if not math.isfinite(period) or period <= 0:
        raise ValueError(f"keep-alive interval must be a positive number of seconds, not {period!r}")
    while True:
        try:
            await registry.keep_alive(instance_id)
        except RegistryError as exc:
            log.warning("keep-alive for %s failed: %s", instance_id, exc)
        await trio.sleep(period)
