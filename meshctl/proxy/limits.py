"""Connection-pool limits (circuit breaking) for one upstream cluster, as I/O.

``core.breaker.Breaker`` decides; this module carries its decisions out on
real connections. A cluster whose DestinationRule sets
``trafficPolicy.connectionPool`` gets one ``ClusterLimiter``; every other
cluster keeps using the proxy's shared keep-alive pool and never touches
this module, so the data path of a mesh without limits is unchanged.

A ClusterLimiter owns its own ``UpstreamPool`` (idle lists keyed by
endpoint), so each of its connections belongs to exactly one cluster and the
breaker's counts stay true: pools are keyed by (cluster, endpoint) in effect.

    acquire(address, port, stats, connect_timeout)   the same call as UpstreamPool.acquire;
                                                     raises PoolOverflow (answer 503 UO) or
                                                     UpstreamConnectError (503 UF)
    release(conn) / discard(conn)                    the same calls as UpstreamPool's
    hold_retry(rq) / release_retry(rq)               http.maxRetries: retries in flight
    sweep(now)                                       drop idle connections past http.idleTimeout
    tcp_open() / tcp_closed()                        opaque TCP: tcp.maxConnections (tcp.py)

Queued requests (``tcp.maxConnections`` reached) wait in FIFO order for a
connection another request releases, or for the breaker to let them open one.
A request that gives up while queued (per-try or route timeout, client gone)
leaves the queue and the counts stay true; so does one cancelled while it
opens its connection.

Retries: a request holds one of the cluster's ``http.maxRetries`` from its
first retry until it ends, so its own later retries never find the budget
taken by itself; a retry refused for budget counts upstream_rq_retry_overflow
and the request ends with the failure it had (no UO). HTTP/2 upstream
clusters (h2pool.py) apply http2MaxRequests themselves; the retry budget
applies to them through the Forwarder all the same.

Limiters outlive config versions (``build_limiters`` / ``commit_limiters``,
the way outlier detectors do): a cluster keeps its counters, its queue and
its idle connections across a swap; changed limits take effect for the next
decision (requests already queued when limits are raised wait for the next
release). A cluster whose connectionPool goes away has its limiter retired:
its idle connections are closed and requests still in flight on the old
config close theirs when done.
"""

from __future__ import annotations

import math
from collections import deque

import meshctl.proxy.aio as aio
from ..core.breaker import Admit, Breaker, PoolLimits, Release, pool_limits
from ..model.proxyconfig import ProxyConfig
from ..protocol.http1 import Limits
from .pool import PEEK_AFTER, UpstreamConn, UpstreamPool
from .stats import ClusterStats, Stats

__all__ = ["ClusterLimiter", "PoolOverflow", "build_limiters", "commit_limiters"]


class PoolOverflow(Exception):
    """A connection-pool limit of the cluster is reached: answer 503 with flag UO at once."""

    def __init__(self, cluster: str, kind: str, detail: str) -> None:
        super().__init__(f"{cluster}: {detail}")
        self.cluster = cluster
        self.kind = kind  # "pending" | "rq"


class _Waiter:
    """A request queued for a connection: handed one (``conn``) or told to open one (``open``)."""

    __slots__ = ("key", "event", "conn", "open")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.event = aio.Event()
        self.conn: UpstreamConn | None = None
        self.open = False


class ClusterLimiter:
    """One cluster's breaker and its own pool of upstream connections."""

    def __init__(self, name: str, limits: PoolLimits, stats: ClusterStats, codec_limits: Limits | None) -> None:
        self.name = name
        self.breaker = Breaker(limits)
        self.stats = stats
        self.pool = UpstreamPool(limits=codec_limits)
        self.waiters: deque[_Waiter] = deque()
        self.served: dict[UpstreamConn, int] = {}  # requests each live connection has carried
        self.retry_holders: set = set()  # requests holding one of the http.maxRetries retries
        self.retired = False
        self.tcp_connections = 0  # opaque TCP connections relayed (tcp.py), for tcp.maxConnections
        self._next: tuple[PoolLimits, Limits | None, frozenset] | None = None  # staged by build_limiters

    @property
    def limits(self) -> PoolLimits:
        return self.breaker.limits

    # ------------------------------------------------------------ acquire

    async def acquire(self, address: str, port: int, stats: ClusterStats, connect_timeout: float,
                      tls=None, check: bool = False) -> UpstreamConn:
        """A connection to address:port within the cluster's limits (``connect_timeout``
        is ignored: the cluster's tcp.connectTimeout applies; ``tls`` and ``check`` as for
        UpstreamPool.acquire). Raises PoolOverflow or UpstreamConnectError."""
        key = (address, port) if tls is None else (address, port, tls.key)
        breaker = self.breaker
        idle = self.pool.idle.get(key)
        admit = breaker.admit(len(idle) if idle else 0)
        if admit is Admit.USE_IDLE:
            assert idle  # the breaker says USE_IDLE only with an idle connection
            now = aio.current_time()
            idle_timeout = breaker.limits.idle_timeout
            if idle_timeout is None:
                idle_timeout = math.inf
            while admit is Admit.USE_IDLE:
                conn = idle.pop()
                age = now - conn.idle_since
                if age < idle_timeout and ((age < PEEK_AFTER and not check)
                                           or self.pool.backend.is_alive(conn.stream)):
                    conn.reused = True
                    return conn
                self._close(conn)
                admit = breaker.idle_was_dead(len(idle))
        if admit is Admit.NEW_CONNECTION:
            return await self._connect(address, port, stats, tls)
        if admit is Admit.QUEUE:
            stats.cx_overflow += 1
            return await self._queue(key, address, port, stats, tls)
        raise self._overflow(breaker.last_overflow or "pending", stats)

    def _overflow(self, kind: str, stats: ClusterStats) -> PoolOverflow:
        lim = self.breaker.limits
        if kind == "rq":
            detail = f"http2MaxRequests ({lim.max_requests}) requests already in flight"
        else:
            detail = (f"http1MaxPendingRequests ({lim.max_pending_requests}) requests already "
                      f"waiting for a connection (tcp.maxConnections {lim.max_connections})")
        return PoolOverflow(self.name, kind, detail)

    async def _connect(self, address: str, port: int, stats: ClusterStats, tls) -> UpstreamConn:
        """Open the connection the breaker counted as connecting."""
        # the idle list for this endpoint is empty (or the breaker would have said USE_IDLE),
        # so the pool opens a new connection
        try:
            timeout = self.breaker.limits.connect_timeout
            if tls is None:
                conn = await self.pool.acquire(address, port, stats, timeout)
            else:
                conn = await self.pool.acquire(address, port, stats, timeout, tls)
        except BaseException:  # refused, timed out, or cancelled while connecting
            if self.breaker.connect_failed():
                self._wake_first()
            raise
        self.breaker.connected()
        self.served[conn] = 0
        return conn

    async def _queue(self, key: tuple, address: str, port: int, stats: ClusterStats, tls) -> UpstreamConn:
        w = _Waiter(key)
        self.waiters.append(w)
        self._close_idle_elsewhere(key)
        if not w.event.is_set():
            try:
                await w.event.wait()
            except BaseException:
                self._abandon(w)
                raise
        if w.conn is not None:
            conn = w.conn
            conn.reused = True
            return conn
        return await self._connect(address, port, stats, tls)

    def _abandon(self, w: _Waiter) -> None:
        """A queued request gives up (cancelled): undo whatever it holds."""
        if not w.event.is_set():
            self.waiters.remove(w)
            self.breaker.left_queue()
        elif w.conn is not None:  # handed a connection it will not use: pass it on
            conn, w.conn = w.conn, None
            self._finish(conn, True, self.served.get(conn, 0))
        elif w.open:  # told to open a connection it will not open
            w.open = False
            if self.breaker.connect_failed():
                self._wake_first()

    def _close_idle_elsewhere(self, key: tuple[str, int]) -> None:
        """All connections are taken but some sit idle to other endpoints: close
        one so that a queued request can open its own (else it waits for nothing)."""
        for k, conns in self.pool.idle.items():
            if k != key and conns:
                self._lost(conns.pop())
                return

    def _wake_first(self) -> None:
        w = self.waiters.popleft()
        w.open = True
        w.event.set()

    # ------------------------------------------------------------ release

    def release(self, conn: UpstreamConn) -> None:
        """The request on ``conn`` completed; keep-alive if the exchange allows."""
        reader = conn.reader
        reusable = not conn.stream.closed and conn.client.keep_alive and reader.pos >= len(reader.events)
        self._finish(conn, reusable, self.served.get(conn, 0) + 1)

    def discard(self, conn: UpstreamConn) -> None:
        """The request on ``conn`` is over and the connection cannot be reused."""
        self._finish(conn, False, self.served.get(conn, 0) + 1)

    def _finish(self, conn: UpstreamConn, reusable: bool, served: int) -> None:
        waiters = self.waiters
        decision = self.breaker.release(
            reusable=reusable, requests_served=served,
            queued_can_reuse=not waiters or waiters[0].key == conn.key,
        )
        if decision is Release.KEEP_IDLE:
            if self.retired:
                self._lost(conn)
                return
            idle = self.pool.idle.setdefault(conn.key, [])
            if len(idle) >= self.pool.max_idle:  # as the shared pool: keep at most so many idle
                self._lost(conn)
                return
            self._reset(conn, served)
            conn.idle_since = aio.current_time()
            idle.append(conn)
        elif decision is Release.HAND_OVER:
            self._reset(conn, served)
            w = waiters.popleft()
            w.conn = conn
            w.event.set()
        else:
            self._close(conn)
            if decision is Release.CLOSE_AND_OPEN:
                self._wake_first()

    def _reset(self, conn: UpstreamConn, served: int) -> None:
        self.served[conn] = served
        reset = getattr(conn.client, "reset_for_next", None)
        if reset is not None:
            reset()

    def _close(self, conn: UpstreamConn) -> None:
        self.served.pop(conn, None)
        self.pool.discard(conn)

    def _lost(self, conn: UpstreamConn) -> None:
        """An idle connection is closed (timeout, peer closed, retired)."""
        self._close(conn)
        if self.breaker.connection_lost():
            self._wake_first()

    # ------------------------------------------------------------ retries

    def hold_retry(self, request) -> bool:
        """May ``request`` retry (http.maxRetries: retries in flight in the cluster)?
        A request holds one retry from its first retry until ``release_retry``, so
        its later retries are not refused by its own. False counts an
        upstream_rq_retry_overflow."""
        if request in self.retry_holders:
            return True
        if self.breaker.try_retry():
            self.retry_holders.add(request)
            return True
        self.stats.rq_retry_overflow += 1
        return False

    def release_retry(self, request) -> None:
        """``request`` is over (its retries are done)."""
        if request in self.retry_holders:
            self.retry_holders.discard(request)
            self.breaker.retry_done()

    # ------------------------------------------------------------ opaque TCP

    def tcp_open(self) -> bool:
        """May one more TCP-proxied connection open (tcp.maxConnections)? False is an
        overflow (Envoy's tcp_proxy closes the downstream connection, flag UO)."""
        if self.tcp_connections >= self.breaker.limits.max_connections:
            self.stats.cx_overflow += 1
            return False
        self.tcp_connections += 1
        return True

    def tcp_closed(self) -> None:
        self.tcp_connections -= 1

    # ------------------------------------------------------------ housekeeping

    def sweep(self, now: float) -> None:
        """Close idle connections past http.idleTimeout, closed by the peer, or to
        endpoints the cluster no longer has."""
        timeout = self.breaker.limits.idle_timeout
        if timeout is None:
            timeout = math.inf
        for key, conns in list(self.pool.idle.items()):
            for c in list(conns):
                if now - c.idle_since >= timeout or not self.pool.backend.is_alive(c.stream):
                    conns.remove(c)
                    self._lost(c)
            if not conns:
                del self.pool.idle[key]

    def _drop_endpoints(self, keep: frozenset) -> None:
        for key in [k for k in self.pool.idle if k[:2] not in keep]:  # keys may carry a TLS part
            for c in self.pool.idle.pop(key):
                self._lost(c)

    def retire(self) -> None:
        """The cluster or its connectionPool is gone from the config."""
        self.retired = True
        if self.stats.breaker is self.breaker:
            self.stats.breaker = None
        self._drop_endpoints(frozenset())


def build_limiters(cfg: ProxyConfig, codec_limits: Limits | None, stats: Stats,
                   old: dict[str, ClusterLimiter] | None) -> dict[str, ClusterLimiter]:
    """One limiter per cluster with a connectionPool, reusing ``old`` ones by
    cluster name. Nothing running changes until ``commit_limiters``."""
    old = old or {}
    out: dict[str, ClusterLimiter] = {}
    for name, c in cfg.clusters.items():
        tp = c.traffic_policy
        cp = tp.connection_pool if tp is not None else None
        if cp is None:
            continue
        limits = pool_limits(cp, cfg.settings)
        endpoints = frozenset((e.address, e.port) for e in c.endpoints)
        lim = old.get(name)
        if lim is None or lim.retired:
            lim = ClusterLimiter(name, limits, stats.cluster(name), codec_limits)
        lim._next = (limits, codec_limits, endpoints)
        out[name] = lim
    return out


def commit_limiters(old: dict[str, ClusterLimiter] | None, new: dict[str, ClusterLimiter]) -> None:
    """The config that built ``new`` is now serving: apply staged limits, retire the rest."""
    for name, lim in new.items():
        staged = lim._next
        if staged is not None:
            limits, codec_limits, endpoints = staged
            lim._next = None
            if lim.breaker.limits != limits:
                lim.breaker.limits = limits  # the counters stay true (core.breaker)
            lim.pool.limits = codec_limits
            lim._drop_endpoints(endpoints)
        lim.stats.breaker = lim.breaker
    for name, lim in (old or {}).items():
        if new.get(name) is not lim:
            lim.retire()
