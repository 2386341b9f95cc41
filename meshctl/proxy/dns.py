"""Upstream name resolution with a TTL-respecting cache (core/dnscache.py).

``lookup`` serves connections (stream.connect_tcp): from the cache when the
name is there, else one resolution now, which the cache keeps. ``refresh``
runs beside the proxy's listeners and resolves names whose TTL ran out, so
requests do not wait on DNS once a name is known. Addresses come from the
system resolver (getaddrinfo: /etc/hosts first, as every program on the host
sees them); the TTL from the DNS answer for the name (dnspython), when DNS
has one.
"""

from __future__ import annotations

import logging
import socket

import meshctl.proxy.aio as aio
from ..core.dnscache import DnsCache

log = logging.getLogger("meshctl.proxy")

CACHE = DnsCache()
REFRESH_EVERY = 0.5  # seconds between looks for expired names
TTL_QUERY_TIMEOUT = 2.0


async def _addresses(host: str) -> tuple[str, ...]:
    res = await aio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(r[4][0]) for r in res))


async def dns_ttl(host: str, nameservers: list[str] | None = None, port: int = 53) -> float | None:
    """The TTL DNS gives ``host`` (A, else AAAA records), None when DNS has no answer.
    dnspython's blocking resolver, in a worker thread (its async one runs on trio or
    asyncio only; the sidecar's runtime is proxy/aio.py's)."""
    return await aio.run_sync_in_thread(_dns_ttl, host, nameservers, port)


def _dns_ttl(host: str, nameservers: list[str] | None, port: int) -> float | None:
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=nameservers is None)
    if nameservers is not None:
        resolver.nameservers = nameservers
        resolver.port = port
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(host, rdtype, lifetime=TTL_QUERY_TIMEOUT, search=False)
        except (dns.exception.DNSException, OSError):
            continue
        if answer.rrset is not None:
            return float(answer.rrset.ttl)
    return None


async def _resolve(host: str, now: float, with_ttl: bool) -> tuple[str, ...]:
    try:
        addrs = await _addresses(host)
    except OSError as exc:
        CACHE.fail(host, str(exc), now)
        raise
    ttl = None
    if with_ttl:
        try:
            ttl = await dns_ttl(host)
        except Exception as exc:  # pragma: no cover - dnspython trouble never breaks resolution
            log.debug("no TTL for %s: %s", host, exc)
    CACHE.put(host, addrs, ttl, now)
    return addrs


async def lookup(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) to try for ``host:port``. Raises OSError when it does not resolve."""
    addrs = CACHE.get(host, aio.current_time())
    if addrs is None:
        addrs = await _resolve(host, aio.current_time(), with_ttl=False)  # first use: the TTL comes with the refresh
    return [(socket.AF_INET6 if ":" in a else socket.AF_INET, (a, port)) for a in addrs]


async def refresh() -> None:
    """Resolve expired names again, forever (run it in the proxy's nursery)."""
    while True:
        # no names cached: none can be due before min_ttl after it is added, so one look
        # a min_ttl (1 s) finds it as soon as looking every REFRESH_EVERY would (fewer wake-ups)
        await aio.sleep(REFRESH_EVERY if CACHE.entries else max(REFRESH_EVERY, CACHE.min_ttl))
        for host in CACHE.due(aio.current_time()):
            try:
                await _resolve(host, aio.current_time(), with_ttl=True)
            except OSError as exc:
                log.info("DNS refresh of %s failed: %s (keeping the last answer)", host, exc)


async def upstream_address(host: str, mode: str) -> str:
    """The address a request to an endpoint given by name connects to, by the
    cluster's resolution ``mode`` ("DNS": every resolved address in turn, so each
    is an endpoint of its own and gets its own pooled connections;
    "DNS_ROUND_ROBIN": the first address of the latest answer). Resolved once on
    first use, then from the cache (refreshed off the request path). Raises OSError."""
    now = aio.current_time()
    addr = CACHE.pick(host, now, mode == "DNS")
    if addr is None:
        await _resolve(host, now, with_ttl=False)
        addr = CACHE.pick(host, now, mode == "DNS")
        if addr is None:
            raise OSError(f"{host!r} resolved to no address")
    return addr
