"""Service registries: embedded (default), Consul and Eureka.

``open_registry(url, state_dir)`` turns a registry URL from mesh.yaml or the
command line into a :class:`~meshctl.registry.base.Registry`:

=================================== =======================================
``""`` / ``"embedded"``              :class:`EmbeddedRegistry` in ``state_dir``
``consul://127.0.0.1:8500``          :class:`ConsulRegistry` (HTTP API)
``consul+https://host:8501``         the same over HTTPS
``eureka://127.0.0.1:8761/eureka``   :class:`EurekaRegistry` (REST v2)
``eureka+https://host/eureka``       the same over HTTPS
=================================== =======================================

Nothing is contacted here: the URL is only parsed. ``await registry.ping()``
checks that the server answers and raises :class:`RegistryError` saying what
was tried when it does not.

Also here, shared by the remote registries: :class:`WatchState`, the
"last snapshot, reachable, last error" record that ``meshctl status`` shows,
and :func:`keep_alive_loop`, the heartbeat task a sidecar or supervisor runs
for each instance it registered.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

import trio

from ..model.base import FrozenDict
from .base import Instance, Registry, RegistryError, Snapshot

__all__ = [
    "Instance",
    "Registry",
    "RegistryError",
    "Snapshot",
    "WatchState",
    "Backoff",
    "keep_alive_loop",
    "make_snapshot",
    "open_registry",
    "parse_registry_url",
]

log = logging.getLogger("meshctl.registry")

_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


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

    async def snapshots(self):  # -> AsyncIterator[Snapshot]
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


# ---------------------------------------------------------------------------
# URL parsing


def _bad(url: str, why: str) -> RegistryError:
    return RegistryError(
        f"registry URL {url!r}: {why} (expected 'embedded', 'consul://HOST:PORT' or 'eureka://HOST:PORT/eureka')"
    )


def parse_registry_url(url: str) -> dict[str, Any]:
    """Split a registry URL into its kind and connection settings.

    Returns ``{"kind": "embedded"}`` or ``{"kind": "consul"|"eureka",
    "scheme": "http"|"https", "host": ..., "port": ..., "path": ...,
    "token": ...}``. Raises RegistryError naming the URL and the problem.
    """
    text = (url or "").strip()
    if text in ("", "embedded", "embedded://", "embedded:"):
        return {"kind": "embedded"}
    if "://" not in text:
        raise _bad(url, "no scheme" if ":" not in text else f"unknown scheme {text.split(':', 1)[0]!r}")
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    kinds = {
        "consul": ("consul", "http"),
        "consul+http": ("consul", "http"),
        "consul+https": ("consul", "https"),
        "eureka": ("eureka", "http"),
        "eureka+http": ("eureka", "http"),
        "eureka+https": ("eureka", "https"),
    }
    if scheme not in kinds:
        raise _bad(url, f"unknown scheme {scheme!r}")
    kind, http_scheme = kinds[scheme]
    if not rest:
        raise _bad(url, "no host")
    parts = urlsplit(f"{http_scheme}://{rest}")
    try:
        port = parts.port
    except ValueError:
        raise _bad(url, "the port is not a number between 1 and 65535") from None
    host = parts.hostname or ""
    if not host:
        raise _bad(url, "no host")
    if not (_HOST_RE.match(host) or (":" in host and re.fullmatch(r"[0-9A-Fa-f:.]+", host))):
        raise _bad(url, f"bad host {host!r}")
    if port == 0:
        raise _bad(url, "port 0 is not a valid server port")
    query = parse_qs(parts.query, keep_blank_values=True)
    token = query.pop("token", [None])[-1]
    if parts.username and not token:
        token = parts.username if not parts.password else parts.password
    if query:
        raise _bad(url, f"unknown query parameter(s) {', '.join(sorted(query))}")
    if parts.fragment:
        raise _bad(url, "a '#fragment' has no meaning here")
    if kind == "consul":
        if parts.path not in ("", "/"):
            raise _bad(url, f"a Consul URL has no path (got {parts.path!r})")
        return {
            "kind": "consul",
            "scheme": http_scheme,
            "host": host,
            "port": port or (8501 if http_scheme == "https" else 8500),
            "path": "",
            "token": token,
        }
    path = parts.path.rstrip("/") or "/eureka"
    return {
        "kind": "eureka",
        "scheme": http_scheme,
        "host": host,
        "port": port or 8761,
        "path": path,
        "token": token,
    }


def open_registry(url: str, state_dir: Path | str, *, token: str | None = None) -> Registry:
    """The registry named by ``url`` (see the module docstring).

    ``token``: Consul ACL token; defaults to ``?token=`` in the URL, then the
    ``CONSUL_HTTP_TOKEN`` environment variable. ``state_dir`` is only used by
    the embedded registry. Raises RegistryError for a malformed URL.
    """
    spec = parse_registry_url(url)
    if spec["kind"] == "embedded":
        from .embedded import EmbeddedRegistry

        return EmbeddedRegistry(Path(state_dir))
    if spec["kind"] == "consul":
        from .consul import ConsulRegistry

        tok = token or spec["token"] or os.environ.get("CONSUL_HTTP_TOKEN") or None
        return ConsulRegistry(
            host=spec["host"], port=spec["port"], scheme=spec["scheme"], token=tok, url=url.strip()
        )
    from .eureka import EurekaRegistry

    base = f"{spec['scheme']}://{_netloc(spec['host'], spec['port'])}{spec['path']}"
    return EurekaRegistry(base, url=url.strip())


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
