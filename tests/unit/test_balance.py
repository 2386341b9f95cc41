"""Endpoint selection (core/balance.py, core/hashring.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshctl.core.balance import BalanceConfigError, PickContext, make_balancer
from meshctl.core.hashring import Maglev, Ring, hash64
from meshctl.model.base import FrozenDict
from meshctl.model.istio import ConsistentHashLB, HTTPCookie, LoadBalancerSettings, Maglev as MaglevSettings, RingHash
from meshctl.model.proxyconfig import Endpoint

TEN = [Endpoint(f"10.0.0.{i}", 9080, instance=f"reviews-v1-{i}") for i in range(10)]
CTX = PickContext()


def simple(name: str | None):
    return make_balancer(LoadBalancerSettings(simple=name) if name else None)


def hashed(**kw):
    return make_balancer(LoadBalancerSettings(consistent_hash=ConsistentHashLB(**kw)))


def by_header(value: str, name: str = "x-user") -> PickContext:
    return PickContext(headers=[(name, value)])


# ---------------------------------------------------------------- simple policies


@pytest.mark.parametrize("name", [None, "ROUND_ROBIN", "UNSPECIFIED", "LEAST_REQUEST", "LEAST_CONN", "RANDOM"])
def test_no_endpoints_gives_none_and_one_endpoint_is_always_chosen(name):
    b = simple(name)
    rand = random.Random(0)
    assert b.pick([], CTX, rand) is None
    assert b.pick(TEN[:1], CTX, rand) is TEN[0]


def test_round_robin_is_the_default_and_takes_endpoints_in_turn():
    b = simple(None)
    rand = random.Random(0)
    picks = [b.pick(TEN, CTX, rand) for _ in range(30)]
    assert Counter(picks) == {ep: 3 for ep in TEN}
    start = TEN.index(picks[0])
    assert picks[:10] == TEN[start:] + TEN[:start]  # in order from a random start


def test_round_robin_starts_at_a_random_position_per_balancer():
    starts = {simple("ROUND_ROBIN").pick(TEN, CTX, random.Random(seed)) for seed in range(40)}
    assert len(starts) > 3


def test_round_robin_state_is_per_balancer():
    a, b = simple("ROUND_ROBIN"), simple("ROUND_ROBIN")
    rand = random.Random(0)
    first = a.pick(TEN, CTX, rand)
    second = a.pick(TEN, CTX, rand)
    assert second is not first
    # a second cluster's balancer is not advanced by the first one
    assert Counter(b.pick(TEN[:2], CTX, rand) for _ in range(10)) == {TEN[0]: 5, TEN[1]: 5}


def test_weighted_round_robin_follows_weights_and_interleaves():
    heavy = Endpoint("10.0.1.1", 80, weight=2)
    light = Endpoint("10.0.1.2", 80, weight=1)
    b = simple("ROUND_ROBIN")
    rand = random.Random(0)
    picks = [b.pick([heavy, light], CTX, rand) for _ in range(300)]
    assert Counter(picks) == {heavy: 200, light: 100}
    # smooth: never more than two of the heavy one in a row
    runs = "".join("h" if p is heavy else "l" for p in picks)
    assert "hhh" not in runs


def test_random_is_weighted_by_endpoint_weight():
    eps = [Endpoint("10.0.2.1", 80, weight=3), Endpoint("10.0.2.2", 80, weight=1)]
    b = simple("RANDOM")
    rand = random.Random(11)
    counts = Counter(b.pick(eps, CTX, rand) for _ in range(10_000))
    assert abs(counts[eps[0]] - 7500) <= 200  # sd ~43


def test_least_request_avoids_the_busy_endpoint():
    b = simple("LEAST_REQUEST")
    rand = random.Random(5)
    busy = (TEN[0].address, TEN[0].port)
    ctx = PickContext(active=FrozenDict({busy: 50}))
    picks = Counter(b.pick(TEN[:3], ctx, rand) for _ in range(3000))
    assert picks[TEN[0]] == 0  # two distinct candidates: the busy one always loses
    assert abs(picks[TEN[1]] - picks[TEN[2]]) < 300


def test_least_request_spreads_load_when_all_are_equal():
    b = simple("LEAST_CONN")
    rand = random.Random(6)
    counts = Counter(b.pick(TEN, CTX, rand) for _ in range(10_000))
    assert set(counts) == set(TEN)
    assert max(counts.values()) - min(counts.values()) < 400


def test_least_request_weighs_in_flight_requests_by_endpoint_weight():
    big = Endpoint("10.0.3.1", 80, weight=4)
    small = Endpoint("10.0.3.2", 80, weight=1)
    # 3 in flight on a weight-4 host is less load than 1 on a weight-1 host
    ctx = PickContext(active=FrozenDict({("10.0.3.1", 80): 3, ("10.0.3.2", 80): 1}))
    b = simple("LEAST_REQUEST")
    rand = random.Random(0)
    assert {b.pick([big, small], ctx, rand) for _ in range(50)} == {big}


def test_unknown_simple_policy_is_rejected_naming_it():
    with pytest.raises(BalanceConfigError, match="'FASTEST'"):
        simple("FASTEST")


# ---------------------------------------------------------------- consistent hash


@pytest.mark.parametrize(
    "lb",
    [
        dict(http_header_name="x-user"),
        dict(http_header_name="x-user", ring_hash=RingHash(minimum_ring_size=4096)),
        dict(http_header_name="x-user", maglev=MaglevSettings(table_size=65537)),
    ],
)
def test_consistent_hash_same_key_same_endpoint(lb):
    b = hashed(**lb)
    rand = random.Random(0)
    for user in ("jason", "bob", "alice", "u-123"):
        chosen = {b.pick(TEN, by_header(user), rand) for _ in range(20)}
        assert len(chosen) == 1
        # a fresh balancer (another proxy process) agrees: the hash is not Python's salted hash()
        assert hashed(**lb).pick(list(reversed(TEN)), by_header(user), rand) in chosen


@pytest.mark.parametrize("maglev", [False, True])
def test_removing_one_endpoint_of_ten_moves_only_about_a_tenth_of_keys(maglev):
    lb = dict(http_header_name="x-user")
    if maglev:
        lb["maglev"] = MaglevSettings(table_size=10007)
    b = hashed(**lb)
    rand = random.Random(0)
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: b.pick(TEN, by_header(k), rand) for k in keys}
    removed = TEN[3]
    rest = [ep for ep in TEN if ep is not removed]
    after = {k: b.pick(rest, by_header(k), rand) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    on_removed = [k for k in keys if before[k] is removed]
    assert 0.05 < len(on_removed) / len(keys) < 0.15  # the removed host had about its share
    assert set(on_removed) <= set(moved)
    assert len(moved) / len(keys) < 0.15
    if maglev:
        assert len(moved) <= 1.15 * len(on_removed)  # Maglev: a few others move too
    else:
        assert set(moved) == set(on_removed)  # a ring moves only the removed host's keys
    # adding it back restores the original mapping
    assert {k: b.pick(TEN, by_header(k), rand) for k in keys} == before


@pytest.mark.parametrize("maglev", [False, True])
def test_consistent_hash_spreads_keys_by_weight(maglev):
    eps = [Endpoint("10.0.4.1", 80, weight=3), Endpoint("10.0.4.2", 80, weight=1)]
    lb = dict(use_source_ip=True)
    if maglev:
        lb["maglev"] = MaglevSettings(table_size=10007)
    else:
        lb["ring_hash"] = RingHash(minimum_ring_size=4096)
    b = hashed(**lb)
    rand = random.Random(0)
    counts = Counter(b.pick(eps, PickContext(source_ip=f"192.168.{i // 256}.{i % 256}"), rand) for i in range(8000))
    assert abs(counts[eps[0]] / 8000 - 0.75) < 0.05


def test_consistent_hash_on_cookie_and_query_parameter():
    cookie = hashed(http_cookie=HTTPCookie(name="session", ttl=None))
    query = hashed(http_query_parameter_name="shard")
    rand = random.Random(0)
    c1 = PickContext(headers=[("cookie", "theme=dark; session=abc123")])
    c2 = PickContext(headers=[("cookie", "a=1"), ("cookie", "session=abc123")])
    assert cookie.pick(TEN, c1, rand) is cookie.pick(TEN, c2, rand)
    q1 = PickContext(path="/items?x=1&shard=7")
    q2 = PickContext(path="/other?shard=7")
    assert query.pick(TEN, q1, rand) is query.pick(TEN, q2, rand)
    spread = {query.pick(TEN, PickContext(path=f"/?shard={i}"), rand) for i in range(200)}
    assert len(spread) == 10


def test_missing_hash_key_falls_back_to_random():
    b = hashed(http_header_name="x-user")
    rand = random.Random(2)
    picks = Counter(b.pick(TEN, PickContext(headers=[("x-other", "1")]), rand) for _ in range(2000))
    assert set(picks) == set(TEN)


def test_bad_consistent_hash_settings_are_rejected():
    with pytest.raises(BalanceConfigError, match="exactly one"):
        hashed()
    with pytest.raises(BalanceConfigError, match="exactly one"):
        hashed(http_header_name="x", use_source_ip=True)
    with pytest.raises(BalanceConfigError, match="prime"):
        hashed(use_source_ip=True, maglev=MaglevSettings(table_size=1000))
    with pytest.raises(BalanceConfigError, match="both simple"):
        make_balancer(LoadBalancerSettings(simple="RANDOM", consistent_hash=ConsistentHashLB(use_source_ip=True)))


def test_hash_tables_do_not_depend_on_host_order():
    hosts = [(f"10.0.0.{i}:80", 1 + i % 3) for i in range(7)]
    shuffled = hosts[::-1]
    for cls in (Ring, lambda h: Maglev(h, 1009)):
        a, b = cls(hosts), cls(shuffled)
        for i in range(500):
            h = hash64(str(i))
            assert hosts[a.lookup(h)] == shuffled[b.lookup(h)]


def test_consistent_hash_agrees_across_processes():
    import os
    import subprocess
    import sys

    code = (
        "import random\n"
        "from meshctl.core.balance import make_balancer, PickContext\n"
        "from meshctl.model.istio import LoadBalancerSettings, ConsistentHashLB\n"
        "from meshctl.model.proxyconfig import Endpoint\n"
        "eps = [Endpoint(f'10.0.0.{i}', 9080) for i in range(10)]\n"
        "b = make_balancer(LoadBalancerSettings(consistent_hash=ConsistentHashLB(http_header_name='x-user')))\n"
        "print(','.join(b.pick(eps, PickContext(headers=[('x-user', f'u{k}')]), random.Random(0)).address for k in range(20)))\n"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    b = hashed(http_header_name="x-user")
    here = ",".join(b.pick(TEN, by_header(f"u{k}"), random.Random(0)).address for k in range(20))
    assert outs == {here + "\n"}


@pytest.mark.parametrize("name", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_a_retry_avoids_hosts_already_tried(name):
    b = simple(name)
    rand = random.Random(8)
    tried = frozenset({(TEN[0].address, TEN[0].port), (TEN[1].address, TEN[1].port)})
    picks = Counter(b.pick(TEN[:4], PickContext(avoid=tried), rand) for _ in range(2000))
    # up to 6 draws, then a draw among the untried: a tried host never comes back
    # while an untried one is eligible (with draws alone, random would: 0.5**6 = 1.6%)
    assert picks[TEN[0]] + picks[TEN[1]] == 0
    # when every host was tried, one is still returned
    assert b.pick(TEN[:2], PickContext(avoid=tried), rand) in TEN[:2]
