"""`meshctl pilot`: serve, proxy-status, proxy-config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import trio
import typer

from ..loader.codec import from_data, to_data
from ..loader.proxyconfig import dump_proxy_config
from ..model.proxyconfig import ProxyConfig
from ..state import write_control
from .common import StateDirOption, Table, console, control, fail, or_fail, serve_forever, state_dir

app = typer.Typer(help="Pilot: rules + registry → config pushed to every proxy.", no_args_is_help=True)

SECTIONS = ("listeners", "routes", "clusters", "endpoints")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="pilot")


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(15010, help="Port (0 picks a free one)."),
    registry: str = typer.Option("embedded", envvar="MESHCTL_REGISTRY", help="embedded, consul://HOST:PORT or eureka://HOST:PORT/eureka"),
    trust_domain: str = typer.Option("cluster.local", help="SPIFFE trust domain."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Run Pilot in the foreground."""
    from ..pilot.server import Pilot, run_pilot
    from ..registry import open_registry
    from ..registry.base import RegistryError

    sd = Path(state) if state else state_dir(None) if _has_state(None) else Path(".meshctl")
    sd.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pilot %(levelname)s %(message)s")

    async def main() -> None:
        try:
            reg = open_registry(registry, sd)
        except RegistryError as e:
            fail(str(e))
        pilot = Pilot(sd, reg, trust_domain=trust_domain)
        async with trio.open_nursery() as n:
            bound = await n.start(run_pilot, pilot, host, port)
            url = f"http://{host}:{bound}"
            write_control(sd, pilot=url)
            logging.info("serving on %s (state %s, registry %s)", url, sd, registry)

    serve_forever(main, host, port)


def _has_state(explicit: Optional[str]) -> bool:
    from ..state import find_state_dir

    return find_state_dir(explicit) is not None


@app.command("proxy-status")
def proxy_status(
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
    state: Optional[str] = StateDirOption,
) -> None:
    """Which proxy runs which config version: SYNCED, STALE, or NACKED and why."""
    st = or_fail(control(state_dir(state)).status)
    if output == "json":
        print(json.dumps(st, indent=1))
        return
    t = Table("PROXY", "SERVICE", "STATUS", "VERSION", "ACKED", "ERROR", box=None)
    for p in st["proxies"]:
        colour = {"SYNCED": "green", "STALE": "yellow", "NACKED": "red"}[p["status"]]
        t.add_row(p["proxy"], p["service"], f"[{colour}]{p['status']}[/]", p["current"], p["acked"] or "-", p["error"])
    console.print(t)
    console.print(f"rules revision {st['revision']}", style="dim")


@app.command("proxy-config")
def proxy_config(
    proxy: str = typer.Argument(..., help="Proxy (workload instance) name, e.g. reviews-v2-0"),
    section: Optional[str] = typer.Argument(None, help="listeners, routes, clusters or endpoints"),
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
    state: Optional[str] = StateDirOption,
) -> None:
    """The config Pilot computes for one proxy (the version it pushes)."""
    if section and section not in SECTIONS:
        fail(f"unknown section {section!r}: one of {', '.join(SECTIONS)}", 2)
    data = or_fail(control(state_dir(state)).proxy_config, proxy)
    if data is None:
        fail(f"Pilot knows no proxy named {proxy!r}: see `meshctl pilot proxy-status`")
    if output == "json":
        key = {"listeners": "listeners", "routes": "routeTables", "clusters": "clusters", "endpoints": "clusters"}.get(section or "", None)
        print(json.dumps(data.get(key, []) if key else data, indent=1))
        return
    cfg = from_data(ProxyConfig, data)
    render_config(cfg, section, live_endpoints(state_dir(state), proxy) if section == "endpoints" else None)


def live_endpoints(sd: Path, proxy: str) -> dict | None:
    """The proxy's own view of its endpoints (outlier ejections), from its admin
    port as `up` recorded it; None when the proxy cannot be asked."""
    from ..supervisor.run import http_get_json

    try:
        st = json.loads((sd / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    admin = next((w["admin_address"] for w in st.get("workloads", []) if w["name"] == proxy), None)
    if admin is None:
        return None
    return http_get_json(admin, "/clusters")


def short_cluster(name: str) -> str:
    """``outbound|9080|v1|reviews.default.svc.cluster.local`` → ``reviews:9080/v1``, for tables."""
    parts = name.split("|")
    if len(parts) != 4:
        return name
    _, port, subset, host = parts
    host = host.removesuffix(".default.svc.cluster.local").removesuffix(".svc.cluster.local")
    return f"{host}:{port}" + (f"/{subset}" if subset else "")


def render_config(cfg: ProxyConfig, section: Optional[str], live: dict | None = None) -> None:
    console.print(f"proxy {cfg.workload.name} ({cfg.workload.spiffe_id}) version {cfg.version}", highlight=False)
    if section in (None, "listeners"):
        t = Table("LISTENER", "DIRECTION", "ADDRESS", "PROTOCOL", "ROUTES / TARGET", box=None, title="listeners")
        for l in cfg.listeners:
            target = l.route_table or (f"{l.app_address}:{l.app_port}" if l.app_port else l.service or "")
            t.add_row(l.name, l.direction, f"{l.address}:{l.port}", l.protocol, target)
        console.print(t)
    if section in (None, "routes"):
        t = Table("TABLE", "VIRTUAL HOST", "ROUTE", "MATCH", "DESTINATIONS", box=None, title="routes")
        for table in cfg.route_tables.values():
            for vh in table.virtual_hosts:
                for i, r in enumerate(vh.routes):
                    match = "; ".join(json.dumps(to_data(m), separators=(",", ":")) for m in r.match) or "*"
                    dests = ", ".join(
                        f"{d.destination.host.split('.')[0]}{'/' + d.destination.subset if d.destination.subset else ''}"
                        f"{' ' + str(d.weight) + '%' if d.weight is not None else ''}"
                        for d in r.route
                    ) or ("redirect" if r.redirect else "direct response" if r.direct_response else "-")
                    t.add_row(table.name, vh.name, r.name or str(i), match, dests)
        console.print(t)
    if section in (None, "clusters"):
        t = Table("CLUSTER", "SUBSET", "ENDPOINTS", "POLICY", box=None, title="clusters")
        for c in cfg.clusters.values():
            pol = json.dumps(to_data(c.traffic_policy), separators=(",", ":")) if c.traffic_policy else ""
            t.add_row(short_cluster(c.name), c.subset or "", str(len(c.endpoints)), pol)
        console.print(t)
    if section == "endpoints":
        t = Table("CLUSTER", "ENDPOINT", "INSTANCE", "HEALTH", "OUTLIER", "LABELS", box=None, title="endpoints")
        for c in cfg.clusters.values():
            seen = {e["address"]: e for e in (live or {}).get(c.name, [])}
            for ep in c.endpoints:
                e = seen.get(f"{ep.address}:{ep.port}")
                if e is None:
                    outlier = "?" if live is None else "-"
                elif e["ejected"]:
                    outlier = f"[red]EJECTED[/] {e['ejected_for']}s left (x{e['times_ejected']})"
                else:
                    outlier = f"ok ({e['ejections_total']} ejections)" if e["ejections_total"] else "ok"
                t.add_row(short_cluster(c.name), f"{ep.address}:{ep.port}", ep.instance, ep.health, outlier,
                          ",".join(f"{k}={v}" for k, v in ep.labels.items()))
        console.print(t)
        if live is None:
            console.print("(the proxy's own view, with outlier ejections, needs a mesh started by `meshctl up`)", style="dim")


def offline_config(sd: Path, source: Optional[str]) -> ProxyConfig:
    """The config a proxy of ``source`` would run, compiled without Pilot (controlclient)."""
    return control(sd).offline_config(source)


__all__ = ["app", "register", "offline_config", "dump_proxy_config"]
