"""The stages of the request chain (linkerd's app/outbound style); ``default_chain``
picks them per listener, and leaves out those the listener's config does not use:

    outbound, binding:  prepare → trace → source → route → fault → cluster
    inbound:            prepare → trace → source → ratelimit → jwt → authz → target → cluster
    gateway:            prepare → trace → source → ratelimit → jwt → authz → redirect → route → fault → cluster

    prepare   path normalization, hop-by-hop removal, x-forwarded-for, x-request-id
    trace     sampling and span context, B3 / W3C (tracing.py)
    source    telemetry: the peer's identity (telemetry.py)
    ratelimit local and global rate limits (ratelimit_stage.py)
    jwt       RequestAuthentication → 401 (jwt_stage.py)
    authz     AuthorizationPolicy (CUSTOM via extauthz.py, DENY, ALLOW) → 403
    redirect  a gateway server's tls.httpsRedirect → 301
    route     Router.decide → Forward | Redirect | DirectResponse | NoRoute; CORS;
              hosts outside the mesh (egress.py)
    fault     Istio fault injection: delay, abort (core.fault)
    target    the app's synthetic cluster
    cluster   cluster lookup, healthy endpoints (503 UH when none)

A stage is an object with ``async def on_request(rq) -> LocalReply | None``;
returning a LocalReply ends the chain and answers the client locally. After
the chain, the forwarder (forward.py) carries the request upstream.
Decisions come from core/ (route, fault, authz); stages only apply them.
"""

from __future__ import annotations

from dataclasses import replace

import meshctl.proxy.aio as aio
from ..core.authz import AuthzRequest, authorize, custom_check
from ..core.cors import cors
from ..core.fault import decide_fault
from ..core.mirror import has_mirrors
from ..core.pathnorm import PathRejected, normalize_path
from ..core.route import DirectResponse, Forward, NoRoute, Redirect, RequestView, Router
from ..model.base import FrozenDict
from ..model.istio import HeaderOperations
from ..model.proxyconfig import Listener, ProxyConfig
from ..protocol.grpc import GrpcStatus, local_grpc_reply
from ..protocol.headers import prepare_request_headers, trusted_client_address
from . import egress
from . import stats as F
from .extauthz import run_custom
from .jwt_stage import JWT_AUTHN
from .ratelimit_stage import RATE_LIMIT
from .request import LocalReply, Request, Stage, failure_reply, new_request_id
from .snapshot import Snapshot, binding_cluster_name
from .telemetry import SOURCE_STAGE
from .tracing import TRACE



class PrepareStage:
    name = "prepare"

    async def on_request(self, rq: Request) -> LocalReply | None:
        return self.decide(rq)

    def decide(self, rq: Request) -> LocalReply | None:
        head = rq.head
        # one normalized path for routing, authorization and the upstream (pathnorm.py)
        try:
            head.path = normalize_path(head.path, rq.snap.settings.path_normalization)
        except PathRejected as exc:
            return LocalReply(400, f"{exc}\n".encode(), [("content-type", "text/plain"),
                                                         ("x-meshctl-reason", "path rejected")], F.DPE)
        # hop-by-hop removal, x-forwarded-for, x-request-id (protocol/headers.py), in one pass
        # (the runtime's new_request_id, without its interpreted frame)
        rt = rq.rt  # (its rand read only when an id is made: a request forwarded by a sidecar has one)
        rq.headers, rq.request_id = prepare_request_headers(head.headers, rq.client_ip, lambda: new_request_id(rt.rand),
                                                            keep_upgrade=head.upgrade is not None)
        return None


def _authority_port(authority: str, default: int = 80) -> int:
    if authority.startswith("["):
        end = authority.find("]")
        rest = authority[end + 1 :]
        return int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default
    if ":" not in authority:  # (no port: a memchr, not rpartition's tuple of three strings)
        return default
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
        return self.decide(rq)

    def decide(self, rq: Request) -> LocalReply | None:
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
        assert lst.route_table is not None  # check_proxy_config: http bindings, outbound, gateway
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
            cs = snap.clusters.get(d.cluster)
            if cs is not None and not cs.cluster.external and not has_mirrors(d.route):
                rq.forward = d  # egress.on_forward's common case, without its interpreted frame
            else:
                egress.on_forward(rq, d)
            return None
        if type(d) is Redirect:
            return LocalReply(d.status, b"", [("location", d.location)])
        if type(d) is DirectResponse:
            return LocalReply(d.status, d.body, list(d.headers))
        if type(d) is NoRoute:
            if lst.direction == "outbound" and router.virtual_host(authority) is None:
                return unknown_host(rq, authority, router)
            r = failure_reply(F.NR, d.status or 404, d.reason)
            return r
        raise TypeError(f"router returned {d!r}")  # pragma: no cover


def unknown_host(rq: Request, authority: str, router: Router | None = None) -> LocalReply | None:
    """A host no virtual host serves, on the outbound listener: Istio's outbound
    traffic policy (egress.py). None: pass through to it."""
    snap = rq.snap
    if snap.settings.outbound_traffic_policy == "REGISTRY_ONLY":
        rq.cluster = egress.blackhole_cluster(snap)
        other = router.elsewhere(authority) if router is not None else []
        hint = f"; a short name is of this proxy's namespace: other namespaces have {', '.join(other)}" if other else ""
        return failure_reply(F.NR, 502, f"{egress.BLACKHOLE}: {authority} is not in the mesh's registry "
                             f"(outboundTrafficPolicy REGISTRY_ONLY){hint}")
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
            await aio.sleep(d.delay)
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
            auth=rq.auth, destination_ip=_local_ip(rq), sni=getattr(rq.down, "sni", None),
        )
        custom = custom_check(policies, areq)
        if custom is not None:  # CUSTOM first: the external authorizer (proxy/extauthz.py)
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
        return self.decide(rq)

    def decide(self, rq: Request) -> LocalReply | None:
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
        return self.decide(rq)

    def decide(self, rq: Request) -> LocalReply | None:
        rq.cluster = rq.snap.listener_clusters.get(rq.listener.name)
        return None


class ClusterStage:
    name = "cluster"

    async def on_request(self, rq: Request) -> LocalReply | None:
        return self.decide(rq)

    def decide(self, rq: Request) -> LocalReply | None:
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


def _full_chain(listener: Listener) -> tuple[Stage, ...]:
    if listener.direction == "inbound" and listener.route_table is None:
        return (PREPARE, TRACE, SOURCE_STAGE, RATE_LIMIT, JWT_AUTHN, AUTHZ, TARGET, CLUSTER)
    if listener.direction == "gateway":  # policy as on sidecars, before routing (Istio's gateway filter chain)
        return (PREPARE, TRACE, SOURCE_STAGE, RATE_LIMIT, JWT_AUTHN, AUTHZ, HTTPS_REDIRECT, ROUTE, FAULT, CLUSTER)
    return (PREPARE, TRACE, SOURCE_STAGE, ROUTE, FAULT, CLUSTER)


def _has_fault(cfg: ProxyConfig, table: str | None) -> bool:
    rt = cfg.route_tables.get(table) if table is not None else None
    return rt is not None and any(r.fault is not None for vh in rt.virtual_hosts for r in vh.routes)


def default_chain(listener: Listener, snap: Snapshot | None = None) -> tuple[Stage, ...]:
    """The listener's stages. With the snapshot the chain serves (the runtime
    rebuilds it at every apply, with the listeners), the stages that config
    cannot make do anything are left out: a request pays only for the stages
    its listener and config use (no tracing, rate limits, JWT rules,
    authorization policies, httpsRedirect hosts or fault-injecting routes:
    no trace, ratelimit, jwt, authz, https-redirect or fault stage). Each
    left-out stage would have returned None at once for that snapshot."""
    chain = _full_chain(listener)
    if snap is None:
        return chain
    cfg = snap.cfg
    s = snap.settings
    unused: set[Stage] = set()
    if not s.tracing_zipkin and not s.tracing_otlp:
        unused.add(TRACE)
    if not cfg.rate_limits:
        unused.add(RATE_LIMIT)
    if snap.jwt is None:
        unused.add(JWT_AUTHN)
    if not snap.authz_policies:
        unused.add(AUTHZ)
    if not listener.https_redirect:
        unused.add(HTTPS_REDIRECT)
    if not _has_fault(cfg, listener.route_table):
        unused.add(FAULT)
    return tuple(st for st in chain if st not in unused)
