"""Test helpers for registries: consume a registry's watch() in the background and
wait for the snapshot a test expects, without ever cancelling the watch generator;
and the instances and unique service names the registry tests register."""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio

from meshctl.model.base import FrozenDict
from meshctl.registry.base import Instance, Snapshot

_names = itertools.count()


def unique(prefix: str) -> str:
    """A service name no earlier test of this run used (the registries are shared)."""
    return f"{prefix}{next(_names)}"


def inst(iid: str, service: str, port: int = 9080, **labels: str) -> Instance:
    return Instance(id=iid, service=service, address="127.0.0.1", port=port, labels=FrozenDict(labels))


class Watching:
    def __init__(self, registry) -> None:
        self.registry = registry
        self.history: list[Snapshot] = []
        self._changed = trio.Event()

    async def _run(self) -> None:
        async for snap in self.registry.watch():
            self.history.append(snap)
            self._changed.set()
            self._changed = trio.Event()

    @property
    def latest(self) -> Snapshot | None:
        return self.history[-1] if self.history else None

    async def until(self, predicate: Callable[[Snapshot], bool], timeout: float = 15.0) -> Snapshot:
        """The latest snapshot once ``predicate`` holds for it; fails after ``timeout`` seconds."""
        try:
            with trio.fail_after(timeout):
                while not (self.history and predicate(self.history[-1])):
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError(
                f"no matching snapshot within {timeout:g}s; latest: {self.latest!r}"
            ) from None
        return self.history[-1]


@asynccontextmanager
async def watching(registry) -> AsyncIterator[Watching]:
    w = Watching(registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w._run)
        yield w
        nursery.cancel_scope.cancel()


def ids(snap: Snapshot | None, service: str) -> list[str]:
    return [i.id for i in (snap or {}).get(service, ())]
