"""The one small interface every registry implements.

A registry knows service instances (what `up` registers for each workload:
its sidecar's inbound address) and tells watchers which instances of every
service are healthy now, as whole snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Mapping, Protocol

from ..model.base import EMPTY, FrozenDict


@dataclass(frozen=True, slots=True)
class Instance:
    id: str  # unique instance id, e.g. "reviews-v2-0"
    service: str  # short service name, "reviews"
    address: str  # where the mesh reaches it (the sidecar's inbound listener)
    port: int
    labels: FrozenDict[str, str] = EMPTY  # app, version, ...
    healthy: bool = True
    draining: bool = False
    meta: FrozenDict[str, str] = EMPTY  # registry-specific extras (meshctl.io/... keys)


Snapshot = Mapping[str, tuple[Instance, ...]]
"""service name → its healthy instances, sorted by id."""


class RegistryError(Exception):
    """The registry could not be reached or refused a call; the message names
    the registry URL and what was tried."""


class Registry(Protocol):
    url: str

    async def register(self, instance: Instance) -> None: ...

    async def deregister(self, instance_id: str) -> None: ...

    async def keep_alive(self, instance_id: str) -> None:
        """Heartbeat / TTL pass. A no-op for registries with their own checks."""
        ...

    async def set_draining(self, instance_id: str) -> None:
        """Take the instance out of rotation before it stops (Eureka OUT_OF_SERVICE)."""
        ...

    def watch(self) -> AsyncIterator[Snapshot]:
        """Yield a snapshot now and after every change, forever. Survives the
        registry going away: raises nothing, keeps retrying with backoff, and
        yields again when it is back."""
        ...

    async def aclose(self) -> None: ...
