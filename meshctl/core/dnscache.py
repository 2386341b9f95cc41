"""The proxy's DNS cache for upstream host names (ServiceEntry resolution DNS and
DNS_ROUND_ROBIN, endpoints given by name, passthrough hosts).

Pure: every call takes ``now``. ``pick`` chooses the address of one request
by the ServiceEntry's resolution (DNS: each in turn; DNS_ROUND_ROBIN: the first). The proxy (proxy/dns.py) resolves a name the
first time a connection needs it, then keeps it fresh off the request path:
``due`` names the entries whose TTL has run out, the refresher resolves them
again and ``put``s the answer. A failed refresh keeps the last good addresses
(Envoy keeps serving the last resolved hosts) and retries after
``negative_ttl``; a name no connection used for ``idle`` seconds is dropped.

TTLs come from the DNS answer (clamped to ``min_ttl``..``max_ttl``); names
that do not come from DNS (``/etc/hosts``, ``localhost``) have none and get
``default_ttl`` (Envoy's dns_refresh_rate, 5 s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class DnsEntry:
    addresses: tuple[str, ...]
    expires: float
    last_used: float
    ttl: float
    error: str = ""
    turn: int = 0  # resolution DNS: the next address's index (requests go round them)


class DnsCache:
    def __init__(self, *, min_ttl: float = 1.0, max_ttl: float = 300.0, default_ttl: float = 5.0,
                 negative_ttl: float = 5.0, idle: float = 600.0, max_entries: int = 4096) -> None:
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self.idle = idle
        self.max_entries = max_entries
        self.entries: dict[str, DnsEntry] = {}

    def get(self, host: str, now: float) -> tuple[str, ...] | None:
        """The addresses to connect to (possibly past their TTL while a refresh is
        due: the last good answer beats a lookup on the request path), or None."""
        e = self.entries.get(host)
        if e is None or not e.addresses:
            return None
        e.last_used = now
        return e.addresses

    def pick(self, host: str, now: float, spread: bool) -> str | None:
        """The address one request connects to, from the cached answer: the next one in
        turn (``spread``: resolution DNS, every resolved address is an endpoint, as
        Envoy's STRICT_DNS), or the first (DNS_ROUND_ROBIN, Envoy's LOGICAL_DNS: the
        first address of the latest answer). None when ``host`` is not cached."""
        e = self.entries.get(host)
        if e is None or not e.addresses:
            return None
        e.last_used = now
        if not spread:
            return e.addresses[0]
        i = e.turn % len(e.addresses)
        e.turn = i + 1
        return e.addresses[i]

    def put(self, host: str, addresses: tuple[str, ...], ttl: float | None, now: float) -> DnsEntry:
        t = self.default_ttl if ttl is None else min(max(float(ttl), self.min_ttl), self.max_ttl)
        e = self.entries.get(host)
        if e is None:
            if len(self.entries) >= self.max_entries:
                oldest = min(self.entries, key=lambda h: self.entries[h].last_used)
                del self.entries[oldest]
            e = self.entries[host] = DnsEntry(addresses, now + t, now, t)
        else:
            e.addresses, e.expires, e.ttl, e.error = addresses, now + t, t, ""
        return e

    def fail(self, host: str, error: str, now: float) -> None:
        e = self.entries.get(host)
        if e is None:
            e = self.entries[host] = DnsEntry((), now, now, 0.0)
        e.error = error
        e.expires = now + self.negative_ttl

    def due(self, now: float) -> list[str]:
        """Names to resolve again now; names unused for ``idle`` seconds are dropped."""
        out = []
        for host, e in list(self.entries.items()):
            if now - e.last_used > self.idle:
                del self.entries[host]
            elif e.expires <= now:
                out.append(host)
        return out
