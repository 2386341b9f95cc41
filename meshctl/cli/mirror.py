"""`meshctl mirror diff SERVICE`: how a mirror's answers differ from the primary's.

Every sidecar compares the shadows it sends (VirtualService ``mirror`` /
``mirrors``, proxy/mirror.py) with the primary request: status, content type,
body digest (SHA-256 of each whole body, up to 1 MiB), chosen headers and
latency. This command asks each sidecar of the running mesh (their admin
ports, as `up` recorded them) and adds them up per mirror cluster of SERVICE,
with examples of differing requests: the check a team wants before it shifts
traffic to a new version.

- Without ``--window``: status, content type, body and "no answer" are counted
  since each sidecar started; chosen headers (``-H``, default content-type)
  are compared over the comparisons each sidecar keeps (its latest 256).
- ``--window SECONDS``: everything over the kept comparisons of that window.
- ``--watch``: live, the table redrawn every ``--interval`` seconds.
- A mirror that answered, whatever its status (401, 503 ...), is an answer: the
  diff shows both status codes and counts them in STATUS≠, with the pairs seen
  (``200 -> 401: 4``). "No answer" is for a mirror that sent no response head
  (connection refused, reset or closed, timeout), and says which.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Iterable, Optional

import typer

from ..model.proxyconfig import fqdn
from .common import StateDirOption, Table, console, fail, state_dir
from .pilot import short_cluster

app = typer.Typer(help="Traffic mirroring: compare a mirror's answers with the primary's.", no_args_is_help=True)

DEFAULT_HEADERS = ("content-type",)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="mirror")


def _host_of(cluster: str) -> str:
    parts = cluster.split("|")
    return parts[3] if len(parts) == 4 else cluster


def _wanted(host: str, want: set[str]) -> bool:
    """``host`` is the service asked for: as named, its FQDN, or (a short name) the mesh
    service so named in another namespace (a mesh under settings.namespace)."""
    return host in want or (host.endswith(".svc.cluster.local") and host.split(".")[0] in want)


def fetch(sd) -> tuple[list[tuple[str, dict]], int]:
    """((proxy name, its /mirror report) for each sidecar that answered, sidecars asked)."""
    from ..credentials import CredentialError, bearer, mesh_credential
    from ..supervisor.run import http_get_json

    try:
        st = json.loads((sd / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        fail(f"no running mesh in {sd} (start one with `meshctl up`)")
    try:  # a sidecar's /mirror (paths, query strings, set-cookie) answers the mesh credential only
        auth = bearer(mesh_credential(sd, create=False))
    except CredentialError as exc:
        fail(str(exc))
    out = []
    asked = 0
    for w in st.get("workloads", []):
        admin = w.get("admin_address")
        if not admin:
            continue
        asked += 1
        rep = http_get_json(admin, "/mirror", headers=auth)
        if rep:
            out.append((w["name"], rep))
    return out, asked


def header_differs(record: dict, name: str) -> bool:
    """Whether a compared request's answers differ in header ``name`` (absent on one side counts)."""
    if not record.get("shadow_status"):
        return False  # no answer: counted as such, not per header
    return record.get("primary_headers", {}).get(name) != record.get("shadow_headers", {}).get(name)


def answer_of(record: dict) -> str:
    """The mirror's side of a comparison: its status, or "no answer (why)" when no response came."""
    if record.get("shadow_status"):
        return str(record["shadow_status"])
    return f"no answer ({record.get('shadow_error') or 'unknown'})"


def _mid(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def summarize(reports: Iterable[tuple[str, dict]], service: str, headers: tuple[str, ...] = DEFAULT_HEADERS,
              window: float | None = None, now: float | None = None) -> tuple[dict, list[dict]]:
    """(per mirror cluster of SERVICE: counts and latencies, differing requests oldest first)."""
    want = {service, fqdn(service)}
    headers = tuple(h.lower() for h in headers)
    since = None if window is None else (time.time() if now is None else now) - window
    totals: dict[str, dict] = {}
    examples: dict[tuple, dict] = {}

    def agg_for(cluster: str) -> dict:
        return totals.setdefault(cluster, {
            "compared": 0, "status_differs": 0, "content_type_differs": 0, "body_differs": 0, "failed": 0,
            "headers_compared": 0, "header_differs": {h: 0 for h in headers}, "statuses": {},
            "primary_p50_ms": [], "mirror_p50_ms": [],
        })

    for proxy, rep in reports:
        recent = [r for r in rep.get("recent", []) if _wanted(_host_of(r["cluster"]), want)
                  and (since is None or r["time"] >= since)]
        if since is None:
            for cluster, t in rep.get("targets", {}).items():
                if not _wanted(_host_of(cluster), want):
                    continue
                a = agg_for(cluster)
                for k in ("compared", "status_differs", "content_type_differs", "body_differs", "failed"):
                    a[k] += t.get(k, 0)
                if t["primary_ms"]["p50"] is not None:
                    a["primary_p50_ms"].append(t["primary_ms"]["p50"])
                if t["shadow_ms"]["p50"] is not None:
                    a["mirror_p50_ms"].append(t["shadow_ms"]["p50"])
            for e in rep.get("examples", []):
                if _wanted(_host_of(e["cluster"]), want):
                    examples[(proxy, e["time"], e["path"], e["cluster"])] = dict(e, proxy=proxy)
        else:
            per: dict[str, tuple[list[float], list[float]]] = {}
            for r in recent:
                a = agg_for(r["cluster"])
                a["compared"] += 1
                d = r.get("differs", [])
                a["status_differs"] += "status" in d
                a["content_type_differs"] += "content-type" in d
                a["body_differs"] += "body" in d
                a["failed"] += "no answer" in d
                p, m = per.setdefault(r["cluster"], ([], []))
                p.append(r["primary_ms"])
                if r["shadow_status"]:
                    m.append(r["shadow_ms"])
                if d:
                    examples[(proxy, r["time"], r["path"], r["cluster"])] = dict(r, proxy=proxy)
            for cluster, (p, m) in per.items():
                for xs, key in ((p, "primary_p50_ms"), (m, "mirror_p50_ms")):
                    v = _mid(xs)
                    if v is not None:
                        totals[cluster][key].append(v)
        for r in recent:
            a = agg_for(r["cluster"])
            pair = f"{r['primary_status']} -> {answer_of(r)}"
            a["statuses"][pair] = a["statuses"].get(pair, 0) + 1
            a["headers_compared"] += 1
            differing = [h for h in headers if header_differs(r, h)]
            for h in differing:
                a["header_differs"][h] += 1
            if differing:
                examples[(proxy, r["time"], r["path"], r["cluster"])] = dict(r, proxy=proxy)
    for a in totals.values():
        a["primary_p50_ms"] = _mid(a["primary_p50_ms"])
        a["mirror_p50_ms"] = _mid(a["mirror_p50_ms"])
    out = []
    for e in sorted(examples.values(), key=lambda e: e["time"]):
        e = dict(e)
        e["differs"] = list(e.get("differs", [])) + [f"header {h}" for h in headers if header_differs(e, h)]
        out.append(e)
    return totals, out


def _render(service: str, totals: dict, examples: list[dict], headers: tuple[str, ...], asked: int,
            window: float | None) -> None:
    if not totals:
        console.print(f"no mirrored requests to {service} seen by the {asked} sidecar(s) asked"
                      + (f" in the last {window:g}s" if window is not None else "")
                      + " (is a VirtualService mirroring it applied?)", highlight=False)
        return
    t = Table("MIRROR", "COMPARED", "STATUS≠", "TYPE≠", "BODY≠", "NO ANSWER", "P50 MS", "MIRROR P50", box=None,
              title=f"last {window:g}s" if window is not None else None)
    t.columns[0].no_wrap = True
    fmt = lambda v: f"{v:.1f}" if v is not None else "-"
    for cluster, a in sorted(totals.items()):
        t.add_row(short_cluster(cluster), str(a["compared"]), str(a["status_differs"]), str(a["content_type_differs"]),
                  str(a["body_differs"]), str(a["failed"]), fmt(a["primary_p50_ms"]), fmt(a["mirror_p50_ms"]))
    console.print(t)
    for cluster, a in sorted(totals.items()):
        if a["statuses"]:
            of = "compared" if window is not None else "latest compared"
            console.print(f"{short_cluster(cluster)} status, primary -> mirror (of {a['headers_compared']} {of}): "
                          + ", ".join(f"{pair}: {n}" for pair, n in sorted(a["statuses"].items(), key=lambda x: -x[1])),
                          highlight=False, soft_wrap=True, markup=False)
        if headers:
            of = "compared" if window is not None else "latest compared"
            console.print(f"{short_cluster(cluster)} headers differing (of {a['headers_compared']} {of}): "
                          + ", ".join(f"{h} {a['header_differs'][h]}" for h in headers),
                          highlight=False, soft_wrap=True, markup=False)
    if examples:
        console.print("differing requests (latest):", highlight=False)
        for x in examples[-10:]:
            shadow = answer_of(x)
            if x["shadow_status"] and x.get("shadow_error"):  # answered, the body not whole: not compared
                shadow += f" ({x['shadow_error']})"
            line = (f"  {datetime.fromtimestamp(x['time']).strftime('%H:%M:%S')} {x['method']} {x['path']}"
                    f"  [{', '.join(x['differs'])}]  primary {x['primary_status']} {x['primary_ms']:.0f}ms"
                    f" body {(x.get('primary_body_sha256') or '-')[:12]}"
                    f"  mirror {shadow} {x['shadow_ms']:.0f}ms body {(x.get('shadow_body_sha256') or '-')[:12]}")
            for h in headers:
                p, m = x.get("primary_headers", {}).get(h, "-"), x.get("shadow_headers", {}).get(h, "-")
                if p != m:
                    line += f"  {h}: {p} | {m}"
            console.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command("diff")
def diff(
    service: str = typer.Argument(..., help="The mirrored service, e.g. httpbin"),
    header: list[str] = typer.Option(list(DEFAULT_HEADERS), "--header", "-H",
                                     help="A response header to compare (repeat for several; default content-type)."),
    window: Optional[float] = typer.Option(None, "--window", "-w", min=0.1,
                                           help="Only the comparisons of the last SECONDS (of those each sidecar keeps)."),
    watch: bool = typer.Option(False, "--watch", help="Live: redraw every --interval seconds until interrupted."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between redraws with --watch."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Compare SERVICE's mirror (shadow) answers with the primary's: status, headers, body digest, latency, examples."""
    sd = state_dir(state)
    headers = tuple(dict.fromkeys(h.lower() for h in header))
    while True:
        reports, asked = fetch(sd)
        totals, examples = summarize(reports, service, headers, window)
        if json_out:
            print(json.dumps({"mirrors": totals, "examples": examples}, indent=1))
        else:
            if watch:
                console.clear()
            _render(service, totals, examples, headers, asked, window)
        if not watch:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return
