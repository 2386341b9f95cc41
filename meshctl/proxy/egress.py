"""Traffic to hosts outside the mesh: Istio's outbound traffic policy, and what
never leaves the mesh.

- A request on the outbound (HTTP_PROXY) listener whose authority matches no
  virtual host is unknown to the mesh. Under ``ALLOW_ANY`` (Istio's default)
  it passes through to that host and port, as Envoy's ``PassthroughCluster``
  does; under ``REGISTRY_ONLY`` it gets a local 502 with the ``NR`` flag,
  as Envoy's ``BlackHoleCluster``. Telemetry reports either cluster name as
  the destination service, as Istio's does.
- Requests to a passthrough host or to a MESH_EXTERNAL ServiceEntry carry no
  ``x-meshctl-*`` header: the source identity headers are for the
  destination's sidecar, and there is none outside the mesh.

- HTTPS through ``HTTPS_PROXY`` arrives as ``CONNECT host:443``: ``tunnel``
  opens a TCP connection to the host (or to an endpoint of the ServiceEntry
  that names it), answers 200 and relays the bytes as they are (the TLS is
  the app's, end to end). Under REGISTRY_ONLY an unknown host's CONNECT gets
  502, as an HTTP request would.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import meshctl.proxy.aio as aio
from ..core.route import Forward
from ..model.proxyconfig import Cluster, Endpoint
from ..model.proxyconfig import cluster_name
from ..protocol.events import ResponseHead
from . import stats as F
from .request import KeptResponse
from .snapshot import ClusterState, Snapshot
from .errors import PeerGone, send_all
from .stream import UpstreamConnectError, relay

log = logging.getLogger("meshctl.proxy")

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INTERNAL_PREFIX = "x-meshctl-"
_MAX_HOSTS = 1024  # passthrough cluster states kept per snapshot


def without_internal(headers):
    """The request headers with meshctl's own (``x-meshctl-*``) taken off."""
    for k, _ in headers:
        if k.startswith(INTERNAL_PREFIX):
            return [h for h in headers if not h[0].startswith(INTERNAL_PREFIX)]
    return headers


def on_forward(rq, fwd: Forward) -> None:
    """Set ``rq.forward`` for a routed request: as it may leave the mesh (no
    x-meshctl-* headers to an external cluster), and for a ServiceEntry of
    resolution NONE, to the host the request names (``rq.cluster``). The route stage
    (stages.py) sets ``rq.forward`` itself for a known, internal cluster of a route
    that mirrors nothing (the common case), and calls this for the rest."""
    snap = rq.snap
    if fwd.route.mirror is not None or fwd.route.mirrors:
        rq.start = aio.current_time()  # the primary's latency, for mirror comparisons (mirror.py)
        rq.kept = KeptResponse()  # its response headers and body, for the same
    cs = snap.clusters.get(fwd.cluster)
    if cs is None or not cs.cluster.external:
        rq.forward = fwd
        return
    headers = without_internal(fwd.request_headers)
    rq.forward = fwd if headers is fwd.request_headers else replace(fwd, request_headers=headers)
    if cs.cluster.original_destination:
        target = split_authority(fwd.authority, cs.cluster.port)
        if target is not None:
            rq.cluster = passthrough_cluster(snap, target[0], target[1], cs.cluster)


def split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    host, port = authority, default_port
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, rest = authority[1:end], authority[end + 1 :]
        if rest.startswith(":"):
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif ":" in authority:
        host, _, p = authority.rpartition(":")
        if not p.isdigit():
            return None
        port = int(p)
    if not host or not 0 < port < 65536:
        return None
    return host.lower(), port


def passthrough_cluster(snap: Snapshot, host: str, port: int, entry: Cluster | None = None) -> ClusterState:
    """The cluster state for one destination host the request names (kept per
    snapshot, bounded): Envoy's PassthroughCluster, or a resolution NONE
    ServiceEntry's cluster (``entry``: its name, service and traffic policy)."""
    cache = snap.passthrough
    key = (host, port, entry.name if entry is not None else PASSTHROUGH)
    cs = cache.get(key)
    if cs is None:
        if len(cache) >= _MAX_HOSTS:
            cache.clear()
        ep = Endpoint(address=host, port=port, instance=f"{host}:{port}")
        if entry is None:
            cluster = Cluster(name=PASSTHROUGH, service=PASSTHROUGH, port=port, external=True, endpoints=(ep,))
        else:
            cluster = replace(entry, endpoints=(ep,), original_destination=False)
        cs = cache[key] = ClusterState(cluster, snap.stats.cluster(cluster.name))
    return cs


def blackhole_cluster(snap: Snapshot) -> ClusterState:
    cs = snap.passthrough.get(("", 0, BLACKHOLE))
    if cs is None:
        cluster = Cluster(name=BLACKHOLE, service=BLACKHOLE, port=0, external=True)
        cs = snap.passthrough[("", 0, BLACKHOLE)] = ClusterState(cluster, snap.stats.cluster(BLACKHOLE))
    return cs


def cluster_for_address(snap: Snapshot, host: str, port: int) -> ClusterState | None:
    """The cluster of the ServiceEntry whose ``addresses`` hold IP ``host`` on ``port``."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    for cs in snap.clusters.values():
        c = cs.cluster
        if c.addresses and c.port == port and c.subset is None:
            for a in c.addresses:
                try:
                    if ip in ipaddress.ip_network(a, strict=False):
                        return cs
                except (ValueError, TypeError):
                    continue
    return None


def tunnels(snap: Snapshot, route_table: str | None, authority: str) -> bool:
    """Whether a CONNECT to ``authority`` on the outbound listener is a tunnel to
    relay (HTTPS to port 443, or any host the mesh does not know), rather than
    plain HTTP requests to serve through it (a mesh service, as Node's fetch sends)."""
    if authority.endswith(":443"):
        return True
    router = snap.routers.get(route_table) if route_table else None
    return router is None or router.virtual_host(authority) is None


async def tunnel(rt, snap: Snapshot, server, route_table: str | None, authority: str, down) -> None:
    """Serve one ``CONNECT authority`` on the outbound listener to its end."""
    target = split_authority(authority, 443)
    router = snap.routers.get(route_table) if route_table else None
    cs = snap.clusters.get(cluster_name(target[0], target[1])) if target is not None else None
    if cs is None and target is not None:
        cs = cluster_for_address(snap, target[0], target[1])  # one of a ServiceEntry's addresses
    known = cs is not None or (router is not None and router.virtual_host(authority) is not None)
    status, flag, why = 200, "", ""
    address: tuple[str, int] | None = None
    if target is None:
        status, flag, why = 400, F.NR, f"bad CONNECT target {authority!r}"
    elif known:
        if cs is None or cs.cluster.original_destination:  # connect to the host as named
            address = target
        elif cs.healthy:
            ep = cs.healthy[rt.rand.randrange(len(cs.healthy))]
            address = (ep.address, ep.port)
        else:
            status, flag, why = 503, F.UH, f"no healthy upstream for {cs.name}"
    elif snap.settings.outbound_traffic_policy == "REGISTRY_ONLY":
        status, flag, why = 502, F.NR, f"{BLACKHOLE}: {authority} is not in the mesh's registry"
    else:
        address = target
    up = None
    if address is not None:
        try:
            with aio.fail_after(float(snap.settings.connect_timeout)):
                up = await rt.backend.connect(address[0], address[1])
        except (UpstreamConnectError, aio.TooSlowError) as exc:
            status, flag, why = 503, F.UF, f"connect to {address[0]}:{address[1]} failed: {exc}"
    if up is None:
        rt.stats.flag(flag)
        log.info("CONNECT %s -> %d %s %s", authority, status, flag, why)
        body = (why + "\n").encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")]
        try:
            await send_all(down, server.response_head(ResponseHead(status, headers)) + body)
        except PeerGone:
            pass
        return
    try:
        await send_all(down, server.response_head(ResponseHead(200, [], reason="Connection established")))
        left = server.upgrade_accepted()
        if left:
            await send_all(up, left)
        await relay(down, up)
    except (PeerGone, OSError):
        pass
    finally:
        up.close_now()
