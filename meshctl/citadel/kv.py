"""The shared CA's view of Consul's KV store: get, put, list under a prefix, wait for a change.

A thin face over meshctl/registry/consulkv.py (the KV client the shared rules
use too): blocking calls (async callers run them in a thread), every KVError
turned into a CAError naming the agent, the operation and the key.

Layout under ``meshctl/<meshId>/ca/`` (mesh.yaml's ``settings.meshId``, by default
its trust domain), described in docs/multi-host-ca.md:

    csr/<host>            PEM CSR of the host's intermediate key (written by the host)
    intermediate/<host>   JSON {"chain": PEM, "issued": iso}: the host's intermediate
                          and its issuers up to the root (written by the root holder)
    bundle                JSON {"roots": [PEM], "cross": [PEM], "generation": n}
                          (written by the root holder)
    hosts/<host>          JSON report of the host's Citadel: the intermediate it
                          signs with, the roots it trusts, when its last
                          certificate from an older intermediate expires
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CAError

__all__ = ["KV", "Entry", "kv_prefix", "open_kv"]


_MESH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as pilot/kvstore.py's


def kv_prefix(mesh: str) -> str:
    """Where a mesh's CA lives in KV: ``meshctl/<meshId>/ca/``, beside its rules (pilot/kvstore.py)."""
    if not _MESH_ID.match(mesh or ""):
        raise CAError(f"{mesh!r} is not a mesh id: letters, digits, '.', '_' and '-', 1-128 characters")
    return f"meshctl/{mesh}/ca/"


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    modify_index: int


class KV:
    """Consul KV through one agent. ``url`` is the registry URL (consul://HOST:PORT)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 5.0) -> None:
        from ..registry import RegistryError
        from ..registry.consulkv import ConsulKV

        try:
            self._kv = ConsulKV.from_url(url, token=token, request_timeout=timeout)
        except RegistryError as exc:
            raise CAError(
                f"{exc} (a multi-host mesh keeps its CA certificates in Consul's KV store)"
            ) from None
        self.url = self._kv.url  # any ?token= left out: it is not written into ca.json

    def _call(self, fn):
        from ..registry import RegistryError

        try:
            return fn()
        except RegistryError as exc:
            raise CAError(str(exc)) from None

    def get(self, key: str) -> Entry | None:
        e = self._call(lambda: self._kv.get(key))
        return None if e is None else Entry(e.key, e.value, e.modify_index)

    def put(self, key: str, value: bytes | str) -> None:
        if not self._call(lambda: self._kv.put(key, value)):
            raise CAError(f"{self.url}: write {key}: Consul did not store it")

    def delete(self, key: str) -> None:
        self._call(lambda: self._kv.delete(key))

    def list(self, prefix: str, *, index: int | None = None, wait: float | None = None) -> tuple[int, dict[str, Entry]]:
        """Every entry under ``prefix``; with ``index``, a blocking query that
        returns when something under it changed past ``index`` (or after ``wait``)."""
        if index:
            idx, items = self._call(lambda: self._kv.list_blocking(prefix, index, wait or 30.0))
        else:
            idx, items = self._call(lambda: self._kv.list_blocking(prefix, 0, 1.0))
        return int(idx or 0), {e.key: Entry(e.key, e.value, e.modify_index) for e in items}


def open_kv(url: str) -> KV:
    return KV(url)
