"""`meshctl dashboard`: a live web page served by Mixer on loopback.

    GET /dashboard/?token=T   sets the dashboard cookie and moves on to /dashboard/
    GET /dashboard/           the page (HTML; its script and style are served here too: no CDN)
    GET /dashboard/app.js     plain JavaScript, SVG drawing
    GET /dashboard/style.css
    GET /dashboard/state      the state as JSON (what each event carries)
    GET /dashboard/events     server-sent events: one ``state`` event a second
    GET /dashboard/traces?service=S   the recent traces through service S, gathered from every
                              proxy's last sampled spans (their admin ``/traces``), as a page

The state: the service graph (graph.py: nodes are apps and versions, edges
carry rps, error rate, p99 and mTLS), per-service golden signals (aggregate.py's
rows over 10 s), per-service time series over the last five minutes (rps, error
rate, p99, in 5 s steps, from the aggregator's history), where the traces are
(Zipkin's UI when spans go to Zipkin), the rules applied (the rule store's current revision) and the
injected faults in force with their expiry.

Access: the token is an HMAC of the mesh credential (read-only, dashboard
only); `meshctl dashboard` prints the URL with it. The page keeps it in an
HttpOnly, SameSite=Strict cookie scoped to /dashboard, so the URL in the
address bar and the browser history lose it after the first load.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

import trio

from ..httpapi import HTTPError, Request, Response
from . import dashboard_assets as assets

log = logging.getLogger("meshctl.mixer.dashboard")

COOKIE = "meshctl_dashboard"
WINDOW = 10.0  # seconds of traffic behind the rates shown
EVENT_INTERVAL = 1.0
SERIES_SPAN = 300.0  # the charts: the last five minutes ...
SERIES_STEP = 5.0  # ... in five-second steps
MAX_EVENTS = 3600  # an event stream ends after an hour; EventSource reconnects by itself


def token(mesh_secret: str) -> str:
    return hmac.new(mesh_secret.encode(), b"meshctl-dashboard-v1", hashlib.sha256).hexdigest()


def _cookie(req: Request) -> str:
    for part in req.headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == COOKIE:
            return v
    return ""


def _context(mixer, now: float) -> dict:
    """Rules and faults, from the provider the launcher gave Mixer (cli/observe.py reads
    Pilot's rule and fault stores; Mixer, a peer of Pilot, does not import it)."""
    provider = mixer.dashboard_context
    if provider is None:
        return {"rules": [], "faults": [], "tracing": {}}
    try:
        return provider(now)
    except Exception:  # the page shows the graph even when the stores cannot be read
        log.exception("dashboard: reading rules and faults failed")
        return {"rules": [], "faults": [], "tracing": {}}


def state(mixer) -> dict:
    now = time.time()
    rows, covered = mixer.agg.top(WINDOW)
    edges = mixer.graph.edges(WINDOW)
    nodes: dict[str, dict] = {}
    for e in edges:
        for end in (e["source"], e["target"]):
            if end not in nodes:
                name, _, version = end.partition(" ")
                nodes[end] = {"id": end, "service": name, "version": version}
    services = []
    for r in rows:
        d = r.as_dict()
        d["service"] = r.short_service
        services.append(d)
    span, series = mixer.agg.series(SERIES_SPAN, SERIES_STEP)
    return {"time": now, "window": WINDOW, "covered": covered, "rounds": mixer.rounds,
            "series": series, "series_span": SERIES_SPAN, "series_covered": span,
            "nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": edges, "services": services,
            **_context(mixer, now),
            "targets": len(mixer.targets), "failing": sorted(mixer.agg.failures)}


async def _events(mixer):
    yield b"retry: 1000\n\n"
    for _ in range(MAX_EVENTS):
        body = json.dumps(state(mixer), separators=(",", ":"))
        yield f"event: state\ndata: {body}\n\n".encode()
        with trio.move_on_after(EVENT_INTERVAL * 2):
            await mixer.next_round()  # the next scrape round (about a second)


TRACES_SHOWN = 20


def trace_list(service: str, spans: list[dict]) -> list[dict]:
    """The recent traces with a span of ``service`` ("ratings", "ratings.ns" or "ratings.default"),
    newest first: {id, start (µs), duration (µs), services, error, spans: [(depth, span)]}."""
    want = service if "." in service else f"{service}.default"
    by_trace: dict[str, dict[tuple, dict]] = {}
    for sp in spans:
        try:
            key = (sp["id"], sp["kind"], sp["localEndpoint"]["serviceName"])
            by_trace.setdefault(sp["traceId"], {})[key] = sp
        except (KeyError, TypeError):
            continue
    out: list[dict[str, Any]] = []
    for tid, group in by_trace.items():
        items = list(group.values())
        if not any(sp["localEndpoint"]["serviceName"] == want for sp in items):
            continue
        start = min(int(sp["timestamp"]) for sp in items)
        end = max(int(sp["timestamp"]) + int(sp.get("duration", 0)) for sp in items)
        ids = {sp["id"] for sp in items}
        children: dict[str | None, list[dict]] = {}
        for sp in items:
            parent = sp.get("parentId")
            children.setdefault(parent if parent in ids else None, []).append(sp)
        ordered: list[tuple[int, dict]] = []

        def walk(parent: str | None, depth: int) -> None:
            # a gateway's SERVER and CLIENT spans, or a span and its child, can share no id; a
            # span whose parent is itself (never made by meshctl) would loop: skip those
            for sp in sorted(children.get(parent, []), key=lambda x: (int(x["timestamp"]), x["kind"] != "SERVER")):
                if len(ordered) > 500 or sp["id"] == parent:
                    continue
                ordered.append((depth, sp))
                walk(sp["id"], depth + 1)

        walk(None, 0)
        out.append({"id": tid, "start": start, "duration": end - start, "spans": ordered,
                    "services": sorted({sp["localEndpoint"]["serviceName"] for sp in items}),
                    "error": any((sp.get("tags") or {}).get("error") == "true" for sp in items)})
    out.sort(key=lambda t: -t["start"])
    return out[:TRACES_SHOWN]


def traces_page(service: str, traces: list[dict], proxies: int) -> str:
    import html as h

    def when(us: int) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(us / 1e6)) + f".{(us // 1000) % 1000:03d} UTC"

    rows = []
    for t in traces:
        lines = []
        for depth, sp in t["spans"]:
            tags = sp.get("tags") or {}
            lines.append(
                f'<li class="span" style="margin-left:{depth * 18}px" data-service="{h.escape(sp["localEndpoint"]["serviceName"])}">'
                f'<b>{h.escape(sp["localEndpoint"]["serviceName"])}</b> {h.escape(sp["kind"])} '
                f'{h.escape(sp.get("name", ""))} · {h.escape(tags.get("http.status_code", "-"))} · '
                f'{int(sp.get("duration", 0)) / 1000:.1f} ms</li>')
        rows.append(
            f'<details class="trace{" error" if t["error"] else ""}" id="trace-{h.escape(t["id"])}"><summary>'
            f'<code>{h.escape(t["id"])}</code> · {when(t["start"])} · {t["duration"] / 1000:.1f} ms · '
            f'{len(t["spans"])} spans · {h.escape(", ".join(t["services"]))}{" · error" if t["error"] else ""}'
            f'</summary><ul>{"".join(lines)}</ul></details>')
    body = "".join(rows) or "<p><i>No sampled request through this service in the proxies' recent spans.</i></p>"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>traces: {h.escape(service)}</title>'
            '<link rel="stylesheet" href="/dashboard/style.css"></head><body>'
            f'<header><h1>meshctl</h1><span class="status">recent traces through {h.escape(service)}</span></header>'
            f'<main><section><h2>Recent traces through {h.escape(service)} <small>(newest first; the last '
            f'sampled spans of {proxies} proxies)</small></h2><p><a href="/dashboard/">← dashboard</a></p>{body}'
            '</section></main></body></html>')


async def _gather_spans(mixer) -> list[dict]:
    import httpx

    spans: list[dict] = []

    async def one(client, addr: str) -> None:
        try:
            with trio.fail_after(2.0):
                r = await client.get(f"http://{addr}/traces")
            if r.status_code == 200:
                got = r.json()
                if isinstance(got, list):
                    spans.extend(x for x in got if isinstance(x, dict))
        except (httpx.HTTPError, trio.TooSlowError, OSError, ValueError):
            pass  # a proxy that does not answer has no spans to show

    from ..credentials import bearer

    # the proxies' /traces answers the mesh credential only (URLs and request ids of real requests)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False, headers=bearer(mixer.mesh_secret)) as client:
        async with trio.open_nursery() as n:
            for addr in set(mixer.targets.values()):
                n.start_soon(one, client, addr)
    return spans


async def handle(mixer, req: Request, path: str) -> Response:
    """Everything under /dashboard (Mixer's handle delegates here, before its own credential check)."""
    want = token(mixer.mesh_secret)
    if req.method != "GET":
        raise HTTPError(404, f"no route {req.method} {req.path}")
    given = req.query.get("token")
    if given is not None:
        if not hmac.compare_digest(given, want):
            raise HTTPError(403, "this dashboard token is not this mesh's: run `meshctl dashboard` for the URL")
        # A page that moves on by itself rather than a 303: a browser sends a SameSite=Strict cookie
        # on a navigation this site started, not at the end of a redirect chain another page started
        # (`meshctl dashboard --open` starts it from a local file, to keep the token off argv).
        return Response(200, assets.ENTER.encode(), [("content-type", "text/html; charset=utf-8"),
                                                     ("cache-control", "no-store"), ("referrer-policy", "no-referrer"),
                                                     ("set-cookie", f"{COOKIE}={want}; Path=/dashboard; HttpOnly; SameSite=Strict")])
    if not hmac.compare_digest(_cookie(req), want):
        return Response(401, assets.LOGIN.encode(), [("content-type", "text/html; charset=utf-8")])
    if path in ("/dashboard", "/dashboard/index.html"):
        return Response(200, assets.INDEX.encode(), [("content-type", "text/html; charset=utf-8"),
                                                     ("cache-control", "no-store")])
    if path == "/dashboard/app.js":
        return Response(200, assets.APP_JS.encode(), [("content-type", "text/javascript; charset=utf-8")])
    if path == "/dashboard/style.css":
        return Response(200, assets.STYLE.encode(), [("content-type", "text/css; charset=utf-8")])
    if path == "/dashboard/state":
        return Response.json(state(mixer))
    if path == "/dashboard/traces":
        service = req.query.get("service", "")
        if not service:
            raise HTTPError(400, "name the service: /dashboard/traces?service=ratings")
        traces = trace_list(service, await _gather_spans(mixer))
        return Response(200, traces_page(service, traces, len(mixer.targets)).encode(),
                        [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-store")])
    if path == "/dashboard/events":
        return Response(200, b"", [("content-type", "text/event-stream"), ("cache-control", "no-store")],
                        stream=_events(mixer))
    raise HTTPError(404, f"no page {req.path}")
