"""Circuit breaking: Istio connectionPool limits → Envoy pool decisions."""

from __future__ import annotations

import random
from collections import deque

import pytest

from meshctl.core.breaker import (
    DEFAULT_UPSTREAM_IDLE_TIMEOUT,
    UNLIMITED,
    Admit,
    Breaker,
    BreakerStateError,
    PoolLimits,
    Release,
    pool_limits,
)
from meshctl.model.base import Duration
from meshctl.model.istio import ConnectionPoolSettings, HTTPSettings, TCPSettings
from meshctl.model.proxyconfig import Settings

# Istio's circuit-breaking task (destination rule for httpbin)
ISTIO_TASK = ConnectionPoolSettings(
    tcp=TCPSettings(max_connections=1),
    http=HTTPSettings(http1_max_pending_requests=1, max_requests_per_connection=1),
)


def test_istio_defaults_are_unlimited() -> None:
    lim = pool_limits(None, Settings())
    assert lim.max_connections == lim.max_pending_requests == lim.max_requests == lim.max_retries == UNLIMITED
    assert lim.max_requests_per_connection is None
    assert lim.connect_timeout == 10.0
    assert lim.idle_timeout == DEFAULT_UPSTREAM_IDLE_TIMEOUT


def test_pool_limits_mapping() -> None:
    cp = ConnectionPoolSettings(
        tcp=TCPSettings(max_connections=7, connect_timeout=Duration(0.25)),
        http=HTTPSettings(
            http1_max_pending_requests=3,
            http2_max_requests=11,
            max_retries=2,
            max_requests_per_connection=5,
            idle_timeout=Duration(30.0),
        ),
    )
    assert pool_limits(cp, Settings()) == PoolLimits(
        max_connections=7,
        max_pending_requests=3,
        max_requests=11,
        max_retries=2,
        max_requests_per_connection=5,
        connect_timeout=0.25,
        idle_timeout=30.0,
    )
    # 0 means unlimited for maxRequestsPerConnection; idleTimeout 0s disables it
    cp0 = ConnectionPoolSettings(http=HTTPSettings(max_requests_per_connection=0, idle_timeout=Duration(0.0)))
    lim = pool_limits(cp0, Settings(connect_timeout=Duration(3.0)))
    assert lim.max_requests_per_connection is None and lim.idle_timeout is None and lim.connect_timeout == 3.0


def test_istio_task_three_concurrent_requests_some_overflow() -> None:
    b = Breaker(pool_limits(ISTIO_TASK, Settings()))
    # three requests arrive at once: no idle connection yet
    first = b.admit(idle_connections=0)
    second = b.admit(idle_connections=0)
    third = b.admit(idle_connections=0)
    assert first is Admit.NEW_CONNECTION
    # the first request is pending on its connection; the pending slot is full
    assert second is Admit.OVERFLOW and third is Admit.OVERFLOW
    assert b.overflows["pending"] == 2
    b.connected()
    # while it runs, one more may queue (connection limit reached), the next overflows
    assert b.admit(idle_connections=0) is Admit.QUEUE
    assert b.overflows["cx"] == 1
    assert b.admit(idle_connections=0) is Admit.OVERFLOW
    # maxRequestsPerConnection 1: the connection closes after one request,
    # and the queued request opens the next one
    assert b.release(reusable=True, requests_served=1) is Release.CLOSE_AND_OPEN
    assert (b.connections, b.connecting, b.waiting, b.active) == (1, 1, 0, 0)
    b.connected()
    assert b.release(reusable=True, requests_served=1) is Release.CLOSE
    s = b.stats()
    assert (s.connections, s.active, s.pending) == (0, 0, 0)
    assert s.overflow_pending == 3


def test_keep_alive_reuses_idle_and_hands_over_to_queue() -> None:
    b = Breaker(PoolLimits(max_connections=2, max_pending_requests=5))
    assert b.admit(0) is Admit.NEW_CONNECTION
    b.connected()
    assert b.admit(0) is Admit.NEW_CONNECTION
    b.connected()
    assert b.admit(0) is Admit.QUEUE
    assert b.admit(0) is Admit.QUEUE
    assert b.release(reusable=True, requests_served=1) is Release.HAND_OVER
    assert b.release(reusable=True, requests_served=1) is Release.HAND_OVER
    assert (b.active, b.waiting, b.connections) == (2, 0, 2)
    assert b.release(reusable=True, requests_served=2) is Release.KEEP_IDLE
    assert b.idle == 1
    assert b.admit(idle_connections=1) is Admit.USE_IDLE
    assert b.idle == 0


def test_unreusable_connection_closes_and_wakes_queue() -> None:
    b = Breaker(PoolLimits(max_connections=1))
    b.admit(0)
    b.connected()
    assert b.admit(0) is Admit.QUEUE
    assert b.release(reusable=False, requests_served=1) is Release.CLOSE_AND_OPEN
    b.connected()
    assert b.release(reusable=True, requests_served=1) is Release.KEEP_IDLE
    # the idle connection is closed by the peer: nobody is waiting
    assert b.connection_lost() is False
    assert b.connections == 0


def test_connect_failure_frees_the_slot_for_a_queued_request() -> None:
    b = Breaker(PoolLimits(max_connections=1, max_pending_requests=2))
    assert b.admit(0) is Admit.NEW_CONNECTION
    assert b.admit(0) is Admit.QUEUE
    assert b.pending == 2
    assert b.admit(0) is Admit.OVERFLOW
    assert b.connect_failed() is True  # the queued request must open one now
    assert (b.connections, b.connecting, b.waiting) == (1, 1, 0)
    assert b.connect_failed() is False
    assert b.connections == 0


def test_queued_request_for_another_host_gets_a_new_connection() -> None:
    b = Breaker(PoolLimits(max_connections=1))
    b.admit(0)
    b.connected()
    b.admit(0)
    assert b.release(reusable=True, requests_served=1, queued_can_reuse=False) is Release.CLOSE_AND_OPEN


def test_left_queue() -> None:
    b = Breaker(PoolLimits(max_connections=1, max_pending_requests=1))
    b.admit(0)
    b.connected()
    assert b.admit(0) is Admit.QUEUE
    assert b.admit(0) is Admit.OVERFLOW
    b.left_queue()
    assert b.admit(0) is Admit.QUEUE


def test_max_requests_caps_active_requests() -> None:
    b = Breaker(PoolLimits(max_requests=2))
    assert b.admit(0) is Admit.NEW_CONNECTION
    assert b.admit(0) is Admit.NEW_CONNECTION
    assert b.admit(5) is Admit.OVERFLOW
    assert b.overflows["rq"] == 1 and b.last_overflow == "rq"


def test_http2_streams_limited_by_max_requests() -> None:
    b = Breaker(pool_limits(ConnectionPoolSettings(http=HTTPSettings(http2_max_requests=2)), Settings()))
    assert b.admit_stream() and b.admit_stream()
    assert not b.admit_stream()
    b.stream_done()
    assert b.admit_stream()


def test_retry_budget() -> None:
    b = Breaker(pool_limits(ConnectionPoolSettings(http=HTTPSettings(max_retries=1)), Settings()))
    assert b.try_retry() is True
    assert b.try_retry() is False
    assert b.overflows["retry"] == 1
    b.retry_done()
    assert b.try_retry() is True


def test_impossible_events_are_reported() -> None:
    b = Breaker(PoolLimits())
    with pytest.raises(BreakerStateError):
        b.release(reusable=True, requests_served=1)
    with pytest.raises(BreakerStateError):
        b.connected()
    with pytest.raises(BreakerStateError):
        b.connection_lost()
    with pytest.raises(BreakerStateError):
        b.retry_done()


class FakePool:
    """Carries out the breaker's decisions the way the proxy's pool would."""

    def __init__(self, breaker: Breaker) -> None:
        self.b = breaker
        self.idle = 0
        self.connecting: list[str] = []  # request ids opening a connection
        self.queue: deque[str] = deque()
        self.running: dict[str, int] = {}  # request id -> requests served on its connection so far
        self.served_on_idle: list[int] = []
        self.overflowed = 0
        self.done = 0

    def arrive(self, rid: str) -> None:
        a = self.b.admit(self.idle)
        if a is Admit.USE_IDLE:
            self.idle -= 1
            self.running[rid] = self.served_on_idle.pop()
        elif a is Admit.NEW_CONNECTION:
            self.connecting.append(rid)
        elif a is Admit.QUEUE:
            self.queue.append(rid)
        else:
            self.overflowed += 1

    def connect_result(self, ok: bool) -> None:
        rid = self.connecting.pop(0)
        if ok:
            self.b.connected()
            self.running[rid] = 0
        else:
            self.done += 1
            if self.b.connect_failed():
                self.connecting.append(self.queue.popleft())

    def finish(self, rid: str, reusable: bool) -> None:
        served = self.running.pop(rid) + 1
        self.done += 1
        r = self.b.release(reusable=reusable, requests_served=served)
        if r is Release.HAND_OVER:
            self.running[self.queue.popleft()] = served
        elif r is Release.KEEP_IDLE:
            self.idle += 1
            self.served_on_idle.append(served)
        elif r is Release.CLOSE_AND_OPEN:
            self.connecting.append(self.queue.popleft())

    def lose_idle(self) -> None:
        self.idle -= 1
        self.served_on_idle.pop()
        if self.b.connection_lost():
            self.connecting.append(self.queue.popleft())


@pytest.mark.parametrize("seed", range(5))
def test_random_traffic_never_exceeds_limits(seed: int) -> None:
    limits = PoolLimits(max_connections=3, max_pending_requests=2, max_requests=3, max_requests_per_connection=4)
    b = Breaker(limits)
    pool = FakePool(b)
    rand = random.Random(seed)
    for i in range(5000):
        op = rand.random()
        if op < 0.4:
            pool.arrive(f"r{i}")
        elif op < 0.55 and pool.connecting:
            pool.connect_result(rand.random() < 0.9)
        elif op < 0.9 and pool.running:
            pool.finish(rand.choice(sorted(pool.running)), reusable=rand.random() < 0.9)
        elif pool.idle:
            pool.lose_idle()
        # the breaker's counters agree with what the pool actually holds
        assert b.connections == pool.idle + len(pool.connecting) + len(pool.running)
        assert b.active == len(pool.running) and b.waiting == len(pool.queue)
        assert b.connections <= limits.max_connections
        assert b.pending <= limits.max_pending_requests
        assert b.active + b.connecting <= limits.max_requests
        # no request waits while a connection sits idle
        assert not (pool.queue and pool.idle)
        # max_requests_per_connection is honoured
        assert all(s < 4 for s in pool.running.values()) and all(s < 4 for s in pool.served_on_idle)
    assert pool.overflowed > 100 and pool.done > 500


def test_dead_idle_connection_is_replaced() -> None:
    b = Breaker(PoolLimits(max_connections=1))
    b.admit(0)
    b.connected()
    assert b.release(reusable=True, requests_served=1) is Release.KEEP_IDLE
    assert b.admit(1) is Admit.USE_IDLE
    # the pool finds the idle connection closed by the peer: open a fresh one
    assert b.idle_was_dead(idle_connections=0) is Admit.NEW_CONNECTION
    assert (b.connections, b.connecting, b.active) == (1, 1, 0)
    with pytest.raises(BreakerStateError):
        Breaker(PoolLimits()).idle_was_dead(0)


def test_new_limits_keep_counts() -> None:
    b = Breaker(PoolLimits(max_connections=1))
    b.admit(0)
    b.connected()
    assert b.admit(0) is Admit.QUEUE
    b.limits = PoolLimits(max_connections=3)
    assert b.admit(0) is Admit.NEW_CONNECTION
    assert b.connections == 2 and b.waiting == 1
