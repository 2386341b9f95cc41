"""Mesh-wide telemetry from the sidecars' /stats: totals, and the numbers behind `meshctl top`.

Pure: Mixer's server feeds it scraped text with the time of the scrape
(``now``, seconds on any monotonic clock); nothing here does I/O.

Rules:
1. Counters (``*_total``, histogram ``_bucket``/``_sum``/``_count``) are
   accumulated per sidecar as deltas between scrapes. A value lower than the
   previous one means the sidecar restarted: the new value is the delta.
   A sidecar seen for the first time contributes everything it counted.
   A sidecar that stops answering keeps its last values, so coming back
   without a restart does not count anything twice.
2. Gauges (active connections, ejected hosts) are the latest value of each
   sidecar that answered the last scrape, summed.
3. After each scrape round ``snapshot(now)`` records, per (service, version),
   cumulative requests, errors (5xx, server-side gRPC statuses), rate-limited (429 or flag RL),
   overflows (flag UO), the duration histogram, and the gauges. A window's
   numbers are the difference between the newest record and the newest one
   at least ``window`` seconds older (or the oldest there is).
4. Which reporter speaks for a service: the source side (client sidecars
   see local failures: no healthy upstream, overflows) when any client
   sidecar reported on it, else the destination side (clients outside the
   mesh). Rate-limited requests are counted where they are decided, on the
   destination side, when it reported.
5. Percentiles come from histogram bucket deltas with Prometheus'
   ``histogram_quantile`` interpolation (linear within a bucket; the
   +Inf bucket answers the highest finite bound).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from ..model.telemetry import DURATION_BUCKETS_MS, is_error

HISTOGRAMS = ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes")
GAUGES = ("meshctl_inbound_cx_active", "meshctl_outlier_ejected_hosts")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


class ParseError(ValueError):
    pass


def _unescape(v: str) -> str:
    if "\\" not in v:
        return v
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse_samples(text: str) -> dict[Key, float]:
    """The istio_* and meshctl top gauges in a Prometheus text exposition."""
    out: dict[Key, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not (line.startswith("istio_") or line.startswith(GAUGES)):
            continue
        brace = line.find("{")
        if brace < 0:
            name, _, rest = line.partition(" ")
            labels: tuple = ()
        else:
            end = line.rfind("}")
            if end < brace:
                raise ParseError(f"bad sample line: {line[:200]!r}")
            name = line[:brace]
            labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(line[brace + 1:end])))
            rest = line[end + 1:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            raise ParseError(f"bad sample value: {line[:200]!r}") from None
        out[(name, labels)] = value
    return out


def _is_gauge(name: str) -> bool:
    return name in GAUGES


@dataclass
class Row:
    """One line of `top`: a service version over a window."""

    service: str
    version: str
    requests: int = 0
    rps: float = 0.0
    success_rate: float | None = None  # None: no requests in the window
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    errors: int = 0
    active_connections: int = 0
    ejected_hosts: int = 0
    overflows: int = 0
    rate_limited: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def short_service(self) -> str:
        return short_name(self.service)


def short_name(service: str) -> str:
    if service.endswith(".svc.cluster.local"):
        name, ns = service.split(".")[:2]
        return name if ns == "default" else f"{name}.{ns}"
    return service


NB = len(DURATION_BUCKETS_MS) + 1


class _Acc:
    """Cumulative numbers of one (reporter, service, version)."""

    __slots__ = ("requests", "errors", "rate_limited", "overflows", "buckets")

    def __init__(self) -> None:
        self.requests = 0.0
        self.errors = 0.0
        self.rate_limited = 0.0
        self.overflows = 0.0
        self.buckets = [0.0] * NB  # cumulative le-counts, as exposed; last = +Inf

    def copy(self) -> "_Acc":
        a = _Acc()
        a.requests, a.errors, a.rate_limited, a.overflows = self.requests, self.errors, self.rate_limited, self.overflows
        a.buckets = list(self.buckets)
        return a


_LE_INDEX = {**{_le: i for i, _le in enumerate(
    (str(b) if b != int(b) else str(int(b))) for b in DURATION_BUCKETS_MS)}, "+Inf": NB - 1}


def quantile(q: float, buckets: list[float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative counts at DURATION_BUCKETS_MS (+Inf last)."""
    total = buckets[-1]
    if total <= 0:
        return None
    rank = q * total
    prev_count, prev_bound = 0.0, 0.0
    for i, c in enumerate(buckets):
        if c >= rank:
            if i == len(buckets) - 1:
                return float(DURATION_BUCKETS_MS[-1])
            bound = DURATION_BUCKETS_MS[i]
            in_bucket = c - prev_count
            if in_bucket <= 0:
                return float(bound)
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket
        prev_count = c
        prev_bound = DURATION_BUCKETS_MS[i] if i < len(DURATION_BUCKETS_MS) else prev_bound
    return float(DURATION_BUCKETS_MS[-1])


class Aggregator:
    def __init__(self, history_seconds: float = 900.0) -> None:
        self.totals: dict[Key, float] = {}  # mesh-wide counters (rule 1)
        self.last: dict[str, dict[Key, float]] = {}  # per target: last counter values
        self.gauges: dict[str, dict[Key, float]] = {}  # per target: gauges of its last good scrape
        self.history: deque[tuple[float, dict, dict]] = deque()
        self.history_seconds = history_seconds
        self.scrapes = 0
        self.failures: dict[str, str] = {}

    # ------------------------------------------------------------ feeding

    def ingest(self, target: str, text: str) -> None:
        """One sidecar's /stats. Raises ParseError on text that is not Prometheus'."""
        samples = parse_samples(text)
        prev = self.last.setdefault(target, {})
        gauges: dict[Key, float] = {}
        totals = self.totals
        for key, v in samples.items():
            if _is_gauge(key[0]):
                gauges[key] = v
                continue
            p = prev.get(key)
            delta = v - p if p is not None and v >= p else v
            if delta:
                totals[key] = totals.get(key, 0.0) + delta
            elif key not in totals:
                totals[key] = 0.0
            prev[key] = v
        self.gauges[target] = gauges
        self.failures.pop(target, None)
        self.scrapes += 1

    def lost(self, target: str, why: str) -> None:
        """A target that did not answer: its gauges no longer count (rule 2)."""
        self.gauges.pop(target, None)
        self.failures[target] = why

    def forget_targets(self, keep: set[str]) -> None:
        for t in list(self.gauges):
            if t not in keep:
                del self.gauges[t]
        for t in list(self.failures):
            if t not in keep:
                del self.failures[t]

    def snapshot(self, now: float) -> None:
        """Record the state after a scrape round (rule 3)."""
        accs: dict[tuple[str, str, str], _Acc] = {}
        for (name, labels), v in self.totals.items():
            if name == "istio_requests_total":
                d = dict(labels)
                a = accs.get((d.get("reporter", ""), d.get("destination_service", "unknown"),
                              d.get("destination_version", "unknown")))
                if a is None:
                    a = accs[(d.get("reporter", ""), d.get("destination_service", "unknown"),
                              d.get("destination_version", "unknown"))] = _Acc()
                a.requests += v
                code = d.get("response_code", "")
                flags = d.get("response_flags", "-")
                if is_error(code, d.get("grpc_response_status", ""), flags):
                    a.errors += v
                if code == "429" or "RL" in flags.split(","):
                    a.rate_limited += v
                if "UO" in flags.split(","):
                    a.overflows += v
            elif name == "istio_request_duration_milliseconds_bucket":
                d = dict(labels)
                i = _LE_INDEX.get(d.get("le", ""))
                if i is None:
                    continue
                k = (d.get("reporter", ""), d.get("destination_service", "unknown"), d.get("destination_version", "unknown"))
                a = accs.get(k)
                if a is None:
                    a = accs[k] = _Acc()
                a.buckets[i] += v
        g: dict[tuple[str, str, str], float] = {}
        for samples in self.gauges.values():
            for (name, labels), v in samples.items():
                d = dict(labels)
                k = (name, d.get("destination_service", "unknown"), d.get("destination_version", "unknown"))
                g[k] = g.get(k, 0.0) + v
        self.history.append((now, accs, g))
        while self.history and self.history[0][0] < now - self.history_seconds:
            self.history.popleft()

    # ------------------------------------------------------------ reading

    def top(self, window: float, now: float | None = None) -> tuple[list[Row], float]:
        """Rows per (service, version) over the last ``window`` seconds, and the
        seconds actually covered (less than ``window`` just after start)."""
        if not self.history:
            return [], 0.0
        t1, cur, gauges = self.history[-1]
        base = self.history[0]
        for entry in reversed(self.history):
            if entry[0] <= t1 - window + 1e-6:
                base = entry
                break
        t0, old, _ = base
        elapsed = t1 - t0
        keys = {(s, v) for (_, s, v) in cur} | {(s, v) for (n, s, v) in gauges if n == "meshctl_inbound_cx_active"}
        rows = []
        for service, version in sorted(keys):
            src = _delta(cur.get(("source", service, version)), old.get(("source", service, version)))
            dst = _delta(cur.get(("destination", service, version)), old.get(("destination", service, version)))
            has_src = ("source", service, version) in cur and cur[("source", service, version)].requests > 0
            main = src if has_src else dst
            row = Row(service=service, version=version)
            if main is not None:
                row.requests = int(main.requests)
                row.errors = int(main.errors)
                row.rps = main.requests / elapsed if elapsed > 0 else 0.0
                if main.requests > 0:
                    row.success_rate = 1.0 - main.errors / main.requests
                    row.p50 = quantile(0.50, main.buckets)
                    row.p90 = quantile(0.90, main.buckets)
                    row.p99 = quantile(0.99, main.buckets)
            rl = dst if ("destination", service, version) in cur else main
            row.rate_limited = int(rl.rate_limited) if rl is not None else 0
            row.overflows = int(src.overflows) if src is not None else 0
            row.active_connections = int(gauges.get(("meshctl_inbound_cx_active", service, version), 0))
            row.ejected_hosts = int(gauges.get(("meshctl_outlier_ejected_hosts", service, version), 0))
            rows.append(row)
        return rows, elapsed

    def series(self, span: float = 300.0, step: float = 5.0) -> tuple[float, dict[str, list[dict]]]:
        """Per service (all its versions): rps, error rate and p99 over each ``step`` of the
        last ``span`` seconds, oldest first, each point aged in seconds before the newest
        record (rule 4 picks the reporter of each version). Returns (covered seconds, series)."""
        if len(self.history) < 2:
            return 0.0, {}
        t_end = self.history[-1][0]
        picks: list[tuple[float, dict, dict]] = []
        for entry in reversed(self.history):
            if not picks or picks[-1][0] - entry[0] >= step - 1e-6:
                picks.append(entry)
            if entry[0] <= t_end - span:
                break
        picks.reverse()
        out: dict[str, list[dict]] = {}
        for (t0, old, _), (t1, cur, _) in zip(picks, picks[1:]):
            elapsed = t1 - t0
            per: dict[str, _Acc] = {}
            for _, service, version in cur:
                src = ("source", service, version)
                key = src if src in cur and cur[src].requests > 0 else ("destination", service, version)
                d = _delta(cur.get(key), old.get(key))
                if d is None:
                    continue
                acc = per.get(short_name(service))
                if acc is None:
                    acc = per[short_name(service)] = _Acc()
                acc.requests += d.requests
                acc.errors += d.errors
                acc.buckets = [a + b for a, b in zip(acc.buckets, d.buckets)]
            for svc, a in per.items():
                out.setdefault(svc, []).append({
                    "age": round(t_end - t1, 1),
                    "rps": a.requests / elapsed if elapsed > 0 else 0.0,
                    "error_rate": a.errors / a.requests if a.requests > 0 else None,
                    "p99": quantile(0.99, a.buckets) if a.requests > 0 else None,
                })
        return t_end - picks[0][0], out

    # ------------------------------------------------------------ mesh-wide exposition

    def render(self) -> str:
        """Mesh-wide Prometheus text: every sidecar's Istio series, summed (rule 1), and the gauges."""
        by_family: dict[str, list[str]] = {}
        kinds: dict[str, str] = {}
        for (name, labels), v in sorted(self.totals.items()):
            fam = name
            for h in HISTOGRAMS:
                if name.startswith(h + "_") and name[len(h) + 1:] in ("bucket", "sum", "count"):
                    fam = h
                    kinds[fam] = "histogram"
                    break
            else:
                kinds[fam] = "counter"
            lab = ",".join(f'{k}="{_esc(x)}"' for k, x in labels)
            by_family.setdefault(fam, []).append(f"{name}{{{lab}}} {_num(v)}")
        gsum: dict[Key, float] = {}
        for samples in self.gauges.values():
            for k, v in samples.items():
                gsum[k] = gsum.get(k, 0.0) + v
        for (name, labels), v in sorted(gsum.items()):
            kinds[name] = "gauge"
            lab = ",".join(f'{k}="{_esc(x)}"' for k, x in labels)
            by_family.setdefault(name, []).append(f"{name}{{{lab}}} {_num(v)}")
        out: list[str] = []
        for fam in sorted(by_family):
            out.append(f"# TYPE {fam} {kinds[fam]}")
            out.extend(by_family[fam])
        return "\n".join(out) + "\n"


def _delta(cur: _Acc | None, old: _Acc | None) -> _Acc | None:
    if cur is None:
        return None
    if old is None:
        return cur.copy()
    d = _Acc()
    d.requests = max(0.0, cur.requests - old.requests)
    d.errors = max(0.0, cur.errors - old.errors)
    d.rate_limited = max(0.0, cur.rate_limited - old.rate_limited)
    d.overflows = max(0.0, cur.overflows - old.overflows)
    d.buckets = [max(0.0, a - b) for a, b in zip(cur.buckets, old.buckets)]
    return d


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)
