"""Circuit breaking: Envoy's per-cluster connection-pool limits, as counters.

Istio's DestinationRule ``trafficPolicy.connectionPool`` becomes a
``PoolLimits`` (``pool_limits``); each upstream cluster in a proxy owns one
``Breaker`` that counts connections and requests and says, at every step,
what the proxy's pool should do. The breaker never opens a socket and never
looks at a clock: it is pure bookkeeping, O(1) per call.

Vocabulary (Envoy's):
  connections  upstream connections open or being opened (counts toward
               ``max_connections``)
  connecting   connections being opened for a request that waits on them
  waiting      requests queued until some connection frees up
  pending      connecting + waiting: requests without a connection yet
               (counts toward ``max_pending_requests``, Envoy's
               ``http1MaxPendingRequests``)
  active       requests holding a connection (counts toward
               ``max_requests``, Istio's ``http2MaxRequests``, with
               ``connecting``)
  retries      retries in flight (counts toward ``max_retries``)

The table (rules, checked top to bottom; ``Admit``/``Release`` are what the
proxy's pool must do):

  event                 condition                               effect                         returns
  --------------------  --------------------------------------  -----------------------------  ---------------------
  admit(idle > 0)       active + connecting >= max_requests     overflows["rq"] += 1           OVERFLOW
  admit(idle > 0)       otherwise                               active += 1                    USE_IDLE
  admit(idle == 0)      pending >= max_pending_requests         overflows["pending"] += 1      OVERFLOW
  admit(idle == 0)      active + connecting >= max_requests     overflows["rq"] += 1           OVERFLOW
  admit(idle == 0)      connections < max_connections           connections += 1,              NEW_CONNECTION
                                                                connecting += 1
  admit(idle == 0)      otherwise                               waiting += 1,                  QUEUE
                                                                overflows["cx"] += 1
  connected()           -                                       connecting -= 1, active += 1   -
  connect_failed()      -                                       connecting -= 1,               True if a queued
                                                                connections -= 1, then WAKE    request must open one
  left_queue()          -                                       waiting -= 1                   -
  release(...)          not reusable, or served >= max per cx   active -= 1, connections -= 1, CLOSE_AND_OPEN if
                                                                then WAKE                      woken, else CLOSE
  release(...)          waiting > 0 and queued_can_reuse        waiting -= 1 (active same)     HAND_OVER
  release(...)          otherwise                               active -= 1                    KEEP_IDLE
  connection_lost()     (an idle connection closed)             connections -= 1, then WAKE    True if woken
  idle_was_dead(idle)   (USE_IDLE got a closed connection)      active -= 1, connections -= 1  admit(idle)
  try_retry()           retries < max_retries                   retries += 1                   True
  try_retry()           otherwise                               overflows["retry"] += 1        False
  retry_done()          -                                       retries -= 1                   -
  admit_stream()        active >= max_requests (HTTP/2)         overflows["rq"] += 1           False
  admit_stream()        otherwise                               active += 1                    True
  stream_done()         -                                       active -= 1                    -

  WAKE: if waiting > 0 and connections < max_connections and
        active + connecting < max_requests: waiting -= 1, connections += 1,
        connecting += 1 — the first queued request now opens a connection
        (and later reports connected() / connect_failed() itself).

Overflow is answered with 503 and response flag ``UO`` (``OVERFLOW_STATUS``,
``OVERFLOW_FLAG``). ``overflows["cx"]`` counts requests that had to queue
because ``max_connections`` was reached (Envoy's ``upstream_cx_overflow``);
it does not fail a request by itself.

The table is for HTTP/1.1 pools: one request per connection at a time;
``idle`` is the number of idle keep-alive connections to the chosen host.
HTTP/2 upstreams multiplex streams on one connection per host; for them the
proxy only asks ``admit_stream()`` / ``stream_done()``, which apply
``max_requests`` (Istio's http2MaxRequests) to concurrent streams.

Usage by the proxy's upstream pool (one Breaker per cluster)::

    breaker = Breaker(pool_limits(cluster.traffic_policy.connection_pool, settings))

    admit = breaker.admit(idle_connections=len(pool.idle))
    if admit is Admit.OVERFLOW:
        return respond(503, flag="UO")
    if admit is Admit.USE_IDLE:
        conn = pool.idle.pop()
    else:
        if admit is Admit.QUEUE:
            try:
                conn = await pool.wait_in_queue()   # FIFO; gets a conn or OPEN
            except trio.Cancelled:
                breaker.left_queue()  (if still in the queue)
                raise
        if admit is Admit.NEW_CONNECTION or conn is OPEN:
            try:
                conn = await pool.connect(timeout=limits.connect_timeout)
            except ConnectError:
                if breaker.connect_failed():
                    pool.wake_first_waiter(OPEN)
                return respond(503, flag="UF")
            breaker.connected()
    ... send the request, read the response ...
    conn.served += 1
    match breaker.release(reusable=conn.keep_alive, requests_served=conn.served):
        case Release.HAND_OVER:      pool.wake_first_waiter(conn)
        case Release.KEEP_IDLE:      pool.idle.append(conn)
        case Release.CLOSE:          conn.close()
        case Release.CLOSE_AND_OPEN: conn.close(); pool.wake_first_waiter(OPEN)

    # an idle connection closed by the peer or by idle_timeout:
    if breaker.connection_lost():
        pool.wake_first_waiter(OPEN)
    # USE_IDLE, but the idle connection popped is found dead before use:
    admit = breaker.idle_was_dead(idle_connections=len(pool.idle))   # and go on as above

Keep one Breaker per cluster across config versions: when the limits
change, assign ``breaker.limits = pool_limits(...)``; the counters stay
true. The counts assume each pooled connection belongs to one cluster: if
idle lists are shared between clusters (subsets of one service share
endpoints), key them by (cluster, endpoint).

    # before each retry: if not breaker.try_retry(): give up (overflow),
    # and breaker.retry_done() when that retry's try has finished.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..model.istio import ConnectionPoolSettings
from ..model.proxyconfig import Settings

__all__ = [
    "Admit",
    "Release",
    "PoolLimits",
    "Breaker",
    "BreakerStats",
    "pool_limits",
    "UNLIMITED",
    "OVERFLOW_STATUS",
    "OVERFLOW_FLAG",
    "DEFAULT_UPSTREAM_IDLE_TIMEOUT",
    "BreakerStateError",
]

UNLIMITED = 2**32 - 1  # Istio's default for every connection-pool limit
DEFAULT_UPSTREAM_IDLE_TIMEOUT = 3600.0  # Istio: http.idleTimeout "if not set, the default is 1 hour"
OVERFLOW_STATUS = 503
OVERFLOW_FLAG = "UO"


class Admit(enum.Enum):
    USE_IDLE = "use-idle"  # take an idle connection
    NEW_CONNECTION = "new-connection"  # open a connection for this request
    QUEUE = "queue"  # wait for a connection to be handed over (or to be told to open one)
    OVERFLOW = "overflow"  # answer 503 UO


class Release(enum.Enum):
    KEEP_IDLE = "keep-idle"  # return the connection to the idle pool
    HAND_OVER = "hand-over"  # give the connection to the first queued request
    CLOSE = "close"  # close the connection
    CLOSE_AND_OPEN = "close-and-open"  # close it; the first queued request opens a new one


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int | None = None  # None: unlimited (keep-alive forever)
    connect_timeout: float = 10.0
    idle_timeout: float | None = DEFAULT_UPSTREAM_IDLE_TIMEOUT  # None: never close idle connections


def _limit(value: int | None) -> int:
    """Istio leaves a limit unset (None) for "default" = 2^32-1. A value <= 0 is
    invalid in Istio's validation; it is treated as unset here."""
    if value is None or value <= 0:
        return UNLIMITED
    return value


def pool_limits(cp: ConnectionPoolSettings | None, settings: Settings) -> PoolLimits:
    """Istio connectionPool → Envoy circuit-breaker thresholds and pool settings.

    tcp.maxConnections → max_connections; http.http1MaxPendingRequests →
    max_pending_requests; http.http2MaxRequests → max_requests;
    http.maxRetries → max_retries (all default 2^32-1);
    http.maxRequestsPerConnection (0 or unset: unlimited);
    tcp.connectTimeout (default ``settings.connect_timeout``);
    http.idleTimeout (default 1 hour; ``0s`` disables it).
    """
    tcp = cp.tcp if cp is not None else None
    http = cp.http if cp is not None else None
    rpc = http.max_requests_per_connection if http is not None else None
    connect_timeout = float(settings.connect_timeout)
    if tcp is not None and tcp.connect_timeout is not None:
        connect_timeout = float(tcp.connect_timeout)
    idle_timeout: float | None = DEFAULT_UPSTREAM_IDLE_TIMEOUT
    if http is not None and http.idle_timeout is not None:
        idle_timeout = float(http.idle_timeout) if http.idle_timeout > 0 else None
    return PoolLimits(
        max_connections=_limit(tcp.max_connections if tcp is not None else None),
        max_pending_requests=_limit(http.http1_max_pending_requests if http is not None else None),
        max_requests=_limit(http.http2_max_requests if http is not None else None),
        max_retries=_limit(http.max_retries if http is not None else None),
        max_requests_per_connection=rpc if rpc is not None and rpc > 0 else None,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
    )


@dataclass(frozen=True, slots=True)
class BreakerStats:
    connections: int
    connecting: int
    active: int
    pending: int
    waiting: int
    retries: int
    overflow_cx: int
    overflow_pending: int
    overflow_rq: int
    overflow_retry: int


class BreakerStateError(Exception):
    """The pool reported an event that its counters cannot have produced
    (a release without an admitted request, ...): a bug in the caller."""


class Breaker:
    """Counters and decisions for one cluster. See the table at the top of the module."""

    __slots__ = ("limits", "connections", "connecting", "active", "waiting", "retries", "overflows", "last_overflow")

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.connecting = 0
        self.active = 0
        self.waiting = 0
        self.retries = 0
        self.overflows: dict[str, int] = {"cx": 0, "pending": 0, "rq": 0, "retry": 0}
        self.last_overflow: str | None = None  # kind of the most recent overflow, for logs

    @property
    def pending(self) -> int:
        return self.connecting + self.waiting

    def _overflow(self, kind: str) -> Admit:
        self.overflows[kind] += 1
        self.last_overflow = kind
        return Admit.OVERFLOW

    # ------------------------------------------------------------ requests

    def admit(self, idle_connections: int) -> Admit:
        lim = self.limits
        if idle_connections > 0:
            if self.active + self.connecting >= lim.max_requests:
                return self._overflow("rq")
            self.active += 1
            return Admit.USE_IDLE
        if self.connecting + self.waiting >= lim.max_pending_requests:
            return self._overflow("pending")
        if self.active + self.connecting >= lim.max_requests:
            return self._overflow("rq")
        if self.connections < lim.max_connections:
            self.connections += 1
            self.connecting += 1
            return Admit.NEW_CONNECTION
        self.waiting += 1
        self.overflows["cx"] += 1
        return Admit.QUEUE

    def connected(self) -> None:
        """The connection opened for a NEW_CONNECTION (or woken) request is up."""
        if self.connecting <= 0:
            raise BreakerStateError("connected() without a connection being opened")
        self.connecting -= 1
        self.active += 1

    def connect_failed(self) -> bool:
        """Opening the connection failed; the request is over (or will retry via admit()).

        True: the first queued request must now open a connection itself.
        """
        if self.connecting <= 0:
            raise BreakerStateError("connect_failed() without a connection being opened")
        self.connecting -= 1
        self.connections -= 1
        return self._wake()

    def left_queue(self) -> None:
        """A queued request gave up before getting a connection (timeout, client gone)."""
        if self.waiting <= 0:
            raise BreakerStateError("left_queue() without a queued request")
        self.waiting -= 1

    def release(self, *, reusable: bool, requests_served: int, queued_can_reuse: bool = True) -> Release:
        """A request that held a connection is finished.

        ``reusable``: the connection can carry another request (keep-alive,
        response fully read, no reset). ``requests_served``: requests this
        connection has carried, this one included. ``queued_can_reuse``:
        False when the first queued request is for another host than this
        connection's (per-host pools); it then gets a new connection instead.
        """
        if self.active <= 0:
            raise BreakerStateError("release() without an active request")
        rpc = self.limits.max_requests_per_connection
        if not reusable or (rpc is not None and requests_served >= rpc):
            self.active -= 1
            self.connections -= 1
            return Release.CLOSE_AND_OPEN if self._wake() else Release.CLOSE
        if self.waiting > 0:
            if queued_can_reuse:
                self.waiting -= 1  # the queued request takes over this request's active slot
                return Release.HAND_OVER
            self.active -= 1
            self.connections -= 1
            return Release.CLOSE_AND_OPEN if self._wake() else Release.CLOSE
        self.active -= 1
        return Release.KEEP_IDLE

    def admit_stream(self) -> bool:
        """HTTP/2: may one more stream start? False is an overflow (503 UO)."""
        if self.active >= self.limits.max_requests:
            self._overflow("rq")
            return False
        self.active += 1
        return True

    def stream_done(self) -> None:
        """HTTP/2: a stream admitted by admit_stream() is over."""
        if self.active <= 0:
            raise BreakerStateError("stream_done() without an active stream")
        self.active -= 1

    def idle_was_dead(self, idle_connections: int) -> Admit:
        """After USE_IDLE the idle connection taken turned out closed (the pool
        checks before use): it is dropped, and the request is admitted anew
        with ``idle_connections`` still idle. Counts as connection_lost()
        (without waking anyone: an idle connection means nobody is queued)."""
        if self.active <= 0 or self.connections <= 0:
            raise BreakerStateError("idle_was_dead() without an active request on an idle connection")
        self.active -= 1
        self.connections -= 1
        return self.admit(idle_connections)

    # ------------------------------------------------------------ connections

    def connection_lost(self) -> bool:
        """An idle connection was closed (by the peer, or for idle timeout).

        True: the first queued request must now open a connection itself.
        """
        if self.connections - self.connecting - self.active <= 0:
            raise BreakerStateError("connection_lost() without an idle connection")
        self.connections -= 1
        return self._wake()

    def _wake(self) -> bool:
        lim = self.limits
        if (
            self.waiting > 0
            and self.connections < lim.max_connections
            and self.active + self.connecting < lim.max_requests
        ):
            self.waiting -= 1
            self.connections += 1
            self.connecting += 1
            return True
        return False

    # ------------------------------------------------------------ retries

    def try_retry(self) -> bool:
        """May one more retry start? Counts it as in flight when True."""
        if self.retries >= self.limits.max_retries:
            self.overflows["retry"] += 1
            self.last_overflow = "retry"
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        if self.retries <= 0:
            raise BreakerStateError("retry_done() without a retry in flight")
        self.retries -= 1

    # ------------------------------------------------------------ stats

    @property
    def idle(self) -> int:
        """Connections neither being opened nor carrying a request (HTTP/1.1)."""
        return self.connections - self.connecting - self.active

    def stats(self) -> BreakerStats:
        o = self.overflows
        return BreakerStats(
            connections=self.connections,
            connecting=self.connecting,
            active=self.active,
            pending=self.connecting + self.waiting,
            waiting=self.waiting,
            retries=self.retries,
            overflow_cx=o["cx"],
            overflow_pending=o["pending"],
            overflow_rq=o["rq"],
            overflow_retry=o["retry"],
        )
