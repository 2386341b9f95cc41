"""Consistent hashing tables: a ring (Karger et al.) and Maglev (Eisenbud et al., NSDI '16).

Both map a 64-bit key hash to one of a fixed list of hosts such that

- the same key always maps to the same host while the host set is unchanged,
  in every process (the hash is blake2b, not Python's salted ``hash``);
- the table does not depend on the order the hosts are given in;
- adding or removing one host of N moves about 1/N of the keys (the ring
  usually moves exactly the keys of that host; Maglev a little more);
- a host with weight w gets a share of keys proportional to w.

Tables are built once per host set (``balance`` caches them) and looked up
per request: the ring with a binary search, Maglev with one index.

Build cost in CPython: a ring of 1,024 entries takes about a millisecond;
a Maglev table of 65,537 entries (Envoy's default) some 30 ms for ten
hosts; prefer a smaller prime ``tableSize`` when hosts come and go often.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from typing import Sequence

__all__ = ["hash64", "Ring", "Maglev", "is_prime", "DEFAULT_RING_SIZE", "MAX_RING_SIZE", "DEFAULT_MAGLEV_SIZE"]

DEFAULT_RING_SIZE = 1024  # Istio's ringHash.minimumRingSize default
MAX_RING_SIZE = 1 << 20  # Envoy allows 8M; beyond ~1M a CPython build takes seconds
DEFAULT_MAGLEV_SIZE = 65537  # Envoy's default table size (prime)
MAX_MAGLEV_SIZE = 5_000_011  # Envoy's limit


def hash64(text: str) -> int:
    """A stable, well-mixed 64-bit hash of ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def _check_hosts(hosts: Sequence[tuple[str, int]]) -> None:
    if not hosts:
        raise ValueError("a consistent-hash table needs at least one host")
    keys = [k for k, _ in hosts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate host keys in a consistent-hash table: {sorted(keys)}")


class Ring:
    """Ring hash. ``hosts`` are (stable key such as "10.0.0.1:9080", weight >= 1).

    Every host gets ``w * P`` points, each the hash of "<key>_<n>"; a key
    belongs to the first point at or after its hash, wrapping around. ``P``,
    the points per unit of weight, is the smallest power of two that makes
    the ring at least ``minimum_size`` points (weights divided by their gcd
    first). Rounding to a power of two keeps ``P``, and so every remaining
    host's points, unchanged when a host comes or goes (unless the total
    crosses a power of two), which is what limits the keys that move to
    those of the host that changed. (Envoy sizes per host as
    ``ceil(size * w / W)``, which shifts every host's points a little.)
    """

    __slots__ = ("_points", "_owners", "size")

    def __init__(self, hosts: Sequence[tuple[str, int]], minimum_size: int = DEFAULT_RING_SIZE) -> None:
        _check_hosts(hosts)
        size = min(max(minimum_size, len(hosts)), MAX_RING_SIZE)
        weights = [max(1, w) for _, w in hosts]
        g = 0
        for w in weights:
            g = math.gcd(g, w)
        weights = [w // g for w in weights]
        units = sum(weights)
        per_unit = 1
        while per_unit * units < size:
            per_unit *= 2
        if per_unit * units > MAX_RING_SIZE:  # huge weights: scale down, keep at least one point each
            counts = [max(1, w * MAX_RING_SIZE // units) for w in weights]
        else:
            counts = [w * per_unit for w in weights]
        entries: list[tuple[int, str, int]] = []
        for index, ((key, _), count) in enumerate(zip(hosts, counts)):
            entries.extend((hash64(f"{key}_{n}"), key, index) for n in range(count))
        entries.sort()  # by hash, ties by host key: independent of input order
        self._points = [h for h, _, _ in entries]
        self._owners = [i for _, _, i in entries]
        self.size = len(entries)

    def lookup(self, key_hash: int) -> int:
        """Index (into the ``hosts`` given) of the host owning ``key_hash``."""
        i = bisect_left(self._points, key_hash)
        if i == len(self._points):
            i = 0
        return self._owners[i]


class Maglev:
    """Maglev lookup table of prime size ``table_size``.

    Each host walks its own permutation of the table (offset and skip from
    two hashes of its key) and claims the next free slot in turn. Weights: in
    every round each host earns its weight in credit and claims a slot only
    when its credit reaches the largest weight, so slots split in proportion
    to weight. Hosts take turns in key order, so input order does not matter.
    """

    __slots__ = ("_table", "size")

    def __init__(self, hosts: Sequence[tuple[str, int]], table_size: int = DEFAULT_MAGLEV_SIZE) -> None:
        _check_hosts(hosts)
        if not is_prime(table_size):
            raise ValueError(f"maglev tableSize must be a prime number, got {table_size}")
        if table_size > MAX_MAGLEV_SIZE:
            raise ValueError(f"maglev tableSize {table_size} is above the maximum {MAX_MAGLEV_SIZE}")
        m = table_size
        order = sorted(range(len(hosts)), key=lambda i: hosts[i][0])
        offsets = [hash64(hosts[i][0] + "#offset") % m for i in order]
        skips = [hash64(hosts[i][0] + "#skip") % (m - 1) + 1 for i in order]
        weights = [max(1, hosts[i][1]) for i in order]
        top = max(weights)
        credit = [0] * len(order)
        tried = [0] * len(order)
        table = [-1] * m
        filled = 0
        while filled < m:
            for j, owner in enumerate(order):
                credit[j] += weights[j]
                if credit[j] < top:
                    continue
                credit[j] -= top
                off, skip, n = offsets[j], skips[j], tried[j]
                slot = (off + n * skip) % m
                while table[slot] >= 0:
                    n += 1
                    slot = (off + n * skip) % m
                table[slot] = owner
                tried[j] = n + 1
                filled += 1
                if filled == m:
                    break
        self._table = table
        self.size = m

    def lookup(self, key_hash: int) -> int:
        return self._table[key_hash % self.size]
