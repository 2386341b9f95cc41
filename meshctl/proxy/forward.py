"""The forwarder: every try of every request, whatever the protocol on either leg.

After the stage chain (stages.py) has picked a cluster, ``Forwarder.run``
owns the request until the client has its response:

    route deadline   the route's ``timeout`` (504 UT when it fires before a response)
    tries            pick an endpoint (balancer over healthy, non-ejected hosts),
                     run one ``Attempt`` on the cluster's upstream exchange, learn
                     a typed ``TryResult``
    per-try deadline ``retries.perTryTimeout``: connecting and waiting for the head
    retries          core.retry.decide → RetryAfter(s) | PassOn | GiveUp; a retry
                     also needs a slot of the cluster's retry budget (DestinationRule
                     ``http.maxRetries``, limits.ClusterLimiter.hold_retry), the same
                     for HTTP/1.1 and HTTP/2 upstreams; it picks away from the hosts
                     already tried (PickContext.avoid, Istio's previous_hosts predicate)
    body replay      the request body (request.BodySource) is kept while it fits the
                     retry buffer; each try reads it from its own cursor
    outlier reports  every try's result goes to the cluster's outlier detector
    overflow         limits.PoolOverflow (connectionPool limits): 503 UO, never retried

The upstream side is one small interface, ``UpstreamExchange.attempt(Attempt)
-> TryResult``, with two implementations: HTTP/1.1 over keep-alive pools
(h1upstream.py) and HTTP/2 over multiplexed connections (h2pool.py). An
exchange connects, sends the request (replaying the body), waits for the
response head until the per-try deadline, asks the forwarder
(``Attempt.judge``) whether that response goes to the client or is retried,
and relays it. It decides nothing else.

Results of one try (``TryResult``):

    Relayed          a response went to the client (rq.status says which); done
    Failed           no response: connect failure, reset, refused stream, per-try
                     timeout (``failure`` is core.retry's failure kind)
    Retried          a response arrived that the forwarder chose to retry; it was
                     not relayed; wait ``delay`` seconds and try again
    Stale            a pooled keep-alive connection the upstream had closed: tried
                     again at once on another (idempotent requests, once); tries
                     after the first check a pooled connection before taking it
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

import meshctl.proxy.aio as aio
from ..core.balance import PickContext
from ..core.locality import RetryPriorities
from ..core.mirror import has_mirrors
from ..core.outlier import LOCAL_FAILURES
from ..core.retry import Outcome, RetryAfter, RetryPolicy, decide
from ..model.base import HeaderList
from ..model.proxyconfig import Endpoint
from ..protocol.events import RequestHead
from ..protocol.grpc import is_grpc
from . import stats as F
from .limits import PoolOverflow
from .mirror import after_forward
from .protocols import H2_ALWAYS, H2_IF_GRPC, H2_NEVER
from .request import BodySource, LocalReply, Request, failure_reply, send_local
from .snapshot import ClusterState

log = logging.getLogger("meshctl.proxy")

__all__ = [
    "Forwarder",
    "Attempt",
    "UpstreamExchange",
    "TryResult",
    "Relayed",
    "Failed",
    "Retried",
    "Stale",
    "RELAYED",
    "STALE",
]


# ------------------------------------------------------------------ results of one try


@dataclass(frozen=True, slots=True)
class Relayed:
    """A response went to the client (``rq.status``); the request is done."""


@dataclass(frozen=True, slots=True)
class Failed:
    """No response arrived. ``failure``: connect-failure | reset | refused-stream | timeout;
    ``flag``: the Envoy response flag (UF, UR, UT, UPE); ``detail`` for the reply body."""

    failure: str
    flag: str
    detail: str


@dataclass(frozen=True, slots=True)
class Retried:
    """A response with ``status`` arrived and is retried after ``delay`` seconds (not relayed)."""

    status: int
    delay: float


@dataclass(frozen=True, slots=True)
class Stale:
    """A reused keep-alive connection was closed by the upstream before it answered."""


TryResult = Relayed | Failed | Retried | Stale

RELAYED = Relayed()
STALE = Stale()


# ------------------------------------------------------------------ the exchange interface


class Attempt:
    """What one try needs: the request, where it goes, its deadline, and the judge."""

    __slots__ = ("rq", "cs", "ep", "head", "deadline", "per_try", "policy", "retries", "fw", "address", "port")

    def __init__(self, rq: Request, cs: ClusterState, ep: Endpoint, head: RequestHead, deadline: float,
                 per_try: float | None, policy: RetryPolicy, retries: int, fw: "Forwarder") -> None:
        self.rq = rq
        self.cs = cs
        self.ep = ep
        self.head = head  # the upstream request head
        self.deadline = deadline  # per-try deadline (trio clock); math.inf without perTryTimeout
        self.per_try = per_try
        self.policy = policy
        self.retries = retries  # retries made before this try
        self.fw = fw
        # the endpoint's address and port, read once (an Endpoint's attributes are generic
        # look-ups from compiled code)
        self.address: str = ep.address
        self.port: int = ep.port

    def judge(self, status: int, grpc_status: int | None = None) -> float | None:
        """The exchange has a final response head: None to relay it to the client,
        else the seconds to wait before retrying it (the response is dropped)."""
        return self.fw.judge(self, status, grpc_status)

    def timed_out_connecting(self) -> Failed:
        return Failed("timeout", F.UT, f"per-try timeout {self.per_try or 0:g}s while connecting")


class UpstreamExchange(Protocol):
    """One protocol's way to carry a try upstream (h1upstream.H1Exchange, h2pool.H2Exchange)."""

    def carries(self, rq: Request, cs: ClusterState) -> bool:
        """Should requests like ``rq`` to ``cs`` go upstream this way?"""
        ...

    async def attempt(self, a: Attempt) -> TryResult:
        """One try: connect, send, wait for the head (until ``a.deadline``), ask
        ``a.judge``, relay. Raises PoolOverflow, DownstreamGone, ProtocolError."""
        ...


# ------------------------------------------------------------------ the forwarder


def _tried(ctx: PickContext | None, key: tuple[str, int], rq: Request, path: str, active: Any) -> PickContext:
    """Istio's default retry host predicate (Envoy's previous_hosts): a retry
    avoids the hosts this request already tried, when others are eligible."""
    if ctx is None:
        return PickContext(rq.headers, rq.client_ip, path, active, frozenset({key}))
    return PickContext(ctx.headers, ctx.source_ip, ctx.path, ctx.active, ctx.avoid | {key})


class Forwarder:
    """The terminal stage: tries, retries, deadlines, outlier reports (see the module doc)."""

    def __init__(self, rt: Any, h1: UpstreamExchange, h2: UpstreamExchange) -> None:
        self.rt = rt
        self.h1 = h1
        self.h2 = h2

    def upstream_head(self, rq: Request) -> RequestHead:
        head = rq.head
        fwd = rq.forward
        if fwd is not None:
            headers = fwd.request_headers
            authority, path = fwd.authority, fwd.path
        else:
            headers = rq.headers
            authority, path = head.authority, head.path
            if rq.listener.direction == "binding":
                authority = f"{rq.listener.service}:{rq.listener.service_port}"
        # (the fields kept as the objects they are, through an Any view of the list: mypyc
        # keeps a tuple[str, str] variable unboxed, and appending it would make a new tuple)
        boxed: list[Any] = headers
        kept: HeaderList = []
        for i in range(len(headers)):
            if headers[i][0] != "host":
                kept.append(boxed[i])
        headers = kept
        # (positional: keyword arguments cost more, once per request)
        return RequestHead(head.method, path, headers, "1.1", "http", authority, path, True,
                           head.expect_continue, head.upgrade)

    async def run(self, rq: Request) -> None:
        """Forward the request; on return the client has its response (or is gone).
        Sets rq.keep_alive False when the connection must close. Then, if its route
        mirrors, its shadows go (mirror.py), even when the client left before its
        answer. (One coroutine: every level of the await chain is passed through at
        every wake-up of the request's task.)"""
        fwd = rq.forward
        try:
            timeout = fwd.timeout if fwd is not None else None
            if not rq.body_done:
                rt_s = float(rq.snap.settings.request_timeout)
                rq.body = BodySource(rq.reader, rq.snap.settings.retry_buffer_bytes,
                                     aio.current_time() + rt_s if rt_s > 0 else math.inf)
                rq.body.prefill()
            up_head = self.upstream_head(rq)
            if timeout:
                with aio.move_on_after(timeout) as scope:
                    await self._tries(rq, up_head)
                if scope.cancelled_caught:
                    assert rq.cluster is not None
                    rq.cluster.stats.rq_timeout += 1
                    if rq.response_started:
                        rq.flags.append(F.UT)
                        rq.keep_alive = False  # response cut short: the client must see the close
                    else:
                        await self._reply(rq, failure_reply(F.UT, 504, f"route timeout {timeout:g}s"))
            else:
                await self._tries(rq, up_head)
        finally:
            fwd = rq.forward  # (set by the stages: the chain ran before)
            if fwd is not None and has_mirrors(fwd.route):  # (compiled: most routes mirror nothing)
                after_forward(rq)

    async def _reply(self, rq: Request, reply: LocalReply) -> None:
        if rq.body is not None and not rq.body.finished:
            rq.keep_alive = False
        await send_local(rq, reply)

    def _exchange_for(self, rq: Request, cs: ClusterState) -> UpstreamExchange:
        # the cluster's rule, once its first request has found it (protocols.wants_h2): the
        # two answers that need no look at the request, without an interpreted call
        rule = cs.h2_rule
        if rule == H2_NEVER:
            return self.h1
        if rule == H2_ALWAYS:
            return self.h2
        if rule == H2_IF_GRPC:  # an inbound listener's app, not declared HTTP/2
            return self.h2 if is_grpc(rq.head.headers) else self.h1
        return self.h2 if self.h2.carries(rq, cs) else self.h1

    async def _tries(self, rq: Request, up_head: RequestHead) -> None:
        rt = self.rt
        cs = rq.cluster
        assert cs is not None
        fwd = rq.forward
        policy = fwd.retry if fwd is not None else rq.snap.no_retry
        retries = 0
        rq.stale_ok = True
        # (rt.rand is read where it is used: not at all for a lone endpoint's one try)
        ctx: PickContext | None = None  # made for the first pick that needs it
        outlier = cs.outlier
        limiter = cs.limiter  # connectionPool limits (limits.py), None when the cluster has none
        exchange = self._exchange_for(rq, cs)
        # (typed: the runtime is Any here; dict operations on a typed dict are native calls)
        active: dict[tuple[str, int], int] = rt.active
        # retries.retryRemoteLocalities: the locality levels retries leave out (core/locality.py rule 6)
        prios = RetryPriorities() if policy.retry_remote_localities and cs.locality.active else None
        try:
            while True:
                if cs.shaped:  # locality load balancing, slow start
                    eps = cs.candidates(aio.current_time(), rt.rand, prios.before_pick() if prios is not None else frozenset())
                else:
                    eps = cs.healthy if outlier is None else cs.eligible(aio.current_time())
                ep: Endpoint | None
                if len(eps) == 1 and cs.lone_pick:
                    ep = eps[0]  # the balancer would take it without looking (no context to build)
                elif eps:
                    if ctx is None:
                        ctx = PickContext(headers=rq.headers, source_ip=rq.client_ip, path=up_head.path,
                                          active=rt.active)
                    ep = cs.balancer.pick(eps, ctx, rt.rand)
                else:
                    ep = None
                if ep is None:
                    await self._reply(rq, failure_reply(F.UH, 503, cs.name))
                    return
                if prios is not None:
                    prios.tried(cs.locality.level_of(ep))
                rq.endpoint = ep
                per_try = policy.per_try_timeout
                deadline = aio.current_time() + per_try if per_try else math.inf
                a = Attempt(rq, cs, ep, up_head, deadline, per_try, policy, retries, self)
                key = (a.address, a.port)
                active[key] = active.get(key, 0) + 1  # least-request balancing: requests in flight
                try:
                    result = await exchange.attempt(a)
                except PoolOverflow as exc:  # never retried, never an outlier event (as in Envoy)
                    cs.stats.rq_pending_overflow += 1  # Envoy counts both kinds here
                    rq.detail = str(exc)
                    await self._reply(rq, failure_reply(F.UO, 503, str(exc)))
                    return
                finally:
                    n = active[key] - 1
                    if n:
                        active[key] = n
                    else:
                        del active[key]
                t = type(result)
                if t is Stale:
                    rq.stale_ok = False  # once per request
                    if prios is not None:
                        prios.attempted.pop()  # not a try: the pooled connection was dead
                    continue
                if outlier is not None:
                    self._record(cs, ep, rq, result)
                if t is Relayed:
                    return
                if t is Retried:
                    assert isinstance(result, Retried)
                    await aio.sleep(result.delay)
                    retries += 1
                    cs.stats.rq_retry += 1
                    ctx = _tried(ctx, key, rq, up_head.path, active)
                    continue
                assert isinstance(result, Failed)
                body = rq.body
                verdict = decide(policy, retries, Outcome(failure=result.failure),
                                 body_replayable=body is None or body.replayable, rand=rt.rand)
                if type(verdict) is RetryAfter and self._hold_retry(rq, cs):
                    await aio.sleep(verdict.seconds)
                    retries += 1
                    cs.stats.rq_retry += 1
                    ctx = _tried(ctx, key, rq, up_head.path, active)
                    continue
                status = 504 if result.flag == F.UT else (502 if result.flag == F.UPE else 503)
                rq.detail = result.detail
                await self._reply(rq, failure_reply(result.flag, status, result.detail))
                return
        finally:
            if limiter is not None:
                limiter.release_retry(rq)

    @staticmethod
    def _hold_retry(rq: Request, cs: ClusterState) -> bool:
        """http.maxRetries: a request holds one of the cluster's retries from its
        first retry to its end (released in ``_tries``)."""
        return cs.limiter is None or cs.limiter.hold_retry(rq)

    def judge(self, a: Attempt, status: int, grpc_status: int | None) -> float | None:
        """Relay a response (None) or retry it (seconds to wait): the same rule for
        every upstream protocol, the retry budget included."""
        cs = a.cs
        cs.stats.response(status)
        policy = a.policy
        if not (status >= 500 or status == 409 or grpc_status or status in policy.retriable_status_codes):
            return None  # the common case: nothing to decide
        body = a.rq.body
        verdict = decide(policy, a.retries, Outcome(status=status, grpc_status=grpc_status or None),
                         body_replayable=body is None or body.replayable, rand=self.rt.rand)
        if type(verdict) is RetryAfter and self._hold_retry(a.rq, cs):
            return verdict.seconds
        return None

    @staticmethod
    def _record(cs: ClusterState, ep: Endpoint, rq: Request, result: TryResult) -> None:
        """Tell outlier detection how this try went."""
        outlier = cs.outlier
        assert outlier is not None
        host = (ep.address, ep.port)
        now = aio.current_time()
        t = type(result)
        if t is Relayed:
            if not rq.status or rq.status == 101:
                return
            ev = outlier.record(host, status=rq.status, now=now)
        elif t is Retried:
            assert isinstance(result, Retried)
            ev = outlier.record(host, status=result.status, now=now)
        elif t is Failed:
            assert isinstance(result, Failed)
            if result.failure not in LOCAL_FAILURES:
                return
            ev = outlier.record(host, status=None, local_failure=result.failure, now=now)
        else:
            return
        if ev is not None:
            log.info("outlier detection: ejected %s:%d from %s (%s)", host[0], host[1], cs.name, ev)

