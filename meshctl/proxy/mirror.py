"""Traffic mirroring: a copy of a routed request goes to the route's mirror
clusters, fire-and-forget, as Envoy's request mirror policies do.

- The shadow carries the request's method, path, headers (after the route's
  header operations) and body, with ``-shadow`` added to the host name of the
  Host header (core/mirror.py), and its answer is read and dropped.
- It never delays or fails the primary request: it is sent after the primary
  has been forwarded, from a task of its own, and every failure of it is only
  counted. Its cost is capped: at most MAX_IN_FLIGHT shadows at once per proxy
  (more are dropped and counted), a body is mirrored only when the proxy kept
  it whole for retries (``settings.retry_buffer_bytes``, 64 KiB by default),
  a shadow's response is read at most MAX_RESPONSE_BYTES far, and each shadow
  ends at the route timeout (or SHADOW_TIMEOUT).
- Telemetry: the mirror cluster's upstream request counters
  (``meshctl_cluster_upstream_rq_total`` / ``_rq_xx`` for its cluster), and
  ``MirrorState`` counts sent, failed and dropped shadows (/stats:
  ``meshctl_mirror_requests_total{outcome=...}``). The mirror's own sidecar
  reports the shadow as any inbound request.
"""

from __future__ import annotations

import logging

import trio

from ..core.balance import PickContext
from ..core.mirror import has_mirrors, mirror_cluster, mirror_destinations, shadow_authority
from ..protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, ResponseHead
from .egress import without_internal
from .identity import upstream_tls
from .stream import UpstreamConnectError

log = logging.getLogger("meshctl.proxy")

MAX_IN_FLIGHT = 64
MAX_RESPONSE_BYTES = 1 << 20
SHADOW_TIMEOUT = 15.0


class MirrorState:
    """Per proxy: shadows in flight and what became of them."""

    __slots__ = ("in_flight", "sent", "failed", "dropped")

    def __init__(self) -> None:
        self.in_flight = 0
        self.sent = 0  # answered (any status)
        self.failed = 0  # no answer: connect failure, reset, timeout
        self.dropped = 0  # not sent: cap reached, body not kept, no endpoint

    def render(self) -> str:
        lines = ["# TYPE meshctl_mirror_requests_total counter"]
        for outcome, n in (("sent", self.sent), ("failed", self.failed), ("dropped", self.dropped)):
            lines.append(f'meshctl_mirror_requests_total{{outcome="{outcome}"}} {n}')
        lines.append("# TYPE meshctl_mirror_requests_active gauge")
        lines.append(f"meshctl_mirror_requests_active {self.in_flight}")
        return "\n".join(lines) + "\n"


def after_forward(rq) -> None:
    """Call once the primary request has been forwarded: start its shadows, if its
    route mirrors. Never blocks and never raises."""
    fwd = rq.forward
    if fwd is None or not has_mirrors(fwd.route):
        return
    rt = rq.rt
    state: MirrorState = rt.mirrors
    nursery = rt.mirror_nursery()
    for dest in mirror_destinations(fwd.route, rt.rand):
        cs = rq.snap.clusters.get(mirror_cluster(dest))
        body = rq.body
        if cs is None or not cs.healthy or nursery is None or state.in_flight >= MAX_IN_FLIGHT or (
                body is not None and not (body.finished and body.replayable)):
            state.dropped += 1
            continue
        headers = [h for h in fwd.request_headers if h[0] != "host"]
        if cs.cluster.external:
            headers = without_internal(headers)
        head = RequestHead(
            method=rq.head.method, target=fwd.path, headers=headers, http_version="1.1", scheme="http",
            authority=shadow_authority(fwd.authority), path=fwd.path, keep_alive=True,
        )
        chunks = list(body.chunks) if body is not None else []
        trailers = list(body.trailers) if body is not None else []
        ep = cs.balancer.pick(cs.healthy, PickContext(headers=headers, source_ip=rq.client_ip, path=fwd.path,
                                                      active=rt.active), rt.rand)
        if ep is None:
            state.dropped += 1
            continue
        state.in_flight += 1
        nursery.start_soon(_shadow, rt, rq.snap.settings, cs, ep, head, chunks, trailers, fwd.timeout or SHADOW_TIMEOUT)


async def _shadow(rt, settings, cs, ep, head: RequestHead, chunks: list[bytes], trailers: list, timeout: float) -> None:
    state: MirrorState = rt.mirrors
    conn = None
    ok = False
    try:
        with trio.move_on_after(timeout):
            conn = await rt.pool.acquire(ep.address, ep.port, cs.stats, settings.connect_timeout,
                                         upstream_tls(rt, cs.cluster, ep))
            client = conn.client
            parts = [client.request_head(head, end_stream=not chunks and not trailers)]
            for c in chunks:
                parts.append(client.data(c))
            if chunks or trailers:
                parts.append(client.end(trailers))
            await conn.stream.send_all(b"".join(parts))
            status = 0
            seen = 0
            while True:
                ev = await conn.reader.next()
                if ev is None:
                    break
                if type(ev) is ResponseHead:
                    status = ev.status
                elif type(ev) is Data:
                    seen += len(ev.data)
                    if seen > MAX_RESPONSE_BYTES:
                        break
                elif type(ev) is EndOfMessage:
                    ok = status >= 200
                    break
            if status:
                cs.stats.rq_total += 1
                cs.stats.rq_xx[min(status // 100, 5)] += 1
        if ok:
            state.sent += 1
        else:
            state.failed += 1
    except (UpstreamConnectError, ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        state.failed += 1
        log.debug("mirror to %s failed: %s", cs.name, exc)
    finally:
        state.in_flight -= 1
        if conn is not None:
            if ok and conn.client.keep_alive:
                rt.pool.release(conn)
            else:
                rt.pool.discard(conn)
