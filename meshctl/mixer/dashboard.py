"""`meshctl dashboard`: a live web page served by Mixer on loopback.

    GET /dashboard/?token=T   sets the dashboard cookie and redirects to /dashboard/
    GET /dashboard/           the page (HTML; its script and style are served here too: no CDN)
    GET /dashboard/app.js     plain JavaScript, SVG drawing
    GET /dashboard/style.css
    GET /dashboard/state      the state as JSON (what each event carries)
    GET /dashboard/events     server-sent events: one ``state`` event a second

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


async def handle(mixer, req: Request, path: str) -> Response:
    """Everything under /dashboard (Mixer's handle delegates here, before its own credential check)."""
    want = token(mixer.mesh_secret)
    if req.method != "GET":
        raise HTTPError(404, f"no route {req.method} {req.path}")
    given = req.query.get("token")
    if given is not None:
        if not hmac.compare_digest(given, want):
            raise HTTPError(403, "this dashboard token is not this mesh's: run `meshctl dashboard` for the URL")
        return Response(303, b"", [("location", "/dashboard/"), ("cache-control", "no-store"),
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
    if path == "/dashboard/events":
        return Response(200, b"", [("content-type", "text/event-stream"), ("cache-control", "no-store")],
                        stream=_events(mixer))
    raise HTTPError(404, f"no page {req.path}")
