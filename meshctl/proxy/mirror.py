"""Traffic mirroring: a copy of a routed request goes to the route's mirror
clusters, fire-and-forget, as Envoy's request mirror policies do.

- The shadow carries the request's method, path, headers (after the route's
  header operations) and body, with ``-shadow`` added to the host name of the
  Host header (core/mirror.py), and its answer is read and dropped.
- It speaks its cluster's protocol, as a primary to that cluster would
  (protocols.wants_h2): HTTP/1.1 on the keep-alive pool, or a stream on the
  HTTP/2 pool (h2pool.py) to a service declared http2/grpc (a gRPC call is
  mirrored as one), as Envoy's shadow uses its cluster's protocol.
- It never delays or fails the primary request: it is sent after the primary
  has been forwarded, from a task of its own, and every failure of it is only
  counted. Its cost is capped: at most MAX_IN_FLIGHT shadows at once per proxy
  (more are dropped and counted), a body is mirrored only when the proxy kept
  it whole for retries (``settings.retry_buffer_bytes``, 64 KiB by default),
  a shadow's response is read at most MAX_RESPONSE_BYTES far, and each shadow
  ends at the route timeout (or SHADOW_TIMEOUT). The mirror cluster's own
  circuit breakers apply to its shadows, as in Envoy: the DestinationRule's
  connectionPool limits (HTTP/1.1: the cluster's limiter, limits.py;
  HTTP/2: http2MaxRequests and maxConcurrentStreams, h2pool.py). A shadow
  over them is dropped, and counted as the cluster's overflow
  (``meshctl_cluster_upstream_rq_pending_overflow``).
- Telemetry: the mirror cluster's upstream request counters
  (``meshctl_cluster_upstream_rq_total`` / ``_rq_xx`` for its cluster), and
  ``MirrorState`` counts sent, failed and dropped shadows (/stats:
  ``meshctl_mirror_requests_total{outcome=...}``). The mirror's own sidecar
  reports the shadow as any inbound request.
- Comparison (``meshctl mirror diff``): each shadow's answer is compared with
  the primary's on status, content type, body digest (SHA-256) and latency,
  and both sides' headers are kept with the latest KEPT_RECENT comparisons.
  The primary's response body is kept as references to the chunks already
  read, only on mirrored routes and up to KEPT_BODY_LIMIT (request.py); it is
  hashed by the shadow's task, after the primary's response has been sent.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

import meshctl.proxy.aio as aio
from ..core.balance import PickContext
from ..core.mirror import has_mirrors, mirror_cluster, mirror_destinations, shadow_authority
from ..protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, Reset, ResponseHead
from ..protocol.headers import strip_hop_by_hop
from .egress import without_internal
from .errors import PeerGone, send_all
from .identity import upstream_tls
from .limits import PoolOverflow
from .protocols import wants_h2
from .request import IDEMPOTENT
from .stream import UpstreamConnectError

log = logging.getLogger("meshctl.proxy")

MAX_IN_FLIGHT = 64
MAX_RESPONSE_BYTES = 1 << 20
SHADOW_TIMEOUT = 15.0


KEPT_LATENCIES = 1000  # per mirror cluster, for percentiles
KEPT_EXAMPLES = 50  # differing requests kept for `meshctl mirror diff`
KEPT_RECENT = 256  # every comparison (differing or not), for `mirror diff --window` and chosen headers
KEPT_HEADERS = 24  # response headers kept per side of a comparison, at most ...
KEPT_VALUE = 200  # ... and characters of each value


def kept_headers(headers) -> dict[str, str]:
    """A response's headers as a comparison keeps them: hop-by-hop fields dropped,
    names lower case, repeated fields joined, bounded in number and length."""
    out: dict[str, str] = {}
    for k, v in strip_hop_by_hop(list(headers)):
        name = k.lower() if isinstance(k, str) else k.decode("latin-1").lower()
        value = v if isinstance(v, str) else v.decode("latin-1")
        if name in out:
            out[name] = (out[name] + ", " + value)[:KEPT_VALUE]
        elif len(out) < KEPT_HEADERS:
            out[name] = value[:KEPT_VALUE]
    return out


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


class Answer:
    """One side of a comparison: status (0: no answer), latency, headers, body digest
    ("" when the body was not kept whole) or, for a shadow without answer, the error."""

    __slots__ = ("status", "ms", "headers", "body_sha256", "error")

    def __init__(self, status: int, ms: float, headers: dict[str, str], body_sha256: str = "", error: str = "") -> None:
        self.status = status
        self.ms = ms
        self.headers = headers
        self.body_sha256 = body_sha256
        self.error = error


class PrimaryBody:
    """The primary's kept response body, hashed once, by the first shadow task that
    needs it (off the primary's request path), then let go."""

    __slots__ = ("chunks", "whole", "_digest")

    def __init__(self, chunks: list[bytes], whole: bool) -> None:
        self.chunks: list[bytes] | None = chunks
        self.whole = whole
        self._digest = ""

    def digest(self) -> str:
        if self.chunks is not None:
            if self.whole:
                h = hashlib.sha256()
                for c in self.chunks:
                    h.update(c)
                self._digest = h.hexdigest()
            self.chunks = None
        return self._digest


class _Target:
    """How one mirror cluster's answers compare with the primary's."""

    __slots__ = ("compared", "status_differs", "type_differs", "body_differs", "failed", "primary_ms", "shadow_ms")

    def __init__(self) -> None:
        self.compared = 0
        self.status_differs = 0
        self.type_differs = 0
        self.body_differs = 0  # both bodies kept whole, digests differ
        self.failed = 0
        self.primary_ms: deque[float] = deque(maxlen=KEPT_LATENCIES)
        self.shadow_ms: deque[float] = deque(maxlen=KEPT_LATENCIES)


def _pct(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def differences(primary: Answer, shadow: Answer) -> list[str]:
    """What differs between the two answers: "no answer", "status", else (same status)
    "content-type" and "body" (when both bodies were kept whole)."""
    if shadow.status == 0:
        return ["no answer"]
    if shadow.status != primary.status:
        return ["status"]  # an error page has its own type and body: one difference
    out = []
    if _media_type(shadow.headers) != _media_type(primary.headers):
        out.append("content-type")
    if primary.body_sha256 and shadow.body_sha256 and primary.body_sha256 != shadow.body_sha256:
        out.append("body")
    return out


class MirrorState:
    """Per proxy: shadows in flight and what became of them, and how their answers
    compare with the primary's: status, content type, body digest, latency, and the
    headers of the latest comparisons (GET /mirror on the admin port)."""

    __slots__ = ("in_flight", "sent", "failed", "dropped", "targets", "examples", "recent")

    def __init__(self) -> None:
        self.in_flight = 0
        self.sent = 0  # answered (any status)
        self.failed = 0  # no answer: connect failure, reset, timeout
        self.dropped = 0  # not sent: cap reached, body not kept, no endpoint
        self.targets: dict[str, _Target] = {}
        self.examples: deque[dict] = deque(maxlen=KEPT_EXAMPLES)
        self.recent: deque[dict] = deque(maxlen=KEPT_RECENT)

    def compare(self, cluster: str, method: str, path: str, primary: Answer, shadow: Answer,
                now: float | None = None) -> None:
        t = self.targets.get(cluster)
        if t is None:
            if len(self.targets) >= 256:
                return
            t = self.targets[cluster] = _Target()
        t.compared += 1
        t.primary_ms.append(primary.ms)
        differs = differences(primary, shadow)
        if shadow.status == 0:
            t.failed += 1
        else:
            t.shadow_ms.append(shadow.ms)
        t.status_differs += "status" in differs
        t.type_differs += "content-type" in differs
        t.body_differs += "body" in differs
        record = {
            "time": time.time() if now is None else now, "cluster": cluster, "method": method, "path": path,
            "differs": differs,
            "primary_status": primary.status, "primary_ms": round(primary.ms, 3),
            "primary_content_type": primary.headers.get("content-type", ""),
            "primary_body_sha256": primary.body_sha256, "primary_headers": primary.headers,
            "shadow_status": shadow.status, "shadow_ms": round(shadow.ms, 3),
            "shadow_content_type": shadow.headers.get("content-type", ""),
            "shadow_body_sha256": shadow.body_sha256 if shadow.status else "", "shadow_headers": shadow.headers,
            "shadow_error": shadow.error,
        }
        self.recent.append(record)
        if differs:
            self.examples.append(record)

    def report(self) -> dict:
        return {
            "sent": self.sent, "failed": self.failed, "dropped": self.dropped, "in_flight": self.in_flight,
            "targets": {
                name: {
                    "compared": t.compared, "status_differs": t.status_differs, "content_type_differs": t.type_differs,
                    "body_differs": t.body_differs, "failed": t.failed,
                    "primary_ms": {"p50": _pct(t.primary_ms, 0.5), "p90": _pct(t.primary_ms, 0.9)},
                    "shadow_ms": {"p50": _pct(t.shadow_ms, 0.5), "p90": _pct(t.shadow_ms, 0.9)},
                }
                for name, t in self.targets.items()
            },
            "examples": list(self.examples),
            "recent": list(self.recent),
        }

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
    primary = None
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
        h2 = wants_h2(rq, cs)  # the mirror cluster's protocol, as for a primary to it (Envoy's shadow too)
        if h2 and any(k == "te" and "trailers" in v.lower() for k, v in rq.head.headers) and \
                not any(k == "te" for k, _ in headers):
            headers.append(("te", "trailers"))  # gRPC servers want it; hop-by-hop, so not in request_headers
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
        if primary is None:
            kept = rq.kept
            primary = (rq.status, (aio.current_time() - rq.start) * 1000.0 if rq.start else 0.0,
                       kept.headers if kept is not None else [],
                       PrimaryBody(kept.chunks, kept.whole) if kept is not None else PrimaryBody([], False))
        nursery.start_soon(_shadow_h2 if h2 else _shadow, rt, rq.snap.settings, cs, ep, head, chunks, trailers, fwd.timeout or SHADOW_TIMEOUT,
                           primary)


class _Outcome:
    """What one shadow got so far, whichever protocol carried it: the answer counts
    once its final response head arrived, whatever the status (a 401 is an answer);
    the body is hashed as it comes and compared only when it ended whole."""

    __slots__ = ("timeout", "started", "status", "headers", "digest", "seen", "whole", "overflow", "error")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = aio.current_time()
        self.status = 0
        self.headers: list = []
        self.digest = hashlib.sha256()
        self.seen = 0
        self.whole = False
        self.overflow = False  # refused by the mirror cluster's circuit breakers: dropped, never sent
        self.error = f"timeout: no response within {timeout:g}s"

    def take(self, ev) -> bool:  # type: ignore[no-untyped-def]
        """One response event (ResponseHead, Data, EndOfMessage; anything else is a
        Reset); True once the shadow is over."""
        t = type(ev)
        if t is ResponseHead:
            if ev.status >= 200:
                self.status, self.headers = ev.status, ev.headers
                self.error = f"timeout: the body did not end within {self.timeout:g}s"
            return False
        if t is Data:
            self.seen += len(ev.data)
            if self.seen > MAX_RESPONSE_BYTES:
                self.error = "response body over 1 MiB: not compared"
                return True
            self.digest.update(ev.data)
            return False
        if t is EndOfMessage:
            self.whole = self.status >= 200
            if not self.status:
                self.error = "the stream ended without a response"
            return True
        reason = getattr(ev, "reason", "") or "stream reset"
        self.error = f"the body did not end: {reason}" if self.status else reason
        return True

    def failed(self, cs, exc: BaseException) -> None:  # type: ignore[no-untyped-def]
        if isinstance(exc, PoolOverflow):
            self.overflow = True
            log.debug("mirror to %s not sent: %s", cs.name, exc)
            return
        self.error = str(exc) if not self.status else f"the body did not end: {exc}"
        log.debug("mirror to %s failed: %s", cs.name, exc)

    def settle(self, state: MirrorState, cs, head: RequestHead, mine: Answer) -> None:  # type: ignore[no-untyped-def]
        """The shadow is over: count it, and compare its answer with the primary's."""
        state.in_flight -= 1
        if self.overflow:
            state.dropped += 1
            cs.stats.rq_pending_overflow += 1
            return
        status = self.status
        ms = (aio.current_time() - self.started) * 1000.0
        if status:
            state.sent += 1
            cs.stats.rq_total += 1
            cs.stats.rq_xx[min(status // 100, 5)] += 1
            body_sha256 = self.digest.hexdigest() if self.whole else ""
            theirs = Answer(status, ms, kept_headers(self.headers), body_sha256, "" if body_sha256 else self.error)
        else:
            state.failed += 1
            theirs = Answer(0, ms, {}, "", self.error)
        state.compare(cs.name, head.method, head.path, mine, theirs)


_SHADOW_ERRORS = (PoolOverflow, UpstreamConnectError, ProtocolError, OSError, PeerGone)


def _mine(primary: tuple[int, float, list, PrimaryBody]) -> Answer:
    """The primary's side of the comparison (its body chunks are let go once hashed)."""
    return Answer(primary[0], primary[1], kept_headers(primary[2]), primary[3].digest())


async def _shadow(rt, settings, cs, ep, head: RequestHead, chunks: list[bytes], trailers: list, timeout: float,
                  primary: tuple[int, float, list, PrimaryBody]) -> None:
    """Send one shadow and compare its answer with the primary's (``_Outcome``). "No
    answer" is for a shadow that got no response head: connection refused, reset or
    closed, timeout; ``error`` says which. A pooled connection the upstream had closed
    (many servers close after an error answer without saying so) is not an answer
    either: an idempotent shadow is sent again once on a new connection, as the
    primary is (h1upstream.py)."""
    mine = _mine(primary)
    out = _Outcome(timeout)
    conn = None
    stale_ok = head.method in IDEMPOTENT
    again = False
    pool = rt.pool if cs.limiter is None else cs.limiter  # the cluster's connectionPool limits, if it has any
    try:
        with aio.move_on_after(timeout):
            while True:
                # (sent again: the pooled connection taken is checked, however young; h1upstream.py)
                conn = await pool.acquire(ep.address, ep.port, cs.stats, settings.connect_timeout,
                                          upstream_tls(rt, cs.cluster, ep), again)
                client = conn.client
                parts = [client.request_head(head, end_stream=not chunks and not trailers)]
                for c in chunks:
                    parts.append(client.data(c))
                if chunks or trailers:
                    parts.append(client.end(trailers))
                try:
                    await send_all(conn.stream, b"".join(parts))
                    ev = await conn.reader.next()
                except (ProtocolError, OSError, PeerGone):
                    ev = None
                if (ev is None or type(ev) is Reset) and conn.reused and stale_ok:
                    stale_ok = False  # a kept-alive connection the upstream had closed: once more, on a new one
                    again = True
                    pool.discard(conn)
                    conn = None
                    continue
                break
            out.error = "connection closed before a response"
            while ev is not None:
                if out.take(ev):
                    break
                ev = await conn.reader.next()
            else:
                if out.status:
                    out.error = "connection closed before the body ended"
    except _SHADOW_ERRORS as exc:
        out.failed(cs, exc)
    finally:
        out.settle(rt.mirrors, cs, head, mine)
        if conn is not None:
            if out.whole and conn.client.keep_alive:
                pool.release(conn)
            else:
                pool.discard(conn)


async def _shadow_h2(rt, settings, cs, ep, head: RequestHead, chunks: list[bytes], trailers: list, timeout: float,
                     primary: tuple[int, float, list, PrimaryBody]) -> None:
    """``_shadow`` to a cluster reached over HTTP/2 (declared http2/grpc, h2UpgradePolicy
    UPGRADE, ...): one stream on the runtime's HTTP/2 pool (h2pool.py), the one the
    primaries to that cluster use. The same rules: fire-and-forget, answered when the
    response head arrived, the body compared when it ended (a gRPC answer's status is
    its HTTP status; its grpc-status is in the trailers)."""
    from ..protocol.http2 import h1_head_to_h2

    mine = _mine(primary)
    out = _Outcome(timeout)
    conn = st = pool = None
    exchange = rt.forwarder.h2.exchange()
    try:
        with aio.move_on_after(timeout):
            pool, max_streams = exchange.open_request(cs)  # http2MaxRequests: PoolOverflow past it
            address = ep.address
            if cs.cluster.dns:  # an endpoint given by name: one of its addresses, as a primary's try
                from .dns import upstream_address

                address = await upstream_address(address, cs.cluster.dns)
            conn = await pool.acquire(address, ep.port, cs.stats, settings.connect_timeout,
                                      upstream_tls(rt, cs.cluster, ep, h2=True), max_streams)
            h2head = h1_head_to_h2(head)
            h2head.scheme = "http"
            st = conn.open(h2head, end_stream=not chunks and not trailers)
            conn.put_whole_body(st.sid, chunks, trailers)
            client = conn.client
            conn.kick()  # (open() and put() queue; one kick sends the head and the body, as H2Exchange does)
            out.error = "stream reset before a response"
            while True:
                ev = await st.next()
                if type(ev) is Data:
                    conn.emit(client.ack_received(st.sid, len(ev.data)))
                elif type(ev) is not ResponseHead:
                    st.done = True  # EndOfMessage; or a Reset, of the stream or of the connection
                if out.take(ev):
                    break
    except _SHADOW_ERRORS as exc:
        out.failed(cs, exc)
    finally:
        out.settle(rt.mirrors, cs, head, mine)
        if conn is not None and st is not None:
            conn.finish(st, abort=not st.done)
        if pool is not None:
            exchange.request_done(pool, cs)
