"""The embedded registry, seen from outside the control plane.

The embedded registry lives inside Pilot's process (Pilot owns its file in
the state directory); the supervisor registers instances through Pilot's
HTTP API, with the mesh credential. Same Registry interface as Consul and
Eureka, so `up` does not care which one it talks to. A keep-alive Pilot
answers with "unknown instance" (deleted behind our back, or lost) registers
the instance again, as the Consul client does.
"""

from __future__ import annotations

from typing import AsyncIterator

import httpx

from ..loopback import plain_http_client
import trio

from ..loader.codec import from_data, to_data
from ..credentials import bearer
from ..registry.base import Instance, RegistryError, Snapshot


class InstanceUnknown(RegistryError):
    """Pilot does not know the instance (deleted, or lost)."""


class PilotRegistry:
    def __init__(self, pilot_url: str, ttl: float | None = 15.0, *, credential: str = "") -> None:
        self.url = pilot_url
        self.ttl = ttl
        self.reachable = True
        self.last_error = ""
        self._registered: dict[str, Instance] = {}
        self._client = plain_http_client(base_url=pilot_url, timeout=5.0,
                                         headers=bearer(credential) if credential else None)

    async def _call(self, method: str, path: str, json: object = None) -> httpx.Response:
        try:
            r = await self._client.request(method, path, json=json)
        except httpx.HTTPError as e:
            self.reachable, self.last_error = False, f"{self.url}: {e.__class__.__name__}: {e}"
            raise RegistryError(f"embedded registry via Pilot at {self.url}: {e.__class__.__name__}: {e}") from e
        if r.status_code == 404 and "unknown-instance" in r.text:
            raise InstanceUnknown(f"embedded registry via Pilot at {self.url}: {method} {path}: {r.text.strip()}")
        if r.status_code >= 400:
            raise RegistryError(f"embedded registry via Pilot at {self.url}: {method} {path}: {r.status_code} {r.text.strip()}")
        self.reachable, self.last_error = True, ""
        return r

    async def register(self, instance: Instance) -> None:
        await self._call("PUT", f"/v1/registry/instances/{instance.id}", {"instance": to_data(instance), "ttl": self.ttl})
        self._registered[instance.id] = instance

    async def deregister(self, instance_id: str) -> None:
        self._registered.pop(instance_id, None)
        await self._call("DELETE", f"/v1/registry/instances/{instance_id}")

    async def keep_alive(self, instance_id: str) -> None:
        try:
            await self._call("POST", f"/v1/registry/instances/{instance_id}/heartbeat")
        except InstanceUnknown:
            inst = self._registered.get(instance_id)
            if inst is None:
                raise
            await self.register(inst)

    async def set_draining(self, instance_id: str) -> None:
        await self._call("POST", f"/v1/registry/instances/{instance_id}/drain")

    async def snapshot(self) -> Snapshot:
        data = (await self._call("GET", "/v1/registry")).json()
        return {s: tuple(from_data(Instance, i) for i in insts) for s, insts in data.items()}

    async def watch(self) -> AsyncIterator[Snapshot]:
        last = None
        while True:
            try:
                snap = await self.snapshot()
                if snap != last:
                    last = snap
                    yield snap
            except RegistryError:
                pass
            await trio.sleep(1.0)

    async def aclose(self) -> None:
        await self._client.aclose()
