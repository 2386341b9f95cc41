"""The shared CA's view of Consul's KV store: get, put, list under a prefix, wait for a change.

One small class over py-consul (called directly: blocking, so async callers run
it in a thread), with every library exception turned into a CAError naming the
agent, the operation and the key. When the KV client of meshctl/registry lands
for the shared rules, this class is the one place to switch to it.

Layout under ``meshctl/<mesh>/ca/`` (``<mesh>`` is the mesh name, by default
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

import os
from dataclasses import dataclass

import requests

from .errors import CAError

__all__ = ["KV", "Entry", "kv_prefix", "open_kv"]


def kv_prefix(mesh: str) -> str:
    return f"meshctl/{mesh.strip('/')}/ca/"


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    modify_index: int


class KV:
    """Consul KV through one agent. ``url`` is the registry URL (consul://HOST:PORT)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 5.0) -> None:
        from ..registry import RegistryError, parse_registry_url

        try:
            spec = parse_registry_url(url)
        except RegistryError as exc:
            raise CAError(str(exc)) from None
        if spec["kind"] != "consul":
            raise CAError(
                f"registry {url!r}: the shared CA keeps its certificates in Consul's KV store; "
                "give a Consul registry (consul://HOST:PORT)"
            )
        import consul

        self.url = url
        self._consul = consul.Consul(host=spec["host"], port=spec["port"], scheme=spec["scheme"])
        tok = token or spec["token"] or os.environ.get("CONSUL_HTTP_TOKEN") or None
        if tok:
            self._consul.token = tok
        self._consul.http.connections_timeout = timeout

    def _call(self, what: str, fn):
        import consul

        try:
            return fn()
        except requests.exceptions.ConnectionError:
            raise CAError(f"{self.url}: {what}: cannot connect — is the Consul agent running?") from None
        except requests.exceptions.Timeout:
            raise CAError(f"{self.url}: {what}: no answer from Consul") from None
        except consul.ACLPermissionDenied as exc:
            raise CAError(
                f"{self.url}: {what}: permission denied by Consul ACLs — set CONSUL_HTTP_TOKEN to a token "
                f"allowed to do this ({' '.join(str(exc).split())[:200]})"
            ) from None
        except (consul.ConsulException, requests.exceptions.RequestException) as exc:
            raise CAError(f"{self.url}: {what}: {' '.join(str(exc).split())[:200]}") from None

    def get(self, key: str) -> Entry | None:
        _, data = self._call(f"read {key}", lambda: self._consul.kv.get(key))
        if not data:
            return None
        return Entry(data["Key"], data.get("Value") or b"", int(data.get("ModifyIndex") or 0))

    def put(self, key: str, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else value
        ok = self._call(f"write {key}", lambda: self._consul.kv.put(key, raw))
        if not ok:
            raise CAError(f"{self.url}: write {key}: Consul did not store it")

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self._consul.kv.delete(key))

    def list(self, prefix: str, *, index: int | None = None, wait: float | None = None) -> tuple[int, dict[str, Entry]]:
        """Every entry under ``prefix``; with ``index``, a blocking query that
        returns when something under it changed past ``index`` (or after ``wait``)."""
        w = None if wait is None else f"{max(1, int(wait))}s"

        def run():  # py-consul adds the wait to the request timeout
            return self._consul.kv.get(prefix, recurse=True, index=index, wait=w)

        idx, data = self._call(f"list {prefix}", run)
        out = {d["Key"]: Entry(d["Key"], d.get("Value") or b"", int(d.get("ModifyIndex") or 0)) for d in data or ()}
        return int(idx or 0), out


def open_kv(url: str) -> KV:
    return KV(url)
