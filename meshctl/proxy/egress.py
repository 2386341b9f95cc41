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

Not yet: CONNECT tunnels (HTTPS through ``HTTPS_PROXY``) to unknown hosts.
"""

from __future__ import annotations

from dataclasses import replace

from ..core.route import Forward
from ..model.proxyconfig import Cluster, Endpoint
from .snapshot import ClusterState, Snapshot

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


def leaving_mesh(snap: Snapshot, fwd: Forward) -> Forward:
    """``fwd`` as it may leave the mesh: unchanged for a mesh destination."""
    cs = snap.clusters.get(fwd.cluster)
    if cs is None or not cs.cluster.external:
        return fwd
    headers = without_internal(fwd.request_headers)
    return fwd if headers is fwd.request_headers else replace(fwd, request_headers=headers)


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


def passthrough_cluster(snap: Snapshot, host: str, port: int) -> ClusterState:
    """The PassthroughCluster state for one destination (kept per snapshot, bounded)."""
    cache = snap.passthrough
    cs = cache.get((host, port))
    if cs is None:
        if len(cache) >= _MAX_HOSTS:
            cache.clear()
        cluster = Cluster(name=PASSTHROUGH, service=PASSTHROUGH, port=port, external=True,
                          endpoints=(Endpoint(address=host, port=port, instance=f"{host}:{port}"),))
        cs = cache[(host, port)] = ClusterState(cluster, snap.stats.cluster(PASSTHROUGH))
    return cs


def blackhole_cluster(snap: Snapshot) -> ClusterState:
    cs = snap.passthrough.get(("", 0))
    if cs is None:
        cluster = Cluster(name=BLACKHOLE, service=BLACKHOLE, port=0, external=True)
        cs = snap.passthrough[("", 0)] = ClusterState(cluster, snap.stats.cluster(BLACKHOLE))
    return cs
