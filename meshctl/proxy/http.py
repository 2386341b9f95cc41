"""The HTTP/1.1 pipeline: one downstream connection, request after request.

Per request, an ordered chain of stages runs (linkerd's app/outbound style):

    prepare   hop-by-hop removal, x-forwarded-for, x-request-id
    route     Router.decide → Forward | Redirect | DirectResponse | NoRoute   (outbound, binding, gateway)
    fault     Istio fault injection: delay, abort (core.fault)
    jwt       RequestAuthentication → 401                         (inbound, gateway)
    authz     AuthorizationPolicy → 403                                        (inbound)
    target    the app's synthetic cluster                                      (inbound)
    cluster   cluster lookup, healthy endpoints (503 UH when none)
    ── filters (fault, rate limit, authz, telemetry) slot in here ──
    forward   balancer pick → pooled upstream connection → stream both ways,
              per-route timeout, retries with per-try timeout and backoff

A stage is an object with ``async def on_request(rq) -> LocalReply | None``;
returning a LocalReply ends the chain and answers the client locally.
Decisions come from core/ (route, balance, retry); this module moves bytes.

Failures answer the client with 503/504 and ``x-meshctl-reason`` and set an
Envoy-style response flag (UF UR UT UH NR ...) on the request for telemetry.
A cluster with DestinationRule connectionPool limits takes its connections
from its own ``limits.ClusterLimiter``: over a limit, 503 UO at once
("upstream overflow"), never retried.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time
from dataclasses import replace
from typing import Protocol

import trio

from ..core.balance import PickContext
from ..core.cors import cors
from ..core.authz import AuthzRequest, RequestAuth, authorize, custom_check
from ..core.fault import decide_fault
from ..core.outlier import LOCAL_FAILURES
from ..core.pathnorm import PathRejected, normalize_path
from ..core.retry import Outcome, backoff, should_retry
from ..model.base import FrozenDict
from ..model.istio import HeaderOperations
from ..core.route import DirectResponse, Forward, NoRoute, Redirect, RequestView, apply_header_ops
from ..model.proxyconfig import Listener
from ..protocol.events import (
    Data,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Upgraded,
)
from ..protocol.grpc import GrpcStatus, local_grpc_reply
from ..protocol.headers import append_forwarded_for, ensure_request_id, strip_hop_by_hop, trusted_client_address
from ..protocol.http1 import H1Server
from . import egress, mirror
from . import stats as F
from .identity import upstream_tls
from .limits import PoolOverflow
from .pool import EventReader, UpstreamConn
from .snapshot import ClusterState, Snapshot, binding_cluster_name
from .ratelimit_stage import RATE_LIMIT
from .stream import UpstreamConnectError, relay
from .telemetry import SOURCE_STAGE, finish_request

log = logging.getLogger("meshctl.proxy")

_REASON_PHRASES = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class DownstreamGone(Exception):
    """The client went away (reset, EOF mid-body) — nothing more can be sent to it."""


class LocalReply:
    __slots__ = ("status", "body", "headers", "flag")

    def __init__(self, status: int, body: bytes = b"", headers: list | None = None, flag: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.flag = flag


def failure_reply(flag: str, status: int, detail: str = "") -> LocalReply:
    reason = F.REASONS.get(flag, flag)
    body = (reason + (f": {detail}" if detail else "") + "\n").encode()
    return LocalReply(
        status, body, [("content-type", "text/plain"), ("x-meshctl-reason", reason)], flag
    )


def raw_error_response(status: int, message: str) -> bytes:
    """An error response built without the codec (its state is unusable after a parse error)."""
    body = (message + "\n").encode("latin-1", "replace")
    phrase = _REASON_PHRASES.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


# ------------------------------------------------------------------ request context


class Request:
    """What the stages share about one request."""

    __slots__ = (
        "head", "listener", "snap", "rt", "client_ip", "server", "reader", "down",
        "headers", "request_id", "forward", "cluster", "flags", "body_done", "body",
        "response_started", "status", "keep_alive", "detail", "start", "stale_ok",
        "endpoint", "bytes_sent", "peer",  # telemetry: picked endpoint, response body bytes, source (inbound)
        "auth",  # the end user from a verified JWT (jwt_stage), for authz
        "trace",  # the spans of a sampled request (tracing.py); None when not sampled
    )

    def __init__(self, head: RequestHead, listener: Listener, snap: Snapshot, rt, client_ip: str,
                 server: H1Server, reader: EventReader, down: trio.abc.Stream) -> None:
        self.head = head
        self.listener = listener
        self.snap = snap
        self.rt = rt
        self.client_ip = client_ip
        self.server = server
        self.reader = reader
        self.down = down
        self.headers = head.headers
        self.request_id = ""
        self.forward: Forward | None = None
        self.cluster: ClusterState | None = None
        self.flags: list[str] = []
        self.body_done = False
        self.body: BodySource | None = None
        self.response_started = False
        self.status = 0
        self.keep_alive = head.keep_alive
        self.detail = ""
        self.start = 0.0
        self.stale_ok = True
        self.endpoint = None
        self.bytes_sent = 0
        self.peer = None
        self.auth: RequestAuth | None = None
        self.trace: tuple | None = None

    async def send_down(self, data: bytes) -> None:
        try:
            await self.down.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DownstreamGone(str(exc)) from None


class Stage(Protocol):
    name: str

    async def on_request(self, rq: Request) -> LocalReply | None: ...


# ------------------------------------------------------------------ request body


class BodySource:
    """The downstream request body, readable once per try.

    While it fits in ``limit`` bytes every chunk is kept, so a retry can replay
    it; past the limit the buffer is dropped and ``replayable`` turns False.
    """

    __slots__ = ("reader", "limit", "chunks", "size", "replayable", "finished", "trailers", "deadline")

    def __init__(self, reader: EventReader, limit: int, deadline: float = math.inf) -> None:
        self.reader = reader
        self.deadline = deadline  # Envoy's request_timeout: the whole body by then, else 408
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.replayable = True
        self.finished = False
        self.trailers: list = []

    def _take(self, ev) -> bytes | None:
        if type(ev) is Data:
            data = ev.data
            if self.replayable:
                self.size += len(data)
                if self.size > self.limit:
                    self.replayable = False
                    self.chunks = []
                else:
                    self.chunks.append(data)
            return data
        if type(ev) is EndOfMessage:
            self.finished = True
            self.trailers = ev.trailers
            return None
        raise DownstreamGone("client reset the request mid-body")

    def prefill(self) -> None:
        """Consume body events the codec already decoded (no I/O)."""
        reader = self.reader
        while not self.finished:
            ev = reader.peek()
            if ev is None or type(ev) not in (Data, EndOfMessage):
                return
            if type(ev) is Data and self.size + len(ev.data) > self.limit:
                return  # past the replay buffer: left for pull(), which streams it (nothing dropped)
            reader.pos += 1
            self._take(ev)

    async def pull(self, cursor: list[int]) -> bytes | None:
        """The next chunk for the try owning ``cursor``; None at the end."""
        i = cursor[0]
        if i < len(self.chunks):
            cursor[0] = i + 1
            return self.chunks[i]
        if self.finished:
            return None
        try:
            if self.deadline == math.inf:
                ev = await self.reader.next()
            else:
                ev = None
                with trio.move_on_at(self.deadline) as late:
                    ev = await self.reader.next()
                if late.cancelled_caught:
                    raise ProtocolError("request timeout: the request body did not arrive in time "
                                        "(settings.requestTimeout)", 408)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DownstreamGone(f"client connection lost mid-body: {exc}") from None
        if ev is None:
            raise DownstreamGone("client closed the connection mid-body")
        data = self._take(ev)
        cursor[0] = len(self.chunks)
        return data


# ------------------------------------------------------------------ stages


class PrepareStage:
    name = "prepare"

    async def on_request(self, rq: Request) -> LocalReply | None:
        head = rq.head
        # one normalized path for routing, authorization and the upstream (pathnorm.py)
        try:
            head.path = normalize_path(head.path, rq.snap.settings.path_normalization)
        except PathRejected as exc:
            return LocalReply(400, f"{exc}\n".encode(), [("content-type", "text/plain"),
                                                         ("x-meshctl-reason", "path rejected")], F.DPE)
        headers = strip_hop_by_hop(head.headers, keep_upgrade=head.upgrade is not None)
        headers = append_forwarded_for(headers, rq.client_ip)
        headers, rq.request_id = ensure_request_id(headers, rq.rt.new_request_id)
        rq.headers = headers
        return None


def _authority_port(authority: str, default: int = 80) -> int:
    if authority.startswith("["):
        end = authority.find("]")
        rest = authority[end + 1 :]
        return int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default
    _, sep, port = authority.rpartition(":")
    return int(port) if sep and port.isdigit() else default


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] or authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


class RouteStage:
    name = "route"

    async def on_request(self, rq: Request) -> LocalReply | None:
        lst = rq.listener
        head = rq.head
        snap = rq.snap
        if lst.direction == "binding":
            authority = f"{lst.service}:{lst.service_port}"
            port = lst.service_port
        elif lst.direction == "gateway":
            # the Gateway's port, not the host port it is served on; the Host's port is
            # ignored, as Istio's gateways do (a laptop serves 443 on 8443)
            authority = _strip_port(head.authority)
            port = lst.service_port or lst.port
        else:
            authority = head.authority
            port = _authority_port(authority)
        if lst.route_table is None:
            # binding without a route table: straight to the service's cluster
            cs = snap.clusters.get(binding_cluster_name(lst))
            rq.cluster = cs
            return None
        router = snap.routers[lst.route_table]
        view = RequestView(
            method=head.method,
            scheme=head.scheme,
            authority=authority,
            path=head.path,
            headers=rq.headers,
            port=port,
            source_labels=snap.source_labels,
            source_namespace=snap.source_namespace,
            gateway=(lst.name if "/" in lst.name else f"{snap.source_namespace}/{lst.name}")
            if lst.direction == "gateway"
            else None,
            claims=rq.auth.claims if rq.auth is not None else None,
        )
        d = router.decide(view, rq.rt.rand)
        if type(d) is Forward:
            if d.route.cors_policy is not None:
                preflight, extra = cors(d.route.cors_policy, head.method, rq.headers)
                if preflight:
                    return LocalReply(200, b"", extra)
                if extra:
                    d = replace(d, response_ops=d.response_ops + (HeaderOperations(set=FrozenDict(extra)),))
            egress.on_forward(rq, d)
            return None
        if type(d) is Redirect:
            return LocalReply(d.status, b"", [("location", d.location)])
        if type(d) is DirectResponse:
            return LocalReply(d.status, d.body, list(d.headers))
        if type(d) is NoRoute:
            if lst.direction == "outbound" and router.virtual_host(authority) is None:
                return unknown_host(rq, authority)
            r = failure_reply(F.NR, d.status or 404, d.reason)
            return r
        raise TypeError(f"router returned {d!r}")  # pragma: no cover


def unknown_host(rq: Request, authority: str) -> LocalReply | None:
    """A host no virtual host serves, on the outbound listener: Istio's outbound
    traffic policy (egress.py). None: pass through to it."""
    snap = rq.snap
    if snap.settings.outbound_traffic_policy == "REGISTRY_ONLY":
        rq.cluster = egress.blackhole_cluster(snap)
        return failure_reply(F.NR, 502, f"{egress.BLACKHOLE}: {authority} is not in the mesh's registry "
                             "(outboundTrafficPolicy REGISTRY_ONLY)")
    target = egress.split_authority(authority, 443 if rq.head.scheme == "https" else 80)
    if target is None:
        return failure_reply(F.NR, 404, f"no route for {authority!r}")
    rq.cluster = egress.passthrough_cluster(snap, target[0], target[1])
    rq.headers = egress.without_internal(rq.headers)
    return None


class FaultStage:
    """Istio fault injection (core.fault decides): delay, then maybe abort locally."""

    name = "fault"

    async def on_request(self, rq: Request) -> LocalReply | None:
        fwd = rq.forward
        if fwd is None or fwd.fault is None:
            return None
        d = decide_fault(fwd.fault, rq.rt.rand)
        if d.delay is not None:
            rq.flags.append(F.DI)
            await trio.sleep(d.delay)
        if d.abort_status is not None:
            return LocalReply(
                d.abort_status, b"fault filter abort\n",
                [("content-type", "text/plain"), ("x-meshctl-reason", "fault filter abort")], F.FI,
            )
        if d.grpc_status is not None:
            # trailers-only gRPC reply; grpcStatus may be a code name ("UNAVAILABLE") or a number
            g = str(d.grpc_status).strip()
            code = int(g) if g.isdigit() else GrpcStatus.__members__.get(g.upper(), GrpcStatus.UNKNOWN)
            head, _ = local_grpc_reply(code, "fault filter abort")
            return LocalReply(200, b"", head.headers, F.FI)
        return None


class AuthzStage:
    """Inbound AuthorizationPolicy (core.authz decides); 403 when denied.
    The source principal is the peer's verified SPIFFE ID (identity.SecureStream);
    without mTLS on the connection there is none."""

    name = "authz"

    async def on_request(self, rq: Request) -> LocalReply | None:
        policies = rq.snap.authz_policies
        if not policies:
            return None
        head = rq.head
        lst = rq.listener
        gateway = lst.direction == "gateway"
        areq = AuthzRequest(
            method=head.method, path=head.path, host=head.authority,
            port=(lst.service_port or lst.port) if gateway else (lst.app_port or lst.port),
            headers=rq.headers, source_principal=getattr(rq.down, "peer_id", None), source_ip=rq.client_ip,
            remote_ip=trusted_client_address(head.headers, rq.client_ip, lst.trusted_proxies) if gateway else None,
            auth=rq.auth, destination_ip=_local_ip(rq),
        )
        custom = custom_check(policies, areq)
        if custom is not None:  # CUSTOM first: the external authorizer (proxy/extauthz.py)
            from .extauthz import run_custom

            reply = await run_custom(rq, custom[0], custom[1])
            if reply is not None:
                return reply
        d = authorize(policies, areq)
        if d.allowed:
            return None
        rq.detail = d.reason
        return LocalReply(403, b"RBAC: access denied\n",
                          [("content-type", "text/plain"), ("x-meshctl-reason", "access denied")], F.RBAC)


class HttpsRedirectStage:
    """Gateway servers with ``tls.httpsRedirect``: 301 to https:// for their hosts (Istio's)."""

    name = "https-redirect"

    async def on_request(self, rq: Request) -> LocalReply | None:
        hosts = rq.listener.https_redirect
        if not hosts:
            return None
        host = _strip_port(rq.head.authority).lower()
        for h in hosts:
            if h == "*" or h.lower() == host or (h.startswith("*.") and host.endswith(h[1:].lower())):
                return LocalReply(301, b"", [("location", f"https://{host}{rq.head.path}")])
        return None


def _local_ip(rq: Request) -> str | None:
    """The address the request arrived at (authz destination.ip): the listener's, or the socket's when wildcard."""
    addr = rq.listener.address
    if addr and addr not in ("0.0.0.0", "::"):
        return addr
    sock = getattr(rq.down, "socket", None)
    try:
        return sock.getsockname()[0] if sock is not None else None
    except OSError:
        return None


class InboundTargetStage:
    name = "target"

    async def on_request(self, rq: Request) -> LocalReply | None:
        rq.cluster = rq.snap.listener_clusters.get(rq.listener.name)
        return None


class ClusterStage:
    name = "cluster"

    async def on_request(self, rq: Request) -> LocalReply | None:
        if rq.cluster is None:
            fwd = rq.forward
            name = fwd.cluster if fwd is not None else binding_cluster_name(rq.listener)
            rq.cluster = rq.snap.clusters.get(name)
            if rq.cluster is None:
                return failure_reply("NC", 503, f"cluster {name} not found")
        if not rq.cluster.healthy:
            return failure_reply(F.UH, 503, rq.cluster.name)
        return None


PREPARE = PrepareStage()
ROUTE = RouteStage()
FAULT = FaultStage()
AUTHZ = AuthzStage()
HTTPS_REDIRECT = HttpsRedirectStage()
TARGET = InboundTargetStage()
CLUSTER = ClusterStage()


def default_chain(listener: Listener) -> tuple[Stage, ...]:
    from .jwt_stage import JWT_AUTHN
    from .tracing import TRACE

    if listener.direction == "inbound" and listener.route_table is None:
        return (PREPARE, TRACE, SOURCE_STAGE, RATE_LIMIT, JWT_AUTHN, AUTHZ, TARGET, CLUSTER)
    if listener.direction == "gateway":  # policy as on sidecars, before routing (Istio's gateway filter chain)
        return (PREPARE, TRACE, SOURCE_STAGE, RATE_LIMIT, JWT_AUTHN, AUTHZ, HTTPS_REDIRECT, ROUTE, FAULT, CLUSTER)
    return (PREPARE, TRACE, SOURCE_STAGE, ROUTE, FAULT, CLUSTER)


# ------------------------------------------------------------------ forwarding


class _Retry(Exception):
    pass


_DONE = object()
_STALE = object()
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Forwarder:
    """The terminal stage: tries, retries, timeouts, streaming both ways."""

    def __init__(self, rt) -> None:
        self.rt = rt

    def _upstream_head(self, rq: Request) -> RequestHead:
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
        headers = [h for h in headers if h[0] != "host"]
        return RequestHead(
            method=head.method,
            target=path,
            headers=headers,
            http_version="1.1",
            scheme="http",
            authority=authority,
            path=path,
            keep_alive=True,
            expect_continue=head.expect_continue,
            upgrade=head.upgrade,
        )

    async def run(self, rq: Request) -> None:
        """Forward the request; on return the client has its response (or is gone).
        Sets rq.keep_alive False when the connection must close."""
        fwd = rq.forward
        timeout = fwd.timeout if fwd is not None else None
        if not rq.body_done:
            rt_s = float(rq.snap.settings.request_timeout)
            rq.body = BodySource(rq.reader, rq.snap.settings.retry_buffer_bytes,
                                 trio.current_time() + rt_s if rt_s > 0 else math.inf)
            rq.body.prefill()
        up_head = self._upstream_head(rq)
        if timeout:
            with trio.move_on_after(timeout) as scope:
                await self._tries(rq, up_head)
            if scope.cancelled_caught:
                rq.cluster.stats.rq_timeout += 1
                if rq.response_started:
                    rq.flags.append(F.UT)
                    rq.keep_alive = False  # response cut short: the client must see the close
                else:
                    await self._reply(rq, failure_reply(F.UT, 504, f"route timeout {timeout:g}s"))
        else:
            await self._tries(rq, up_head)

    async def _reply(self, rq: Request, reply: LocalReply) -> None:
        if rq.body is not None and not rq.body.finished:
            rq.keep_alive = False
        await send_local(rq, reply)

    async def _tries(self, rq: Request, up_head: RequestHead) -> None:
        rt = self.rt
        cs = rq.cluster
        fwd = rq.forward
        policy = fwd.retry if fwd is not None else rq.snap.no_retry
        retries = 0
        rq.stale_ok = True
        rand = rt.rand
        ctx = PickContext(headers=rq.headers, source_ip=rq.client_ip, path=up_head.path, active=rt.active)
        outlier = cs.outlier
        limiter = cs.limiter  # connectionPool limits (limits.py), None when the cluster has none
        try:
            while True:
                eps = cs.healthy if outlier is None else cs.eligible(trio.current_time())
                ep = cs.balancer.pick(eps, ctx, rand) if eps else None
                if ep is None:
                    await self._reply(rq, failure_reply(F.UH, 503, cs.name))
                    return
                rq.endpoint = ep
                try:
                    outcome, flag, detail = await self._try(rq, cs, ep, up_head, policy, retries)
                except PoolOverflow as exc:  # never retried, never an outlier event (as in Envoy)
                    cs.stats.rq_pending_overflow += 1  # Envoy counts both kinds here
                    rq.detail = str(exc)
                    await self._reply(rq, failure_reply(F.UO, 503, str(exc)))
                    return
                if outlier is not None and outcome is not _STALE:
                    self._record(cs, ep, rq, outcome)
                if outcome is _DONE:
                    return
                if outcome is _STALE:
                    rq.stale_ok = False  # once per request
                    continue
                body = rq.body
                replayable = body is None or body.replayable
                # http.maxRetries: a request holds one retry from its first retry to its end
                # (taken by _respond for a status: it decides whether to relay the response;
                # a status whose response is already gone is retried anyway)
                if should_retry(policy, retries, outcome, body_replayable=replayable) and (
                        limiter is None or limiter.hold_retry(rq) or outcome.status is not None):
                    await trio.sleep(backoff(policy, retries, rand))
                    retries += 1
                    cs.stats.rq_retry += 1
                    continue
                if outcome.status is not None:  # pragma: no cover - statuses are decided in _try
                    raise AssertionError("unreachable")
                status = 504 if flag == F.UT else (502 if flag == F.UPE else 503)
                rq.detail = detail
                await self._reply(rq, failure_reply(flag, status, detail))
                return
        finally:
            if limiter is not None:
                limiter.release_retry(rq)

    @staticmethod
    def _record(cs: ClusterState, ep, rq: Request, outcome) -> None:
        """Tell outlier detection how this try went."""
        host = (ep.address, ep.port)
        now = trio.current_time()
        if outcome is _DONE:
            if not rq.status or rq.status == 101:
                return
            ev = cs.outlier.record(host, status=rq.status, now=now)
        elif outcome.status is not None:
            ev = cs.outlier.record(host, status=outcome.status, now=now)
        elif outcome.failure in LOCAL_FAILURES:
            ev = cs.outlier.record(host, status=None, local_failure=outcome.failure, now=now)
        else:
            return
        if ev is not None:
            log.info("outlier detection: ejected %s:%d from %s (%s)", host[0], host[1], cs.name, ev)

    async def _try(self, rq: Request, cs: ClusterState, ep, up_head: RequestHead, policy, retries: int):
        """One try. Returns (_DONE, None, "") when a response went downstream,
        else (Outcome, flag, detail) for a failed try."""
        if wants_h2(rq, cs):  # HTTP/2 upstream (h2pool.py)
            return await h2_try(self, rq, cs, ep, up_head, policy, retries)
        rt = self.rt
        settings = rq.snap.settings
        key = (ep.address, ep.port)
        per_try = policy.per_try_timeout
        pool = rt.pool if cs.limiter is None else cs.limiter  # limiter: connectionPool limits, may overflow
        if per_try:
            try_deadline = trio.current_time() + per_try
            conn = None
            with trio.move_on_at(try_deadline):
                try:
                    conn = await pool.acquire(ep.address, ep.port, cs.stats, settings.connect_timeout,
                                               upstream_tls(rt, cs.cluster, ep))
                except UpstreamConnectError as exc:
                    return Outcome(failure="connect-failure"), F.UF, str(exc)
            if conn is None:
                return Outcome(failure="timeout"), F.UT, f"per-try timeout {per_try:g}s while connecting"
        else:
            try_deadline = math.inf
            try:
                conn = await pool.acquire(ep.address, ep.port, cs.stats, settings.connect_timeout,
                                               upstream_tls(rt, cs.cluster, ep))
            except UpstreamConnectError as exc:
                return Outcome(failure="connect-failure"), F.UF, str(exc)
        active = rt.active
        active[key] = active.get(key, 0) + 1
        try:
            return await self._exchange(rq, cs, conn, up_head, policy, retries, try_deadline)
        finally:
            n = active[key] - 1
            if n:
                active[key] = n
            else:
                del active[key]

    async def _exchange(self, rq: Request, cs: ClusterState, conn: UpstreamConn, up_head: RequestHead,
                        policy, retries: int, try_deadline: float):
        rt = self.rt
        body = rq.body
        client = conn.client
        stream = conn.stream
        ok = False
        try:
            if body is None or (body.finished and body.replayable):
                # whole request in hand: one write, no helper task
                if body is None:
                    out = client.request_head(up_head, end_stream=True)
                else:
                    parts = [client.request_head(up_head, end_stream=not body.chunks)]
                    for c in body.chunks:
                        parts.append(client.data(c))
                    if body.chunks or body.trailers:
                        parts.append(client.end(body.trailers))
                    out = b"".join(parts)
                try:
                    await stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the response read below reports the reset
                result = await self._respond(rq, cs, conn, policy, retries, try_deadline, None)
                ok = result[0] is _DONE and client.keep_alive
                return result
            # stream the body while reading the response
            result = None
            failure: list = []
            main_error: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_body, rq, conn, up_head, failure, nursery.cancel_scope)
                try:
                    result = await self._respond(rq, cs, conn, policy, retries, try_deadline, nursery)
                except (DownstreamGone, ProtocolError) as exc:
                    # kept out of the nursery, which would wrap it in an ExceptionGroup
                    main_error.append(exc)
                finally:
                    if not body.finished:
                        # the upstream answered (or failed) before the body was done
                        nursery.cancel_scope.cancel()
            if main_error:
                raise main_error[0]
            if failure:
                exc = failure[0]
                if isinstance(exc, ProtocolError):
                    rq.keep_alive = False
                    if not rq.response_started:
                        rq.flags.append(F.DPE)
                        await rq.send_down(raw_error_response(exc.status, str(exc)))
                        rq.status = exc.status
                    return _DONE, None, ""
                raise exc
            if result is None:  # body sender cancelled the try (client gone)
                raise DownstreamGone("client went away")
            if not body.finished:
                rq.keep_alive = False
            ok = result[0] is _DONE and client.keep_alive and body.finished
            return result
        finally:
            pool = rt.pool if cs.limiter is None else cs.limiter
            if ok:
                pool.release(conn)
            else:
                pool.discard(conn)

    async def _send_body(self, rq: Request, conn: UpstreamConn, up_head: RequestHead, failure: list,
                         cancel: trio.CancelScope) -> None:
        client = conn.client
        stream = conn.stream
        body = rq.body
        cursor = [0]
        try:
            pending = [client.request_head(up_head, end_stream=False)]
            while True:
                if not (body.finished or cursor[0] < len(body.chunks)) and pending:
                    # the next chunk needs I/O: flush what is in hand first
                    await stream.send_all(b"".join(pending))
                    pending = []
                chunk = await body.pull(cursor)
                if chunk is None:
                    pending.append(client.end(body.trailers))
                    await stream.send_all(b"".join(pending))
                    return
                pending.append(client.data(chunk))
                if len(pending) >= 16:
                    await stream.send_all(b"".join(pending))
                    pending = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # upstream closed: the response side reports it
        except (DownstreamGone, ProtocolError) as exc:
            failure.append(exc)
            cancel.cancel()

    async def _read_head(self, rq: Request, conn: UpstreamConn) -> ResponseHead | None:
        """The final response head (1xx are relayed to the client); None on reset/EOF."""
        reader = conn.reader
        while True:
            ev = await reader.next()
            if type(ev) is ResponseHead:
                st = ev.status
                if 100 <= st < 200 and st != 101:
                    if st == 100 and not rq.head.expect_continue:
                        continue  # the client did not ask for it
                    await rq.send_down(rq.server.informational(ev))
                    continue
                return ev
            return None

    async def _respond(self, rq: Request, cs: ClusterState, conn: UpstreamConn, policy, retries: int,
                       try_deadline: float, nursery):
        timed_out = False
        try:
            if try_deadline == math.inf:
                head = await self._read_head(rq, conn)
            else:
                head = None
                with trio.move_on_at(try_deadline) as scope:
                    head = await self._read_head(rq, conn)
                timed_out = scope.cancelled_caught
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            head = None
        except ProtocolError as exc:
            return Outcome(failure="reset"), F.UPE, str(exc)
        if timed_out:
            return Outcome(failure="timeout"), F.UT, "per-try timeout"
        body = rq.body
        if head is None:
            if (conn.reused and rq.stale_ok and rq.head.method in IDEMPOTENT and not rq.head.expect_continue
                    and (body is None or body.replayable)):
                # a kept-alive connection the upstream had closed: RFC 9110 9.2.2
                # lets a client retry an idempotent request once on a new one
                return _STALE, None, ""
            return Outcome(failure="reset"), F.UR, f"{conn.key[0]}:{conn.key[1]} closed the connection"
        status = head.status
        if status >= 500 or status in policy.retriable_status_codes or status == 409:
            replayable = body is None or body.replayable
            if should_retry(policy, retries, Outcome(status=status), body_replayable=replayable) and (
                    cs.limiter is None or cs.limiter.hold_retry(rq)):  # http.maxRetries
                cs.stats.response(status)
                return Outcome(status=status), None, ""
        cs.stats.response(status)
        if status == 101:
            await self._upgrade(rq, conn, head)
            return _DONE, None, ""
        await self._stream_response(rq, conn, head)
        return _DONE, None, ""

    async def _stream_response(self, rq: Request, conn: UpstreamConn, head: ResponseHead) -> None:
        server = rq.server
        headers = response_headers(rq, head.headers)
        if not rq.keep_alive or self.rt.draining:
            head.keep_alive = False
            rq.keep_alive = False
            headers.append(("connection", "close"))
        head.headers = headers
        rq.response_started = True
        rq.status = head.status
        reader = conn.reader
        out = [server.response_head(head)]
        while True:
            ev = reader.buffered()
            if ev is None:
                if out:
                    await rq.send_down(b"".join(out))
                    out = []
                try:
                    ev = await reader.next()
                except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
                    ev = None
            t = type(ev)
            if t is Data:
                out.append(server.data(ev.data))
                rq.bytes_sent += len(ev.data)
            elif t is EndOfMessage:
                out.append(server.end(ev.trailers))
                break
            else:
                # upstream reset mid-body: the client can only learn it from the close
                rq.flags.append(F.UR)
                rq.keep_alive = False
                if out:
                    await rq.send_down(b"".join(out))
                conn.stream.close_now()
                return
        await rq.send_down(b"".join(out))
        if not server.keep_alive:
            rq.keep_alive = False

    async def _upgrade(self, rq: Request, conn: UpstreamConn, head: ResponseHead) -> None:
        server = rq.server
        head.headers = strip_hop_by_hop(head.headers, keep_upgrade=True)
        rq.response_started = True
        rq.status = 101
        rq.keep_alive = False
        await rq.send_down(server.response_head(head))
        down_left = server.upgrade_accepted()
        up_left = b""
        ev = conn.reader.buffered()
        if type(ev) is Upgraded:
            up_left = ev.leftover
        try:
            if up_left:
                await rq.send_down(up_left)
            if down_left:
                await conn.stream.send_all(down_left)
            await relay(rq.down, conn.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        conn.stream.close_now()


def response_headers(rq: Request, headers):
    """An upstream response's headers as the client gets them, whatever the protocol
    on either side: hop-by-hop fields dropped, the route's header operations applied."""
    headers = strip_hop_by_hop(headers)
    fwd = rq.forward
    if fwd is not None:
        for ops in fwd.response_ops:
            headers = apply_header_ops(headers, ops)
    return headers


async def send_local(rq: Request, reply: LocalReply) -> None:
    server = rq.server
    headers = list(reply.headers)
    body = reply.body
    if not any(k == "content-length" for k, _ in headers):
        headers.append(("content-length", str(len(body))))
    if rq.request_id:
        headers.append(("x-request-id", rq.request_id))
    if rq.rt.draining:
        rq.keep_alive = False
    head = ResponseHead(status=reply.status, headers=headers, keep_alive=rq.keep_alive)
    if reply.flag:
        rq.flags.append(reply.flag)
    rq.status = reply.status
    rq.response_started = True
    if not rq.keep_alive:
        headers.append(("connection", "close"))
    is_head = rq.head.method == "HEAD"
    parts = [server.response_head(head, end_stream=not body or is_head)]
    if body and not is_head:
        parts.append(server.data(body))
        parts.append(server.end())
        rq.bytes_sent = len(body)
    await rq.send_down(b"".join(parts))
    if not server.keep_alive:
        rq.keep_alive = False


# ------------------------------------------------------------------ connection loop


class ConnState:
    """One downstream connection, as the runtime sees it.

    ``deadline`` (trio clock) is when the connection is closed if it is still
    waiting for a request head: the runtime's watchdog checks it a few times
    a second. A float store per request is much cheaper than moving a cancel
    scope's deadline, and header/idle timeouts don't need finer resolution.
    ``busy`` is False between requests (drain closes those at once)."""

    __slots__ = ("scope", "busy", "deadline", "rq", "since", "sock", "server")

    def __init__(self, sock=None) -> None:
        self.server: H1Server | None = None  # HTTP/1.1: the watchdog asks it whether a head has begun
        self.scope = trio.CancelScope()
        self.busy = False
        self.deadline = math.inf
        self.rq: Request | None = None  # the request in progress
        self.since = 0.0  # when it started
        self.sock = sock  # the downstream socket, when it is one

    def client_gone(self) -> bool:
        """Has the client closed its side while we wait for the upstream?
        (One MSG_PEEK; pipelined bytes mean it is still there.) Like Envoy,
        a downstream half-close before the response counts as gone."""
        rq = self.rq
        if self.sock is None or rq is None or rq.response_started:
            return False
        if not (rq.body_done or (rq.body is not None and rq.body.finished)):
            return False  # still reading the body: a close shows up there
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


async def serve_http_connection(rt, active_listener, stream: trio.abc.Stream, client_ip: str) -> None:
    """Serve requests on one downstream connection until it closes.
    Never raises for network or protocol trouble."""
    conn = ConnState(getattr(stream, "socket", None))
    rt.conns.add(conn)
    lstats = rt.stats.listener(active_listener.spec.name)
    lstats.cx_active += 1
    lstats.cx_total += 1
    forwarder = rt.forwarder
    try:
        snap: Snapshot = rt.snapshot
        server = H1Server(snap.limits)
        conn.server = server
        reader = EventReader(stream, server)
        first = True
        with conn.scope:
            # HTTP/2 prior knowledge or HTTP/1.1, told from the first bytes (h2conn.py)
            conn.deadline = trio.current_time() + snap.settings.request_headers_timeout
            try:
                kind, prefix = await sniff(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if kind is None:
                return
            if kind == "h2":
                await serve_h2_connection(rt, active_listener, stream, client_ip, prefix, conn, lstats)
                return
            while True:
                if not first:  # the first head keeps the deadline set before sniffing it
                    conn.deadline = trio.current_time() + rt.snapshot.settings.idle_timeout
                first = False
                conn.busy = False
                if rt.closing:  # drain period over; during it, responses close their connection
                    break
                try:
                    if prefix:
                        reader.events, reader.pos, prefix = server.feed(prefix), 0, b""
                    ev = await reader.next()
                except ProtocolError as exc:
                    rt.stats.flag(F.DPE)
                    lstats.response(exc.status)
                    log.info("rejected request from %s: %s (%d)", client_ip, exc, exc.status)
                    try:
                        await stream.send_all(raw_error_response(exc.status, str(exc)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if ev is None or type(ev) is not RequestHead:
                    break
                if ev.upgrade == "connect" and active_listener.spec.direction == "outbound" and egress.tunnels(
                        rt.snapshot, active_listener.spec.route_table, ev.authority):
                    # HTTPS through HTTPS_PROXY, or a host outside the mesh: a TCP tunnel (egress.py)
                    if type(reader.peek()) is EndOfMessage:
                        reader.pos += 1
                    await egress.tunnel(rt, rt.snapshot, server, active_listener.spec.route_table, ev.authority, stream)
                    break
                if ev.upgrade == "connect" and active_listener.spec.direction == "outbound":
                    # Node's fetch with NODE_USE_ENV_PROXY=1 tunnels plain-HTTP requests too
                    # (CONNECT backend:9080): accept, and serve what comes through the tunnel
                    # as requests made to this listener, routed by their Host.
                    if type(reader.peek()) is EndOfMessage:
                        reader.pos += 1
                    await stream.send_all(server.response_head(ResponseHead(200, [], reason="Connection established")))
                    prefix = server.upgrade_accepted()
                    server = H1Server(snap.limits)
                    reader = EventReader(stream, server)
                    first = True
                    continue
                conn.busy = True
                conn.deadline = math.inf
                snap = rt.snapshot
                listener = active_listener.spec
                rq = Request(ev, listener, snap, rt, client_ip, server, reader, stream)
                conn.rq = rq
                conn.since = trio.current_time()
                nxt = reader.peek()
                if type(nxt) is EndOfMessage:
                    reader.pos += 1
                    rq.body_done = True
                try:
                    reply = None
                    for stage in active_listener.chain:
                        reply = await stage.on_request(rq)
                        if reply is not None:
                            break
                    if reply is not None:
                        if not rq.body_done:
                            rq.keep_alive = False  # unread body: cannot frame the next request
                        await send_local(rq, reply)
                    else:
                        await forwarder.run(rq)
                        mirror.after_forward(rq)
                except (DownstreamGone, trio.BrokenResourceError, trio.ClosedResourceError):
                    rq.keep_alive = False
                    rq.flags.append(F.DC)
                except ProtocolError as exc:  # malformed body from the client
                    rq.keep_alive = False
                    rq.flags.append(F.DPE)
                    if not rq.response_started:
                        rq.status = exc.status
                        try:
                            await stream.send_all(raw_error_response(exc.status, str(exc)))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                if rq.status:
                    lstats.response(rq.status)
                finish_request(rq, conn.since, trio.current_time(), time.time())
                for f in rq.flags:
                    rt.stats.flag(f)
                if rq.flags and rq.flags[0] not in (F.DC,):
                    log.info(
                        "%s %s %s -> %d %s %s",
                        listener.name, rq.head.method, rq.head.authority + rq.head.path, rq.status,
                        ",".join(rq.flags), rq.detail,
                    )
                if not rq.keep_alive:
                    break
                if rq.body is not None and not rq.body.finished:
                    break
    finally:
        conn.busy = False
        rt.conns.discard(conn)
        lstats.cx_active -= 1
        if hasattr(stream, "close_now"):
            stream.close_now()
        else:
            with trio.CancelScope(shield=True):
                await stream.aclose()


def new_request_id(rand: random.Random) -> str:
    h = "%032x" % rand.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


from .h2conn import serve_h2_connection, sniff  # noqa: E402  (h2conn imports this module)
from .h2pool import h2_try, wants_h2  # noqa: E402
