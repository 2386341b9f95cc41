"""Consul's key/value store, through py-consul: what meshctl keeps across hosts.

One small client over ``/v1/kv`` and ``/v1/txn``, used by the rule store
(pilot/kvstore.py) and the CA bundle (citadel/). Two faces, one behaviour:

* :class:`ConsulKV`: synchronous (the CLI), thread-safe (one py-consul client
  per thread);
* :class:`AsyncConsulKV`: the same methods as trio coroutines, each call run
  in a worker thread (blocking queries in a pool of their own, so a hundred
  watches do not starve short calls).

Operations (keys never start with ``/``; values are bytes, ``str`` is UTF-8)::

    get(key)                        -> Entry | None
    get_blocking(key, index, wait)  -> (index, Entry | None)   Consul blocking query
    list(prefix)                    -> [Entry]                 every key under prefix
    list_blocking(prefix, index, wait) -> (index, [Entry])
    keys(prefix)                    -> [str]
    put(key, value, cas=None)       -> bool   cas=0: only if absent; cas=N: only if
                                              ModifyIndex is N; False when refused
    delete(key, cas=None)           -> bool
    delete_prefix(prefix)           -> None
    txn([TxnOp, ...])               -> bool   all or nothing; False when a check
                                              (cas, check-index, check-not-exists) failed

Blocking queries follow Consul's rules: pass the index of the last answer and
a ``wait`` in seconds; the call returns when something under the key changed
or ``wait`` ran out (then with the same index). :func:`next_index` applies the
index hygiene Consul documents (an index that goes backwards means "start
again from 0"; an answer's index of 0 is taken as 1, so the next query blocks).

Errors are meshctl's own (all :class:`KVError`, a RegistryError): the agent
cannot be reached or does not answer in time (:class:`KVUnavailable`: callers
keep what they have and retry), ACLs refuse (:class:`KVPermissionDenied`), or
Consul refuses the request (:class:`KVError`). A failed check-and-set is not an
error: ``put``/``delete``/``txn`` return False.
"""

from __future__ import annotations

import base64
import json
import os
import builtins  # `list` below is also a method name of the KV clients
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence, TypeVar

import consul
import requests
import trio
from consul.callback import CB
from consul.exceptions import ACLPermissionDenied, ConsulException

from .base import RegistryError

__all__ = [
    "AsyncConsulKV",
    "ConsulKV",
    "Entry",
    "KVError",
    "KVPermissionDenied",
    "KVUnavailable",
    "TxnOp",
    "next_index",
]

T = TypeVar("T")

# Consul refuses values above 512 KiB (kv_max_value_size).
MAX_VALUE = 512 * 1024


class KVError(RegistryError):
    """Consul's KV store refused or failed a request; the message names the agent, the key and why."""


class KVUnavailable(KVError):
    """The agent could not be reached or did not answer in time."""


class KVPermissionDenied(KVError):
    """Consul ACLs refuse this token the operation."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    modify_index: int
    create_index: int = 0
    flags: int = 0

    @property
    def text(self) -> str:
        return self.value.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One operation of a transaction (Consul's KV txn verbs)."""

    verb: str
    key: str
    value: bytes | None = None
    index: int | None = None

    @classmethod
    def set(cls, key: str, value: bytes | str) -> "TxnOp":
        return cls("set", key, _bytes(value))

    @classmethod
    def cas(cls, key: str, value: bytes | str, index: int) -> "TxnOp":
        """Set only if the key's ModifyIndex is ``index`` (0: only if absent)."""
        return cls("cas", key, _bytes(value), index)

    @classmethod
    def check_index(cls, key: str, index: int) -> "TxnOp":
        return cls("check-index", key, None, index)

    @classmethod
    def check_not_exists(cls, key: str) -> "TxnOp":
        return cls("check-not-exists", key)

    @classmethod
    def delete(cls, key: str) -> "TxnOp":
        return cls("delete", key)

    @classmethod
    def delete_cas(cls, key: str, index: int) -> "TxnOp":
        return cls("delete-cas", key, None, index)

    def payload(self) -> dict[str, Any]:
        kv: dict[str, Any] = {"Verb": self.verb, "Key": self.key}
        if self.value is not None:
            kv["Value"] = base64.b64encode(self.value).decode("ascii")
        if self.index is not None:
            kv["Index"] = self.index
        return {"KV": kv}


def next_index(old: int, new: int | str | None) -> int:
    """The index for the next blocking query, given the last one and the answer's."""
    n = int(new or 0)
    if n < old:  # the agent's state was reset (a new dev agent, a snapshot restore)
        return 0
    return max(n, 1)


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _go_duration(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def _entry(d: dict[str, Any]) -> Entry:
    v = d.get("Value")
    if isinstance(v, str):
        v = v.encode("utf-8")
    return Entry(
        key=str(d["Key"]),
        value=v or b"",
        modify_index=int(d.get("ModifyIndex") or 0),
        create_index=int(d.get("CreateIndex") or 0),
        flags=int(d.get("Flags") or 0),
    )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConsulKV:
    """Synchronous KV client for one agent (see the module docstring).

    ``token``: ACL token; default ``CONSUL_HTTP_TOKEN``. ``request_timeout``:
    seconds for a short call; a blocking query may take ``wait`` plus this.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        scheme: str = "http",
        token: str | None = None,
        request_timeout: float = 5.0,
        url: str | None = None,
    ) -> None:
        self.host, self.port, self.scheme = host, port, scheme
        self.url = url or (f"consul://{host}:{port}" if scheme == "http" else f"consul+https://{host}:{port}")
        self._token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
        self.request_timeout = request_timeout
        self._local = threading.local()

    @classmethod
    def from_url(cls, url: str, *, token: str | None = None, request_timeout: float = 5.0) -> "ConsulKV":
        """A client for ``consul://HOST:PORT`` (or ``consul+https://``, ``?token=``)."""
        from . import parse_registry_url

        spec = parse_registry_url(url)
        if spec["kind"] != "consul":
            raise KVError(f"{url!r} is not a Consul URL: Consul's KV store needs consul://HOST:PORT")
        return cls(spec["host"], spec["port"], scheme=spec["scheme"], token=token or spec["token"],
                   request_timeout=request_timeout, url=_redact(url))

    # -- reading ------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        _, d = self._call(f"read {key!r}", lambda c: c.kv.get(_key(key)))
        return _entry(d) if d else None

    def get_blocking(self, key: str, index: int, wait: float) -> tuple[int, Entry | None]:
        idx, d = self._call(
            f"watch {key!r}", lambda c: c.kv.get(_key(key), index=index or None, wait=_go_duration(wait)),
        )
        return int(idx or 0), (_entry(d) if d else None)

    def list(self, prefix: str) -> list[Entry]:
        _, items = self._call(f"list {prefix!r}", lambda c: c.kv.get(_key(prefix), recurse=True))
        return [_entry(d) for d in items or ()]

    def list_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, builtins.list[Entry]]:
        idx, items = self._call(
            f"watch {prefix!r}",
            lambda c: c.kv.get(_key(prefix), recurse=True, index=index or None, wait=_go_duration(wait)),
        )
        return int(idx or 0), [_entry(d) for d in items or ()]

    def keys(self, prefix: str) -> builtins.list[str]:
        _, items = self._call(f"list keys {prefix!r}", lambda c: c.kv.get(_key(prefix), keys=True))
        return [str(k) for k in items or ()]

    # -- writing ------------------------------------------------------------------

    def put(self, key: str, value: bytes | str, *, cas: int | None = None) -> bool:
        data = _bytes(value)
        self._check_size(key, data)
        return bool(self._call(f"write {key!r}", lambda c: c.kv.put(_key(key), data, cas=cas)))

    def delete(self, key: str, *, cas: int | None = None) -> bool:
        return bool(self._call(f"delete {key!r}", lambda c: c.kv.delete(_key(key), cas=cas)))

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise KVError(f"{self.url}: refusing to delete every key (empty prefix)")
        self._call(f"delete {prefix!r}", lambda c: c.kv.delete(_key(prefix), recurse=True))

    def txn(self, ops: Sequence[TxnOp]) -> bool:
        """Run ``ops`` atomically; False (nothing written) when one of its checks failed."""
        if not ops:
            return True
        for op in ops:
            if op.value is not None:
                self._check_size(op.key, op.value)
        payload = json.dumps([op.payload() for op in ops])

        def do(c: consul.Consul) -> bool:
            def cb(resp: Any) -> bool:
                if resp.code == 409:  # a check failed: rolled back
                    return False
                CB._status(resp)
                return True

            return c.http.put(cb, "/v1/txn", headers=c.prepare_headers(), data=payload)

        return self._call(f"transaction on {', '.join(sorted({op.key for op in ops}))[:200]}", do)

    # -- plumbing -----------------------------------------------------------------

    def _check_size(self, key: str, data: bytes) -> None:
        if len(data) > MAX_VALUE:
            raise KVError(f"{self.url}: {key!r}: {len(data)} bytes is more than Consul's KV limit of {MAX_VALUE}")

    def _client(self) -> consul.Consul:
        client = getattr(self._local, "client", None)
        if client is None:
            client = consul.Consul(host=self.host, port=self.port, scheme=self.scheme)
            if self._token:
                client.token = self._token
            client.http.connections_timeout = self.request_timeout
            self._local.client = client
        return client

    def _call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        client = self._client()
        try:
            return fn(client)
        except requests.exceptions.ConnectionError as exc:
            raise KVUnavailable(f"{self.url}: {what}: cannot connect ({_reason(exc)}) — is the Consul agent running?") from exc
        except requests.exceptions.Timeout as exc:
            raise KVUnavailable(f"{self.url}: {what}: no answer within {self.request_timeout:g}s") from exc
        except ACLPermissionDenied as exc:
            raise KVPermissionDenied(
                f"{self.url}: {what}: permission denied by Consul ACLs — set CONSUL_HTTP_TOKEN or ?token= to a "
                f"token with key_prefix write access ({_short(exc)})") from exc
        except ConsulException as exc:
            text = _short(exc)
            if text.startswith("500") and ("No cluster leader" in text or "rpc error" in text):
                raise KVUnavailable(f"{self.url}: {what}: Consul has no leader ({text})") from exc
            raise KVError(f"{self.url}: {what}: Consul refused: {text}") from exc
        except requests.exceptions.RequestException as exc:
            raise KVUnavailable(f"{self.url}: {what}: {_short(exc)}") from exc


class AsyncConsulKV:
    """:class:`ConsulKV`'s methods as trio coroutines (worker threads; cancellable)."""

    def __init__(self, kv: ConsulKV, *, blocking_limit: int = 64) -> None:
        self.kv = kv
        self.url = kv.url
        self._blocking = trio.CapacityLimiter(blocking_limit)

    async def _run(self, fn: Callable[[], T], *, blocking: bool = False) -> T:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True, limiter=self._blocking if blocking else None)

    async def get(self, key: str) -> Entry | None:
        return await self._run(partial(self.kv.get, key))

    async def get_blocking(self, key: str, index: int, wait: float) -> tuple[int, Entry | None]:
        return await self._run(partial(self.kv.get_blocking, key, index, wait), blocking=True)

    async def list(self, prefix: str) -> list[Entry]:
        return await self._run(partial(self.kv.list, prefix))

    async def list_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, builtins.list[Entry]]:
        return await self._run(partial(self.kv.list_blocking, prefix, index, wait), blocking=True)

    async def keys(self, prefix: str) -> builtins.list[str]:
        return await self._run(partial(self.kv.keys, prefix))

    async def put(self, key: str, value: bytes | str, *, cas: int | None = None) -> bool:
        return await self._run(partial(self.kv.put, key, value, cas=cas))

    async def delete(self, key: str, *, cas: int | None = None) -> bool:
        return await self._run(partial(self.kv.delete, key, cas=cas))

    async def delete_prefix(self, prefix: str) -> None:
        await self._run(partial(self.kv.delete_prefix, prefix))

    async def txn(self, ops: Sequence[TxnOp]) -> bool:
        return await self._run(partial(self.kv.txn, list(ops)))


def _key(key: str) -> str:
    if key.startswith("/"):
        raise KVError(f"KV key {key!r} starts with '/': Consul keys are relative")
    return key


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if "Name or service not known" in text or "NameResolution" in text:
        return "host name not found"
    if "timed out" in text.lower():
        return "connect timed out"
    return _short(exc)


def _redact(url: str) -> str:
    """The URL without an ACL token, for messages."""
    import re

    return re.sub(r"(token=)[^&]*", r"\1***", re.sub(r"//[^@/]*@", "//***@", url.strip()))
