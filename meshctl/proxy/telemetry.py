"""Istio's standard metrics, kept by every sidecar and rendered as Prometheus text.

Names, labels and histogram buckets are Istio's, so its dashboards and
queries work unchanged:

    istio_requests_total                    counter    one per HTTP request
    istio_request_duration_milliseconds     histogram  request start → response end
    istio_request_bytes / istio_response_bytes  histograms  body bytes
    istio_tcp_sent_bytes_total              counter    bytes sent to the client (response direction)
    istio_tcp_received_bytes_total          counter    bytes received from the client (request direction)
    istio_tcp_connections_opened_total / _closed_total

Who reports: the client's sidecar (outbound, binding and gateway listeners)
reports ``reporter="source"``, the server's sidecar (inbound) reports
``reporter="destination"``. The source sidecar tells the destination who it
is with one request header, ``x-meshctl-source`` (workload, app, version,
namespace, principal); the inbound side takes it off before the app sees the
request, and the outbound side replaces any the app sent, so it cannot be
spoofed through a sidecar. Destination labels on the source side come from the
endpoint the balancer picked (its labels and instance name).

Besides Istio's families, a few meshctl gauges feed `meshctl top`:
``meshctl_inbound_cx_active`` (open connections into this workload) and
``meshctl_outlier_ejected_hosts`` (hosts this sidecar has ejected, by
destination service and version).

Recording is a few attribute lookups, one tuple and one dict lookup per
request, and not even those for a request like the last one (same source peer
object, endpoint and labels: Telemetry.http_series); the source sidecar's Peer
is shared by its requests (Telemetry.source_peer). Rendering happens only when
/stats or /metrics is scraped (Istio
Telemetry metric overrides are applied to /metrics by proxy/metric_overrides.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Sequence
from urllib.parse import quote, unquote

from ..model.base import HeaderList
from ..model.proxyconfig import DEFAULT_DOMAIN_SUFFIX, Workload, fqdn
from ..model.telemetry import BYTES_BUCKETS, DURATION_BUCKETS_MS
from .tracing import finish as trace_finish

if TYPE_CHECKING:  # (request.py is the one that may import this module at run time)
    from .request import Request


LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
TCP_LABELS: tuple[str, ...] = tuple(n for n in LABELS if n not in ("response_code", "grpc_response_status"))

UNKNOWN: Final = "unknown"

# The header the source sidecar adds for the destination sidecar: its labels in one field
# (as Istio's sidecars pass their metadata to the peer in one, x-envoy-peer-metadata),
# each value percent-encoded (Peer.header_value):
#   x-meshctl-source: workload=reviews-v2;app=reviews;version=v2;namespace=default;principal=spiffe://...
# One field, not one per label: every field of a request costs both sidecars of a hop
# parsing and serializing work (five fields were ~7% of an inbound request's instructions).
H_SOURCE: Final = "x-meshctl-source"
# the five headers earlier versions sent: still read when there is no H_SOURCE (the hosts
# of a mesh may run two versions while it is upgraded), and taken off like it
H_WORKLOAD: Final = "x-meshctl-source-workload"
H_APP: Final = "x-meshctl-source-app"
H_VERSION: Final = "x-meshctl-source-version"
H_NAMESPACE: Final = "x-meshctl-source-namespace"
H_PRINCIPAL: Final = "x-meshctl-source-principal"
SOURCE_HEADERS: Final = frozenset({H_SOURCE, H_WORKLOAD, H_APP, H_VERSION, H_NAMESPACE, H_PRINCIPAL})
_SAFE: Final = "/:@"  # kept as they are in a value (SPIFFE IDs stay readable); ; = , % and space are escaped

_INSTANCE_SUFFIX = re.compile(r"-\d+(@[^@]*)?$")


def workload_name(instance: str) -> str:
    """Istio's workload is the deployment, not the pod: ``reviews-v2-0`` → ``reviews-v2``; a
    shared registry's id names the host too (supervisor/registration.py):
    ``reviews-v2-0@10.0.0.12:15006`` → ``reviews-v2``, the same workload on every host."""
    return _INSTANCE_SUFFIX.sub("", instance) if instance else UNKNOWN


class Peer:
    """One side of a request, as labels: workload, namespace, principal, app, version."""

    __slots__ = ("workload", "namespace", "principal", "app", "version")

    def __init__(self, workload: str = UNKNOWN, namespace: str = UNKNOWN, principal: str = UNKNOWN,
                 app: str = UNKNOWN, version: str = UNKNOWN) -> None:
        self.workload = workload or UNKNOWN
        self.namespace = namespace or UNKNOWN
        self.principal = principal or UNKNOWN
        self.app = app or UNKNOWN
        self.version = version or UNKNOWN

    @classmethod
    def of_workload(cls, w: Workload) -> "Peer":
        return cls(workload_name(w.name), w.namespace, w.spiffe_id, w.labels.get("app", w.service),
                   w.labels.get("version", UNKNOWN))

    @classmethod
    def of_endpoint(cls, ep, service_fqdn: str) -> "Peer":
        labels = ep.labels
        ns = _service_namespace(service_fqdn)
        app = labels.get("app") or (service_fqdn.split(".", 1)[0] if service_fqdn.endswith(DEFAULT_DOMAIN_SUFFIX) else "")
        return cls(workload_name(ep.instance) if ep.instance else UNKNOWN, ns, ep.identity or UNKNOWN,
                   app, labels.get("version", UNKNOWN))

    def header_value(self) -> str:
        """This peer as the value of ``x-meshctl-source`` (parse_source reads it back)."""
        return (f"workload={quote(self.workload, _SAFE)};app={quote(self.app, _SAFE)};"
                f"version={quote(self.version, _SAFE)};namespace={quote(self.namespace, _SAFE)};"
                f"principal={quote(self.principal, _SAFE)}")

    def headers(self) -> list[tuple[str, str]]:
        return [(H_SOURCE, self.header_value())]

    def as_tuple(self) -> tuple[str, str, str, str, str]:
        return (self.workload, self.namespace, self.principal, self.app, self.version)


UNKNOWN_PEER = Peer()


def _service_namespace(service: str) -> str:
    if service.endswith("." + DEFAULT_DOMAIN_SUFFIX):
        parts = service.split(".")
        if len(parts) >= 2:
            return parts[1]
    return UNKNOWN


def _service_name(service: str) -> str:
    if service.endswith("." + DEFAULT_DOMAIN_SUFFIX):
        return service.split(".", 1)[0]
    return service or UNKNOWN


def _bucket(buckets: tuple[float, ...], v: float) -> int:
    """``bisect.bisect_left(buckets, v)``: the first bucket not below ``v`` (compiled, a
    native loop; bisect's is a generic call through the module's globals)."""
    lo = 0
    hi = len(buckets)
    while lo < hi:
        mid = (lo + hi) // 2
        if buckets[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        # as floats: an int item of a tuple[float, ...] is converted at every comparison
        # (compiled, _bucket unboxes each item it looks at); rendered alike (_num)
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(buckets) + 1)  # last: above every bucket
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[_bucket(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str, out: list[str]) -> None:
        acc = 0
        for le, n in zip(self.buckets, self.counts):
            acc += n
            out.append(f'{name}_bucket{{{labels},le="{_num(le)}"}} {acc}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_num(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")


class HttpSeries:
    __slots__ = ("requests", "duration", "request_bytes", "response_bytes", "request_messages", "response_messages")

    def __init__(self) -> None:
        self.requests = 0
        self.request_messages = 0  # gRPC only
        self.response_messages = 0
        self.duration = Histogram(DURATION_BUCKETS_MS)
        self.request_bytes = Histogram(BYTES_BUCKETS)
        self.response_bytes = Histogram(BYTES_BUCKETS)


class TcpSeries:
    __slots__ = ("sent", "received", "opened", "closed")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.opened = 0
        self.closed = 0


def parse_source(value: str) -> tuple[str, str, str, str, str]:
    """(workload, namespace, principal, app, version), Peer's argument order, from an
    ``x-meshctl-source`` value (``key=value`` pairs separated by ``;``, values
    percent-encoded). Whatever a peer sends is taken as labels: pairs without ``=`` and
    unknown keys are skipped, a label missing (or empty) is unknown."""
    labels: dict[str, str] = {}
    for part in value.split(";"):
        k, eq, v = part.partition("=")
        if eq:
            labels[k.strip()] = unquote(v.strip())
    get = labels.get
    return (get("workload") or UNKNOWN, get("namespace") or UNKNOWN, get("principal") or UNKNOWN,
            get("app") or UNKNOWN, get("version") or UNKNOWN)


def _same_source(p: Peer, workload: str, namespace: str, app: str, version: str) -> bool:
    """Whether ``p`` has these labels (its principal compared by the caller)."""
    return p.workload == workload and p.namespace == namespace and p.app == app and p.version == version


class Telemetry:
    """Istio metrics of one sidecar. ``set_workload`` on every applied config."""

    def __init__(self, workload: Workload | None = None) -> None:
        self.http: dict[tuple, HttpSeries] = {}
        self.tcp: dict[tuple, TcpSeries] = {}
        self._series: dict[tuple, tuple[tuple, HttpSeries]] = {}  # raw inputs → (labels, series)
        # the last request's inputs and (labels, series), compared by identity first
        # (http_series): a keep-alive connection's requests mostly share them
        self._last: tuple[tuple, HttpSeries] | None = None
        self._last_peer: Peer | None = None
        self._last_endpoint: object = None
        self._last_in: tuple[bool, str | None, int, str, bool, str] = (False, None, 0, "", False, "")
        # source peers handed out (source_peer), shared by the requests that name them: the
        # last one, and the last one of each principal (SPIFFE ID)
        self._src = UNKNOWN_PEER
        self._srcs: dict[str, Peer] = {}
        # the last x-meshctl-source value read and its peer: a source sends the same one
        # every time, so it is parsed once (source_peer_of)
        self._src_field = ""
        self._src_field_peer = UNKNOWN_PEER
        self.tcp_peers: dict[str, tuple[object, Peer]] = {}  # SPIFFE ID → (snapshot, source labels) (tcp_peer)
        self.me = UNKNOWN_PEER
        self.me_headers = UNKNOWN_PEER.headers()
        self.my_service = UNKNOWN
        if workload is not None:
            self.set_workload(workload)

    def set_workload(self, w: Workload) -> None:
        """On every applied config. Also empties the label cache, whose keys hold
        endpoint ids: ids of a replaced config's endpoints may be reused later."""
        self._series.clear()
        self._last = None
        self._last_peer = None
        self._last_endpoint = None
        self.me = Peer.of_workload(w)
        self.me_headers = self.me.headers()
        self.my_service = fqdn(w.service, w.namespace)

    # ------------------------------------------------------------ labels

    def http_labels(self, *, inbound: bool, peer: Peer | None, endpoint, service: str | None, status: int,
                    flags: list[str] | tuple[str, ...], protocol: str = "http", grpc_status: str = "",
                    mtls: bool = False) -> tuple:
        """The label values (in LABELS order) of one finished request.

        inbound: this sidecar is the destination, ``peer`` the source (from
        headers; None: unknown). Otherwise this sidecar is the source and the
        destination comes from ``endpoint`` (None when none was picked) and
        ``service`` (the cluster's FQDN)."""
        if inbound:
            src = peer or UNKNOWN_PEER
            dst = self.me
            svc = service or self.my_service
            reporter = "destination"
            security = "mutual_tls" if mtls else "none"
        else:
            src = self.me
            svc = service or UNKNOWN
            dst = Peer.of_endpoint(endpoint, svc) if endpoint is not None else Peer(
                namespace=_service_namespace(svc), app=_service_name(svc) if svc != UNKNOWN else UNKNOWN)
            reporter = "source"
            security = "unknown"
        return (
            reporter, src.workload, src.namespace, src.principal, src.app, src.version,
            dst.workload, dst.namespace, dst.principal, dst.app, dst.version,
            svc, _service_name(svc), _service_namespace(svc),
            protocol, str(status) if status else "0", grpc_status,
            ",".join(flags) if flags else "-", security,
        )

    def tcp_labels(self, *, inbound: bool, peer: Peer | None, endpoint, service: str | None,
                   flags: tuple[str, ...] = (), mtls: bool = False) -> tuple:
        full = self.http_labels(inbound=inbound, peer=peer, endpoint=endpoint, service=service, status=0,
                                flags=flags, protocol="tcp", mtls=mtls)
        return full[:15] + full[17:]

    # ------------------------------------------------------------ recording

    def http_series(self, inbound: bool, peer: Peer | None, endpoint, service: str | None, status: int,
                    flags, protocol: str, mtls: bool, grpc_status: str = "") -> tuple[tuple, HttpSeries]:
        """(labels, series) for a request, cached by its raw inputs (the hot path).
        The last request's answer is taken again without building and hashing the key
        when its peer and endpoint are the same objects and the rest is equal (a
        source peer is shared, never changed: ``source_peer``)."""
        last = self._last
        if (last is not None and not flags and peer is self._last_peer and endpoint is self._last_endpoint
                and self._last_in == (inbound, service, status, protocol, mtls, grpc_status)):
            return last
        key = (inbound, peer.as_tuple() if peer is not None else None, id(endpoint), service, status,
               ",".join(flags) if flags else "", protocol, mtls, grpc_status)
        hit = self._series.get(key)
        if hit is None:
            labels = self.http_labels(inbound=inbound, peer=peer, endpoint=endpoint, service=service, status=status,
                                      flags=flags, protocol=protocol, mtls=mtls, grpc_status=grpc_status)
            series = self.http.get(labels)
            if series is None:
                series = self.http[labels] = HttpSeries()
            if len(self._series) >= 10_000:  # many distinct peers: keep the cache bounded
                self._series.clear()
            hit = self._series[key] = (labels, series)
        if not flags:
            self._last = hit
            self._last_peer = peer
            self._last_endpoint = endpoint
            self._last_in = (inbound, service, status, protocol, mtls, grpc_status)
        return hit

    def source_peer(self, workload: str, namespace: str, principal: str, app: str, version: str) -> Peer:
        """The source of an inbound request as a Peer: one handed out before when its
        labels are the same (requests from one source share it; it is never changed).
        The last one is compared first; then the last one of the same principal (sources
        taking turns), whose label strings keep their hashes for http_series's key."""
        workload, namespace, principal = workload or UNKNOWN, namespace or UNKNOWN, principal or UNKNOWN
        app, version = app or UNKNOWN, version or UNKNOWN
        p = self._src
        if p.principal == principal and _same_source(p, workload, namespace, app, version):
            return p
        known = self._srcs.get(principal)
        if known is not None and _same_source(known, workload, namespace, app, version):
            self._src = known
            return known
        p = self._src = Peer(workload, namespace, principal, app, version)
        if len(self._srcs) >= 1000:  # many principals: keep it bounded
            self._srcs.clear()
        self._srcs[principal] = p
        return p

    def source_peer_of(self, field: str) -> Peer:
        """The source named by an ``x-meshctl-source`` value, as source_peer hands it out;
        the value is parsed only when it differs from the last one."""
        if field == self._src_field:
            return self._src_field_peer
        p = self.source_peer(*parse_source(field))
        self._src_field, self._src_field_peer = field, p
        return p

    def record_http(self, labels: tuple, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        s = self.http.get(labels)
        if s is None:
            s = self.http[labels] = HttpSeries()
        s.requests += 1
        s.duration.observe(duration_ms)
        s.request_bytes.observe(request_bytes)
        s.response_bytes.observe(response_bytes)

    def tcp_series(self, labels: tuple) -> TcpSeries:
        s = self.tcp.get(labels)
        if s is None:
            s = self.tcp[labels] = TcpSeries()
        return s

    # ------------------------------------------------------------ exposition

    def render(self, gauges: Sequence[tuple[str, str, list[tuple[dict[str, str], float]]]] = ()) -> str:
        """Prometheus text of every series; ``gauges``: extra (name, help, [(labels, value)])."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        http = sorted((_labelstr(LABELS, k), s) for k, s in self.http.items())
        tcp = sorted((_labelstr(TCP_LABELS, k), s) for k, s in self.tcp.items())
        family("istio_requests_total", "counter", "Requests, by Istio's standard labels.")
        for lab, s in http:
            out.append(f"istio_requests_total{{{lab}}} {s.requests}")
        grpc = [(lab, s) for lab, s in http if 'request_protocol="grpc"' in lab]
        if grpc:
            family("istio_request_messages_total", "counter", "gRPC messages sent by clients.")
            for lab, s in grpc:
                out.append(f"istio_request_messages_total{{{lab}}} {s.request_messages}")
            family("istio_response_messages_total", "counter", "gRPC messages sent by servers.")
            for lab, s in grpc:
                out.append(f"istio_response_messages_total{{{lab}}} {s.response_messages}")
        family("istio_request_duration_milliseconds", "histogram", "Request duration in milliseconds.")
        for lab, s in http:
            s.duration.lines("istio_request_duration_milliseconds", lab, out)
        family("istio_request_bytes", "histogram", "Request body size in bytes.")
        for lab, s in http:
            s.request_bytes.lines("istio_request_bytes", lab, out)
        family("istio_response_bytes", "histogram", "Response body size in bytes.")
        for lab, s in http:
            s.response_bytes.lines("istio_response_bytes", lab, out)
        for name, attr, help_ in (
            ("istio_tcp_sent_bytes_total", "sent", "Bytes sent to the client on TCP connections."),
            ("istio_tcp_received_bytes_total", "received", "Bytes received from the client on TCP connections."),
            ("istio_tcp_connections_opened_total", "opened", "TCP connections opened."),
            ("istio_tcp_connections_closed_total", "closed", "TCP connections closed."),
        ):
            family(name, "counter", help_)
            for lab, ts in tcp:
                out.append(f"{name}{{{lab}}} {getattr(ts, attr)}")
        for name, help_, samples in gauges:
            family(name, "gauge", help_)
            for labels, value in samples:
                lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {_num(value)}")
        return "\n".join(out) + "\n"


def runtime_gauges(rt, now: float) -> list[tuple[str, str, list[tuple[dict[str, str], float]]]]:
    """meshctl's gauges for `top`, read from a running ProxyRuntime."""
    tel: Telemetry = rt.telemetry
    me = tel.me
    inbound: list[tuple[dict[str, str], float]] = []
    ejected: dict[tuple[str, str], int] = {}
    snap = rt.snapshot
    if snap is not None:
        for lst in snap.cfg.listeners:
            if lst.direction != "inbound":
                continue
            st = rt.stats.listeners.get(lst.name)
            svc = fqdn(lst.service, snap.cfg.workload.namespace) if lst.service else tel.my_service
            inbound.append(({"destination_service": svc, "destination_workload": me.workload,
                             "destination_version": me.version, "listener": lst.name},
                            st.cx_active if st is not None else 0))
        for cs in snap.clusters.values():
            od = cs.outlier
            if od is None:
                continue
            for ep in cs.cluster.endpoints:
                if od.is_ejected((ep.address, ep.port), now):
                    key = (cs.cluster.service, ep.labels.get("version", UNKNOWN))
                    ejected[key] = ejected.get(key, 0) + 1
            for ep in cs.cluster.endpoints:
                key = (cs.cluster.service, ep.labels.get("version", UNKNOWN))
                ejected.setdefault(key, 0)
    return [
        ("meshctl_inbound_cx_active", "Open downstream connections into this workload.", inbound),
        ("meshctl_outlier_ejected_hosts", "Hosts this sidecar's outlier detection has ejected.",
         [({"destination_service": s, "destination_version": v}, n) for (s, v), n in sorted(ejected.items())]),
    ]


def _labelstr(names: tuple[str, ...], values: tuple) -> str:
    return ",".join(f'{n}="{_esc(v)}"' for n, v in zip(names, values))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


# ------------------------------------------------------------------ the pipeline's side


class SourceStage:
    """First filter after prepare: on inbound listeners, take the source's
    identity headers off the request (into ``rq.peer``); everywhere else,
    replace whatever the app sent with this sidecar's own."""

    name = "telemetry"

    async def on_request(self, rq: Request) -> None:
        return self.decide(rq)

    def decide(self, rq: Request) -> None:
        headers: HeaderList = rq.headers  # (typed: compiled, its loops are native)
        if rq.listener.direction == "inbound":
            peer, rest = _take_source(headers, rq.rt.telemetry)  # (one pass, no look-ahead for them)
            if peer is not None:
                rq.peer, rq.headers = peer, rest
            return None
        mine = rq.rt.telemetry.me_headers
        for k, _ in headers:
            if k in SOURCE_HEADERS:
                headers = [h for h in headers if h[0] not in SOURCE_HEADERS]
                break
        rq.headers = headers + mine
        return None


SOURCE_STAGE = SourceStage()


def _take_source(headers: HeaderList, tel: Telemetry | None = None) -> tuple[Peer | None, HeaderList]:
    """The source sidecar's peer from its ``x-meshctl-source`` header (``Peer.headers``
    wrote it), and the headers without any source header, in one pass (inbound, once per
    request): the last ``x-meshctl-source`` counts; without one, earlier versions' five
    ``x-meshctl-source-*`` headers are read (the last value of each; a missing one is
    unknown). None and the headers as they were when there is no source header. With
    ``tel``, the peer is ``tel.source_peer``'s (shared with the last request's when the
    same)."""
    rest: HeaderList = []
    found = False
    field = ""
    workload = app = version = namespace = principal = UNKNOWN
    # the fields kept are appended as the objects they are, through an Any view of the same
    # list (mypyc keeps a tuple[str, str] variable unboxed: appending it makes a new tuple)
    boxed: list[Any] = headers
    for i in range(len(headers)):
        h = headers[i]
        k = h[0]
        if k not in SOURCE_HEADERS:
            rest.append(boxed[i])
        else:
            found = True
            v = h[1]
            if k == H_SOURCE:
                field = v
            elif k == H_WORKLOAD:
                workload = v
            elif k == H_APP:
                app = v
            elif k == H_VERSION:
                version = v
            elif k == H_NAMESPACE:
                namespace = v
            else:
                principal = v
    if not found:
        return None, headers
    if field:
        return (tel.source_peer_of(field) if tel is not None else Peer(*parse_source(field))), rest
    if tel is not None:
        return tel.source_peer(workload, namespace, principal, app, version), rest
    return Peer(workload, namespace, principal, app, version), rest


def _header(headers, name: str) -> str:
    for k, v in headers:
        if k == name:
            return v
    return ""


def finish_request(rq: Request, started: float, now: float, wall_now: float) -> None:
    """Record one finished HTTP request (metrics, and the access log when on).
    ``started``/``now``: trio clock; ``wall_now``: time.time() for the log."""
    rt = rq.rt
    tel: Telemetry = rt.telemetry
    lst = rq.listener
    inbound = lst.direction == "inbound"
    cs = rq.cluster
    if inbound:
        service = fqdn(lst.service, rq.snap.source_namespace) if lst.service else None
    else:
        service = cs.cluster.service if cs is not None else None
        if service is None and rq.forward is not None:
            # Answered before a cluster was picked (a fault-injected abort): it was on its
            # way to the route's destination, so it counts there, not under "unknown".
            routed = rq.snap.clusters.get(rq.forward.cluster)
            service = routed.cluster.service if routed is not None else None
    head = rq.head
    ctype = cl = ""
    for k, v in head.headers:
        if k == "content-type":
            ctype = v
        elif k == "content-length":
            cl = v
    protocol = "grpc" if ctype.startswith("application/grpc") else "http"
    peer = rq.peer
    peer_id = getattr(rq.down, "peer_id", None)  # verified by mTLS (identity.SecureStream)
    if peer_id is not None and inbound:
        # the verified identity, not the header's (a shared peer is never changed: another made)
        if peer is None:
            peer = tel.source_peer(UNKNOWN, UNKNOWN, peer_id, UNKNOWN, UNKNOWN)
        elif peer.principal != peer_id:
            peer = tel.source_peer(peer.workload, peer.namespace, peer_id, peer.app, peer.version)
    grpc_status = (getattr(rq.server, "grpc_status", "") or rq.grpc_status) if protocol == "grpc" else ""
    # A gRPC error the proxy answered itself (fault abort, rate limit, no route, no
    # upstream) or turned an upstream's HTTP error into went to the client as HTTP 200
    # trailers-only: recorded as Envoy and Istio record it, response_code 200 and the
    # gRPC status in grpc_response_status, as a gRPC server's own error answer is.
    status = rq.status
    if grpc_status and status >= 300:
        status = 200
    labels, series = tel.http_series(inbound, peer, None if inbound else rq.endpoint, service, status, rq.flags,
                                     protocol, peer_id is not None, grpc_status)
    if cl.isdigit():
        req_bytes = int(cl)
    else:
        req_bytes = rq.body.size if rq.body is not None else 0
    duration_ms = (now - started) * 1000.0
    series.requests += 1
    if protocol == "grpc":
        counter = getattr(rq.reader, "msgs", None)
        if counter is not None:
            series.request_messages += counter.messages
        counter = getattr(rq.server, "msgs", None)
        if counter is not None:
            series.response_messages += counter.messages
    # Histogram.observe inlined, three times (once per request each)
    h = series.duration
    h.counts[_bucket(h.buckets, duration_ms)] += 1
    h.sum += duration_ms
    h.count += 1
    h = series.request_bytes
    h.counts[_bucket(h.buckets, req_bytes)] += 1
    h.sum += req_bytes
    h.count += 1
    h = series.response_bytes
    h.counts[_bucket(h.buckets, rq.bytes_sent)] += 1
    h.sum += rq.bytes_sent
    h.count += 1
    if rq.trace is not None:  # sampled (proxy/tracing.py)
        trace_finish(rq, labels, duration_ms)
    log = rt.access_log
    if log is not None and _access_logged(rq, inbound, head, labels, duration_ms, status):
        ep = rq.endpoint
        if inbound:
            ep = None
            if cs is not None and cs.cluster.endpoints:
                ep = cs.cluster.endpoints[0]
        log.write({
            "start_time": iso_time(wall_now - (now - started)),
            "method": head.method,
            "path": head.path,
            "protocol": "HTTP/2" if head.http_version == "2" else f"HTTP/{head.http_version}",
            "response_code": status,
            "grpc_status": grpc_status or None,  # Envoy's %GRPC_STATUS(NUMBER)%: gRPC requests only
            "response_flags": labels[17],
            "bytes_received": req_bytes,
            "bytes_sent": rq.bytes_sent,
            "duration": int(round(duration_ms)),
            "upstream_host": f"{ep.address}:{ep.port}" if ep is not None else None,
            "upstream_cluster": cs.name if cs is not None else None,
            "x_request_id": rq.request_id or None,
            "authority": head.authority,
            "user_agent": _header(head.headers, "user-agent") or None,
            "downstream_remote_address": rq.client_ip,
            "listener": lst.name,
            "reporter": labels[0],
            "source_workload": labels[1],
            "destination_workload": labels[6],
            "destination_service": labels[11],
        })


def _access_logged(rq, inbound: bool, head, labels: tuple, duration_ms: float, status: int) -> bool:
    """Istio Telemetry accessLogging: this direction on, and the filter expression true."""
    snap = rq.snap
    tp = snap.cfg.telemetry
    if not (tp.access_log_server if inbound else tp.access_log_client):
        return False
    tree = snap.access_filter
    if tree is None:
        return True
    from ..core.celfilter import evaluate

    path = head.path or ""
    ep = rq.endpoint
    attrs = {
        "response.code": status,
        "response.flags": labels[17],
        "request.method": head.method,
        "request.path": path,
        "request.url_path": path.split("?", 1)[0],
        "request.host": head.authority or "",
        "request.scheme": head.scheme or "http",
        "request.protocol": "HTTP/2" if head.http_version == "2" else f"HTTP/{head.http_version}",
        "request.useragent": _header(head.headers, "user-agent") or "",
        "request.id": rq.request_id or "",
        "request.duration": int(round(duration_ms)),
        "connection.mtls": getattr(rq.down, "peer_id", None) is not None,
        "source.address": rq.client_ip or "",
        "request.headers": {k: v for k, v in head.headers},
    }
    if labels[16]:
        attrs["response.grpc_status"] = labels[16]
    if ep is not None:
        attrs["upstream.address"] = f"{ep.address}:{ep.port}"
    return evaluate(tree, attrs)


def iso_time(t: float) -> str:
    """Envoy's START_TIME form: 2026-11-26T14:07:00.123Z."""
    import time as _time

    ms = int((t - int(t)) * 1000)
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(int(t))) + f".{ms:03d}Z"


def tcp_peer(snap, peer_id: str) -> Peer:
    """The source of an inbound TCP connection, from its verified SPIFFE ID. TCP carries no
    source headers (Istio exchanges peer metadata in-band): the labels come from the mesh's
    endpoints with that identity, the workload and version only when exactly one workload
    has it (versions sharing a service account leave them unknown); the namespace is the
    SPIFFE ID's own."""
    ns = UNKNOWN
    parts = peer_id.split("/")
    if "ns" in parts and parts.index("ns") + 1 < len(parts):
        ns = parts[parts.index("ns") + 1]
    found: dict[tuple, Peer] = {}
    for cs in snap.clusters.values():
        for ep in cs.cluster.endpoints:
            if ep.identity == peer_id and ep.instance:
                p = Peer.of_endpoint(ep, cs.cluster.service)
                found[p.as_tuple()] = p
    if len(found) == 1:
        p = next(iter(found.values()))
        return Peer(p.workload, ns, peer_id, p.app, p.version)
    apps = {p.app for p in found.values()}
    return Peer(UNKNOWN, ns, peer_id, apps.pop() if len(apps) == 1 else UNKNOWN, UNKNOWN)


def tcp_opened(rt, listener, cs, ep, peer_id: str | None = None) -> TcpSeries:
    """A TCP connection reached its upstream: count it open; returns its series.
    ``peer_id``: the downstream's SPIFFE ID when it came in over mTLS (inbound)."""
    tel: Telemetry = rt.telemetry
    inbound = listener.direction == "inbound"
    peer = None
    if inbound and peer_id:
        snap = rt.snapshot
        hit = tel.tcp_peers.get(peer_id)
        if hit is not None and hit[0] is snap:
            peer = hit[1]
        else:  # worked out once per identity and config
            if len(tel.tcp_peers) >= 1000:
                tel.tcp_peers.clear()
            peer = tcp_peer(snap, peer_id)
            tel.tcp_peers[peer_id] = (snap, peer)
    st = tel.tcp_series(tel.tcp_labels(inbound=inbound, peer=peer, endpoint=None if inbound else ep,
                                       service=cs.cluster.service if not inbound else None,
                                       mtls=inbound and peer_id is not None))
    st.opened += 1
    return st


def tcp_closed(st: TcpSeries, counts: tuple[int, int]) -> None:
    """``counts``: relay()'s (client → upstream, upstream → client) bytes."""
    st.received += counts[0]
    st.sent += counts[1]
    st.closed += 1
