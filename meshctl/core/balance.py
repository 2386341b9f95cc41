"""Endpoint selection: the DestinationRule's loadBalancer, per cluster.

Pure: the random source is passed in, in-flight counts come in the
``PickContext``. ``make_balancer`` is called once per cluster (and again when
the cluster's traffic policy changes); the balancer it returns may keep state
between picks (round-robin position, smooth-weight credits, hash tables).

Rules:

- The endpoints passed to ``pick`` are already the eligible ones (healthy,
  not ejected); an empty list gives None.
- ``Endpoint.weight`` is honoured by every policy (weights below 1 count as 1).
- ROUND_ROBIN (also unset, UNSPECIFIED): starts at a random position (so that
  proxies do not all hit the same first host), then takes endpoints in turn.
  With unequal weights it is smooth weighted round robin: every pick each
  endpoint earns its weight, the richest is picked and pays the total, so
  a 2:1 pair goes a, b, a, a, b, a ... never a long run of one host.
- LEAST_REQUEST and LEAST_CONN (deprecated alias in Istio): power of two
  choices: two distinct endpoints drawn at random (by weight), the one with
  fewer in-flight requests per unit of weight wins; a tie goes to the first.
- RANDOM: weighted random.
- PASSTHROUGH (forward to the caller's original destination) needs captured
  original addresses, which meshctl's proxies do not have: it behaves as
  ROUND_ROBIN.
- consistentHash: the key is the value of ``httpHeaderName`` (all values,
  joined with ","), the cookie ``httpCookie.name``, the source IP
  (``useSourceIp``) or the first value of ``httpQueryParameterName``. Tables:
  ``ringHash`` (``minimumRingSize``, default 1024; also the deprecated
  top-level ``minimumRingSize``) or ``maglev`` (``tableSize``, prime, default
  65537); ring hash when neither is given. A request without the key is
  balanced at random (Envoy would generate a cookie when ``httpCookie.ttl``
  is set; meshctl does not).
- Retries: hosts in ``PickContext.avoid`` (already tried) are avoided by
  picking again, up to 5 times (Istio's default retry host predicate), then,
  if each pick still hit a tried host, by picking among the untried ones: a
  retry never goes back to a tried host while another is eligible; consistent
  hashing ignores ``avoid``, as Istio does with a hash policy.
- ``warmupDurationSecs`` (slow start) is not implemented: new endpoints get
  their full share at once.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from .errors import CoreConfigError
from ..model.base import EMPTY, HeaderList
from ..model.istio import ConsistentHashLB, LoadBalancerSettings
from ..model.proxyconfig import Endpoint
from .hashring import DEFAULT_MAGLEV_SIZE, DEFAULT_RING_SIZE, Maglev, Ring, hash64, is_prime

__all__ = [
    "Balancer",
    "PickContext",
    "BalanceConfigError",
    "RoundRobin",
    "RandomBalancer",
    "LeastRequest",
    "ConsistentHash",
    "make_balancer",
]


class BalanceConfigError(CoreConfigError):
    """A load balancer setting that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class PickContext:
    headers: Sequence[tuple[str, str]] = ()  # the request's HeaderList (read only)
    source_ip: str = ""
    path: str = "/"  # path and query
    active: Mapping[tuple[str, int], int] = EMPTY  # in-flight requests per (address, port)
    # (address, port) of hosts already tried for this request: a retry picks
    # again (up to 5 times) to avoid them, like Istio's previous_hosts predicate
    avoid: frozenset[tuple[str, int]] = frozenset()


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None: ...


def _w(ep: Endpoint) -> int:
    w = ep.weight
    return w if w > 1 else 1


def _uniform(endpoints: Sequence[Endpoint]) -> bool:
    first = _w(endpoints[0])
    for ep in endpoints:
        if _w(ep) != first:
            return False
    return True


def _weighted_index(endpoints: Sequence[Endpoint], rand: random.Random) -> int:
    cum: list[int] = []
    total = 0
    for ep in endpoints:
        total += _w(ep)
        cum.append(total)
    return bisect_right(cum, rand.randrange(total))


def _random_pick(endpoints: Sequence[Endpoint], rand: random.Random) -> Endpoint:
    if _uniform(endpoints):
        return endpoints[rand.randrange(len(endpoints))]
    return endpoints[_weighted_index(endpoints, rand)]


_REPICKS = 5


class _Avoiding:
    """``pick`` with the retry host predicate around each policy's ``_pick``, which
    is only asked to choose among two endpoints or more."""

    __slots__ = ()

    def _pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        raise NotImplementedError

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        if len(endpoints) < 2:
            return endpoints[0] if endpoints else None
        ep = self._pick(endpoints, ctx, rand)
        avoid = ctx.avoid
        if avoid and ep is not None:
            for _ in range(_REPICKS):
                if ep is None or (ep.address, ep.port) not in avoid:
                    return ep
                ep = self._pick(endpoints, ctx, rand)
            if ep is not None and (ep.address, ep.port) in avoid:
                rest = [e for e in endpoints if (e.address, e.port) not in avoid]
                if rest:
                    ep = self._pick(rest, ctx, rand) if len(rest) > 1 else rest[0]
        return ep


def takes_lone_endpoint(balancer: Balancer) -> bool:
    """Does ``balancer`` pick a lone endpoint without looking at the request or
    drawing a random number? (Then a caller may take it without a PickContext.)"""
    return isinstance(balancer, _Avoiding)


class RoundRobin(_Avoiding):
    """Round robin; smooth weighted round robin when weights differ."""

    __slots__ = ("_next", "_credit")

    def __init__(self) -> None:
        self._next: int | None = None
        self._credit: dict[tuple[str, int], int] = {}

    def _pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        n = len(endpoints)
        if _uniform(endpoints):
            i = self._next
            if i is None:
                i = rand.randrange(n)
            ep = endpoints[i % n]
            self._next = (i + 1) % n
            return ep
        credit = self._credit
        if len(credit) > 2 * n:  # forget endpoints that left
            keep = {(ep.address, ep.port) for ep in endpoints}
            for k in [k for k in credit if k not in keep]:
                del credit[k]
        total = 0
        best: Endpoint | None = None
        best_key: tuple[str, int] = ("", 0)
        best_credit = 0
        for ep in endpoints:
            w = _w(ep)
            total += w
            key = (ep.address, ep.port)
            c = credit.get(key, 0) + w
            credit[key] = c
            if best is None or c > best_credit:
                best, best_key, best_credit = ep, key, c
        credit[best_key] = best_credit - total
        return best


class RandomBalancer(_Avoiding):
    __slots__ = ()

    def _pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        return _random_pick(endpoints, rand)


class LeastRequest(_Avoiding):
    """Power of two choices on in-flight requests (per unit of weight)."""

    __slots__ = ()

    def _pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        n = len(endpoints)
        if _uniform(endpoints):
            i = rand.randrange(n)
            j = rand.randrange(n - 1)
            if j >= i:
                j += 1
        else:
            i = _weighted_index(endpoints, rand)
            j = i
            for _ in range(8):  # a heavy endpoint may be drawn again; try a few times
                j = _weighted_index(endpoints, rand)
                if j != i:
                    break
            else:
                j = (i + 1 + rand.randrange(n - 1)) % n
        a, b = endpoints[i], endpoints[j]
        active = ctx.active
        load_a = (active.get((a.address, a.port), 0) + 1) / _w(a)
        load_b = (active.get((b.address, b.port), 0) + 1) / _w(b)
        return b if load_b < load_a else a


# ---------------------------------------------------------------- consistent hash


def _header_key(name: str) -> Callable[[PickContext], str | None]:
    lname = name.lower()

    def key(ctx: PickContext) -> str | None:
        values = [v for k, v in ctx.headers if k == lname]
        return ",".join(values) if values else None

    return key


def _cookie_key(name: str) -> Callable[[PickContext], str | None]:
    def key(ctx: PickContext) -> str | None:
        for k, v in ctx.headers:
            if k != "cookie":
                continue
            for part in v.split(";"):
                cname, eq, cvalue = part.strip().partition("=")
                if eq and cname == name:
                    return cvalue
        return None

    return key


def _source_ip_key(ctx: PickContext) -> str | None:
    return ctx.source_ip or None


def _query_key(name: str) -> Callable[[PickContext], str | None]:
    def key(ctx: PickContext) -> str | None:
        _, sep, query = ctx.path.partition("?")
        if not sep:
            return None
        for part in query.partition("#")[0].split("&"):
            k, _, v = part.partition("=")
            if k == name:
                return v
        return None

    return key


class ConsistentHash:
    """Ring hash or Maglev over a hash of one request attribute."""

    _TABLES = 8  # host sets remembered (ejections come and go)

    __slots__ = ("_key", "_build", "_tables", "describe")

    def __init__(self, key: Callable[[PickContext], str | None], build: Callable[[list[tuple[str, int]]], Ring | Maglev], describe: str) -> None:
        self._key = key
        self._build = build
        self._tables: OrderedDict[tuple[tuple[str, int, int], ...], Ring | Maglev] = OrderedDict()
        self.describe = describe

    def _table(self, endpoints: Sequence[Endpoint]) -> Ring | Maglev:
        ident = tuple((ep.address, ep.port, _w(ep)) for ep in endpoints)
        tables = self._tables
        table = tables.get(ident)
        if table is None:
            table = self._build([(f"{a}:{p}", w) for a, p, w in ident])
            tables[ident] = table
            if len(tables) > self._TABLES:
                tables.popitem(last=False)
        else:
            tables.move_to_end(ident)
        return table

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext, rand: random.Random) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        key = self._key(ctx)
        if key is None:
            return _random_pick(endpoints, rand)
        if n == 1:
            return endpoints[0]
        return endpoints[self._table(endpoints).lookup(hash64(key))]


def _consistent_hash(ch: ConsistentHashLB) -> ConsistentHash:
    keys: list[tuple[str, Callable[[PickContext], str | None]]] = []
    if ch.http_header_name:
        keys.append((f"header {ch.http_header_name!r}", _header_key(ch.http_header_name)))
    if ch.http_cookie is not None:
        if not ch.http_cookie.name:
            raise BalanceConfigError("consistentHash.httpCookie.name is empty")
        keys.append((f"cookie {ch.http_cookie.name!r}", _cookie_key(ch.http_cookie.name)))
    if ch.use_source_ip:
        keys.append(("source IP", _source_ip_key))
    if ch.http_query_parameter_name:
        keys.append((f"query parameter {ch.http_query_parameter_name!r}", _query_key(ch.http_query_parameter_name)))
    if len(keys) != 1:
        given = ", ".join(d for d, _ in keys) or "none"
        raise BalanceConfigError(
            "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, "
            f"httpQueryParameterName; got {given}"
        )
    describe, key = keys[0]
    if ch.ring_hash is not None and ch.maglev is not None:
        raise BalanceConfigError("consistentHash sets both ringHash and maglev")
    if ch.maglev is not None:
        size = ch.maglev.table_size or DEFAULT_MAGLEV_SIZE
        if not is_prime(size):
            raise BalanceConfigError(f"consistentHash.maglev.tableSize must be prime, got {size}")
        return ConsistentHash(key, lambda hosts: Maglev(hosts, size), f"maglev({size}) on {describe}")
    ring_size = (ch.ring_hash.minimum_ring_size if ch.ring_hash else None) or ch.minimum_ring_size or DEFAULT_RING_SIZE
    if ring_size < 1:
        raise BalanceConfigError(f"consistentHash minimumRingSize must be positive, got {ring_size}")
    return ConsistentHash(key, lambda hosts: Ring(hosts, ring_size), f"ring({ring_size}) on {describe}")


_SIMPLE: dict[str, Callable[[], Balancer]] = {
    "UNSPECIFIED": RoundRobin,
    "ROUND_ROBIN": RoundRobin,
    "PASSTHROUGH": RoundRobin,
    "RANDOM": RandomBalancer,
    "LEAST_REQUEST": LeastRequest,
    "LEAST_CONN": LeastRequest,
}


def make_balancer(lb: LoadBalancerSettings | None) -> Balancer:
    """A fresh balancer (with its own state) for one cluster."""
    if lb is None:
        return RoundRobin()
    if lb.consistent_hash is not None:
        if lb.simple is not None and lb.simple != "UNSPECIFIED":
            raise BalanceConfigError(f"loadBalancer sets both simple ({lb.simple}) and consistentHash")
        return _consistent_hash(lb.consistent_hash)
    simple = lb.simple or "ROUND_ROBIN"
    factory = _SIMPLE.get(simple)
    if factory is None:
        raise BalanceConfigError(f"loadBalancer.simple {simple!r} is not one of {', '.join(_SIMPLE)}")
    return factory()
