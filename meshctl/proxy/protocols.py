"""What the proxy decides before it loads an HTTP/2 codec.

- ``sniff``: which protocol a new connection speaks, from its first bytes;
- ``wants_h2``: whether a request goes upstream as HTTP/2.

The HTTP/2 machinery (protocol/http2.py with jh2's HPACK, h2conn.py, h2pool.py: ~2.8 MB of
RSS) is imported by the first connection or request that needs it; a sidecar
whose traffic is all HTTP/1.1 never loads it (issue 12, RSS per sidecar). The lazy
imports are in interpreted modules (here and h2entry.py): in the compiled build, a
compiled module that imports an HTTP/2 module, even inside a function, makes its
library load theirs at start.
"""

from __future__ import annotations

from typing import Final

import meshctl.proxy.aio as aio

from ..protocol.detect import detect
from ..protocol.grpc import is_grpc
from .errors import receive_some

__all__ = ["sniff", "wants_h2"]


async def sniff(stream: aio.Stream) -> tuple[str | None, bytes]:
    """Read a new connection's first bytes until ``detect`` can tell the
    protocol: ("h2" | "http1" | "tls" | "tcp", bytes read), or (None, bytes)
    when the peer closed first. Raises PeerGone when the stream is gone."""
    buf = b""
    while True:
        data = await receive_some(stream)
        if not data:
            return None, buf
        buf += data
        kind = detect(buf)
        if kind is not None:
            return kind, buf


def _http_settings(cluster):
    tp = cluster.traffic_policy
    cp = tp.connection_pool if tp is not None else None
    return cp.http if cp is not None else None


_declared: dict[int, tuple] = {}


def _declared_h2(cfg, service: str) -> bool:
    """Is ``service`` (the workload's own) declared http2/grpc in this config's clusters?"""
    got = _declared.get(id(cfg))
    if got is None or got[0] is not cfg:
        if len(_declared) > 16:
            _declared.clear()
        h2svc = set()
        for cl in cfg.clusters.values():
            if cl.protocol in ("http2", "grpc"):
                h2svc.add(cl.service)
                h2svc.add(cl.service.split(".", 1)[0])
        got = _declared[id(cfg)] = (cfg, h2svc)
    return service in got[1]


# wants_h2's rule for a cluster: the same for every request to it, so found once per
# ClusterState (``cs.h2_rule``, per snapshot) and not per request (the forwarder reads
# NEVER and ALWAYS itself, without a call into this interpreted module)
H2_NEVER: Final = 0
H2_ALWAYS: Final = 1
H2_IF_GRPC: Final = 2
H2_IF_CLIENT_H2: Final = 3
H2_UNLESS_UPGRADE: Final = 4


def _h2_rule(cfg, c) -> int:
    if c.protocol in ("http2", "grpc"):
        return H2_ALWAYS
    if c.name.startswith("inbound|"):
        # the app behind an inbound listener: HTTP/2 when its service is declared
        # http2/grpc, or for a gRPC request (which HTTP/1.1 cannot carry)
        return H2_ALWAYS if _declared_h2(cfg, c.service) else H2_IF_GRPC
    hs = _http_settings(c)
    if hs is None:
        return H2_NEVER
    if hs.use_client_protocol:
        return H2_IF_CLIENT_H2
    return H2_UNLESS_UPGRADE if (hs.h2_upgrade_policy or "").upper() == "UPGRADE" else H2_NEVER


def wants_h2(rq, cs) -> bool:
    """Should this request go upstream as HTTP/2?"""
    rule = cs.h2_rule
    if rule < 0:
        rule = cs.h2_rule = _h2_rule(rq.snap.cfg, cs.cluster)
    if rule == H2_NEVER:
        return False
    if rule == H2_ALWAYS:
        return True
    if rule == H2_IF_GRPC:
        return is_grpc(rq.head.headers)
    if rule == H2_IF_CLIENT_H2:
        return rq.head.http_version == "2"
    return rq.head.upgrade is None


class LazyH2Exchange:
    """The forwarder's HTTP/2 exchange (forward.UpstreamExchange): ``carries`` decides
    here; ``make(rt)`` (the runtime's: h2pool.H2Exchange, and with it jh2) is called by
    the first try that goes upstream as HTTP/2."""

    def __init__(self, rt, make) -> None:
        self.rt = rt
        self.make = make
        self.real = None

    def carries(self, rq, cs) -> bool:
        return wants_h2(rq, cs)

    def exchange(self):
        """The real exchange (h2pool.H2Exchange), made now if no try has made it yet."""
        x = self.real
        if x is None:
            x = self.real = self.make(self.rt)
        return x

    def attempt(self, a):
        # (not a coroutine of its own: it hands out the real exchange's, so no interpreted
        # frame sits in the request's await chain, resumed at every wake-up of the try)
        return self.exchange().attempt(a)

    @property
    def pool(self):
        """The HTTP/2 pool, None until the first HTTP/2 try made it."""
        return self.real.pool if self.real is not None else None
