"""Mixer: mesh-wide telemetry gathered from every sidecar, and the global quota service.

    GET  /metrics              every sidecar's Istio metrics, summed (Prometheus text)
    GET  /v1/top?window=10s    per service and version: rps, success rate, p50/p90/p99,
                               active connections, ejected hosts, overflows, rate-limited
    GET  /v1/targets           the sidecars scraped, and the last error of those that failed
    POST /v1/quota             {"key", "proxy", "tokens", "limit", "unit_seconds"} →
                               {"granted", "valid_for", "exhausted"}  (core.ratelimit.GlobalQuota)
    GET  /ready                200 once serving
    GET  /dashboard/...        `meshctl dashboard`'s live page (dashboard.py; its own read-only token)

Like istiod's monitoring port, ``/metrics`` and ``/ready`` need no credential
(Prometheus scrapes them). ``/v1/top`` and ``/v1/targets`` need the mesh
credential; ``/v1/quota`` needs the credential of the proxy it names (or the
mesh's), so no local process can drain another proxy's quota
(meshctl/credentials.py). No credential: 401; the wrong one: 403.

Sidecars are found in the state directory's ``status.json`` (written by
`meshctl up`: every workload's admin address; gateways' admin ports come
from ``ports.json``), plus any ``--target`` given; their ``/stats`` are scraped every ``interval`` seconds, all at once,
each with a timeout shorter than the interval.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import trio

from ..core.ratelimit import GlobalQuota, RateLimitConfigError
from ..credentials import Caller, Forbidden, mesh_credential
from ..httpapi import HTTPError, Request, Response, authenticate, serve
from . import dashboard
from .aggregate import Aggregator, ParseError
from .graph import EdgeHistory

log = logging.getLogger("meshctl.mixer")

SCRAPE_INTERVAL = 1.0
MAX_WINDOW = 900.0


def parse_window(text: str | None, default: float = 10.0) -> float:
    """``10s``, ``1m``, ``500ms`` or plain seconds; at most 15 minutes."""
    if not text:
        return default
    t = text.strip()
    try:
        if t.endswith("ms"):
            v = float(t[:-2]) / 1000
        elif t.endswith("s"):
            v = float(t[:-1])
        elif t.endswith("m"):
            v = float(t[:-1]) * 60
        elif t.endswith("h"):
            v = float(t[:-1]) * 3600
        else:
            v = float(t)
    except ValueError:
        raise ValueError(f"bad window {text!r}: use a duration like 10s or 1m") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"bad window {text!r}: must be positive")
    return min(v, MAX_WINDOW)


class Mixer:
    def __init__(self, state_dir: Path | None = None, targets: dict[str, str] | None = None,
                 interval: float = SCRAPE_INTERVAL, *, mesh_secret: str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else None
        if mesh_secret is None:
            import secrets

            # without a state directory (a Mixer built in a test) nobody holds the secret: every call refused
            mesh_secret = mesh_credential(self.state_dir) if self.state_dir else secrets.token_urlsafe(32)
        self.mesh_secret = mesh_secret
        self.static_targets = dict(targets or {})
        self.interval = interval
        self.agg = Aggregator()
        self.graph = EdgeHistory()  # the dashboard's service graph (graph.py)
        # now → {"rules": [...], "faults": [...]} for the dashboard, given by the launcher (cli/mixer.py)
        self.dashboard_context: Callable[[float], dict] | None = None
        self.quotas: dict[str, GlobalQuota] = {}
        self.targets: dict[str, str] = {}
        self.rounds = 0
        self._round_done = trio.Event()

    # ------------------------------------------------------------ targets

    def discover(self) -> dict[str, str]:
        """name → "host:port" of every sidecar admin API to scrape."""
        out = dict(self.static_targets)
        if self.state_dir is not None:
            try:
                st = json.loads((self.state_dir / "status.json").read_text())
            except (OSError, ValueError):
                st = {}
            for w in st.get("workloads", []) or []:
                addr = w.get("admin_address")
                if addr and w.get("state") not in ("stopped",):
                    out[w.get("name") or addr] = addr
            gateways = [g.get("name") for g in st.get("gateways", []) or [] if g.get("name")]
            if gateways:
                # status.json has no gateway admin address; `up` keeps it in ports.json as "<name>/admin"
                try:
                    ports = json.loads((self.state_dir / "ports.json").read_text())
                except (OSError, ValueError):
                    ports = {}
                for name in gateways:
                    port = ports.get(f"{name}/admin") if isinstance(ports, dict) else None
                    if isinstance(port, int):
                        out[name] = f"127.0.0.1:{port}"
        return out

    # ------------------------------------------------------------ scraping

    async def scrape_once(self, client) -> None:
        import httpx

        self.targets = self.discover()
        results: dict[str, tuple[str | None, str]] = {}

        async def one(name: str, addr: str) -> None:
            try:
                with trio.fail_after(max(0.2, self.interval * 0.8)):
                    r = await client.get(f"http://{addr}/stats")
                if r.status_code != 200:
                    results[name] = (None, f"HTTP {r.status_code}")
                else:
                    results[name] = (r.text, "")
            except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
                results[name] = (None, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)

        async with trio.open_nursery() as n:
            for name, addr in self.targets.items():
                n.start_soon(one, name, addr)
        for name, (text, err) in results.items():
            key = self.targets[name]
            if text is None:
                self.agg.lost(key, err)
                continue
            try:
                self.agg.ingest(key, text)
            except ParseError as exc:
                self.agg.lost(key, str(exc))
        self.agg.forget_targets(set(self.targets.values()))
        self.agg.snapshot(trio.current_time())
        self.graph.snapshot(trio.current_time(), self.agg.totals)
        self.rounds += 1
        ev, self._round_done = self._round_done, trio.Event()
        ev.set()

    async def scrape_loop(self) -> None:
        from ..loopback import plain_http_client

        async with plain_http_client(timeout=self.interval) as client:
            while True:
                start = trio.current_time()
                await self.scrape_once(client)
                await trio.sleep_until(start + self.interval)

    async def next_round(self) -> None:
        await self._round_done.wait()

    # ------------------------------------------------------------ quota

    def grant(self, body: dict, now: float, caller: Caller | None = None) -> dict:
        try:
            key = str(body["key"])
            proxy = str(body.get("proxy") or "?")
            if caller is not None:
                caller.require_proxy(proxy, "drawing a quota")
            tokens = int(body.get("tokens", 1))
            limit = int(body["limit"])
            unit = float(body.get("unit_seconds", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPError(400, f"quota ask needs key, limit, tokens and unit_seconds: {exc}") from None
        if tokens < 1:
            raise HTTPError(400, f"tokens must be at least 1, got {tokens}")
        q = self.quotas.get(key)
        if q is None or q.limit != limit or q.unit != unit:
            try:
                q = self.quotas[key] = GlobalQuota(limit, unit)
            except RateLimitConfigError as exc:
                raise HTTPError(400, str(exc)) from None
        g = q.grant(proxy, tokens, now)
        return {"granted": g.granted, "valid_for": g.valid_for, "exhausted": g.exhausted}

    # ------------------------------------------------------------ HTTP

    async def handle(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if req.method == "GET" and path == "/metrics":
            return Response.text(self.agg.render(), content_type="text/plain; version=0.0.4")
        if req.method == "GET" and path == "/ready":
            return Response.text("ready\n")
        if path == "/dashboard" or path.startswith("/dashboard/"):  # its own token (dashboard.py)
            return await dashboard.handle(self, req, path)
        caller = authenticate(req, self.mesh_secret)
        try:
            return self._route(req, path, caller)
        except Forbidden as e:
            log.warning("refused %s %s to %s: %s", req.method, req.path, caller.describe(), e)
            raise HTTPError(403, f"{req.method} {req.path}: {e}") from None

    def _route(self, req: Request, path: str, caller: Caller) -> Response:
        if req.method == "GET" and path in ("/v1/top", "/v1/targets"):
            caller.require_mesh(f"reading {path}")
        if req.method == "GET" and path == "/v1/top":
            try:
                window = parse_window(req.query.get("window"))
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
            rows, covered = self.agg.top(window)
            return Response.json({
                "window": window, "covered": covered, "rounds": self.rounds,
                "rows": [r.as_dict() for r in rows],
                "targets": len(self.targets), "failing": dict(self.agg.failures),
            })
        if req.method == "GET" and path == "/v1/targets":
            return Response.json({"targets": self.targets, "failing": dict(self.agg.failures), "rounds": self.rounds})
        if req.method == "POST" and path == "/v1/quota":
            body = req.json()
            if not isinstance(body, dict):
                raise HTTPError(400, "quota ask must be a JSON object")
            return Response.json(self.grant(body, trio.current_time(), caller), compact=True)
        raise HTTPError(404, f"no route {req.method} {req.path}: try /metrics /v1/top /v1/targets /v1/quota")


async def run_mixer(mixer: Mixer, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as n:
        bound = await n.start(serve, mixer.handle, host, port)
        n.start_soon(mixer.scrape_loop)
        task_status.started(bound)
