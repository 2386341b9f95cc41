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
from .common import StateDirOption, Table, console, control, err_console, fail, or_fail, serve_forever, state_dir

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
    mesh_id: Optional[str] = typer.Option(None, help="With a Consul registry, the rules live in Consul KV under "
                                          "meshctl/<mesh-id>/ (default: the trust domain)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Run Pilot in the foreground."""
    import os

    from ..pilot.kvstore import read_location, record_location
    from ..pilot.server import Pilot, run_pilot
    from ..pilot.store import StoreError
    from ..registry import open_registry
    from ..registry.base import RegistryError

    sd = Path(state) if state else state_dir(None) if _has_state(None) else Path(".meshctl")
    sd.mkdir(parents=True, exist_ok=True)
    try:  # where the rules live: Consul KV with a Consul registry (`up` may have recorded it, with a token)
        loc = read_location(sd)
        mid = mesh_id or trust_domain
        if not (loc.get("kind") == "consul" and loc.get("registry") == registry.strip() and loc.get("meshId") == mid):
            record_location(sd, registry, mid, token=os.environ.get("CONSUL_HTTP_TOKEN"))
    except (StoreError, RegistryError) as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pilot %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per registry poll (Eureka: every 5 s)

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
            logging.info("serving on %s (state %s, registry %s; rules: %s)", url, sd, registry, pilot.store.location)
            n.start_soon(_cancel_on_sigterm, n.cancel_scope)

    serve_forever(main, host, port)


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    """SIGTERM (`meshctl down`) ends Pilot through cancellation, so it takes its proxies out of
    the other hosts' proxy-status on the way out."""
    import signal

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            logging.info("SIGTERM: stopping")
            scope.cancel()
            return


def _has_state(explicit: Optional[str]) -> bool:
    from ..state import find_state_dir

    return find_state_dir(explicit) is not None


@app.command("proxy-status")
def proxy_status(
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
    state: Optional[str] = StateDirOption,
) -> None:
    """Which proxy runs which config version: SYNCED, STALE, or NACKED and why.

    With the rules in Consul KV, the proxies of every host of the mesh: each host's Pilot
    publishes its proxies and the rules revision each one ACKed."""
    from ..controlclient import ControlPlaneError
    from ..pilot.kvstore import open_rule_store
    from ..pilot.store import StoreError

    sd = state_dir(state)
    local: dict | None = None
    local_error = ""
    try:
        local = control(sd).status()
    except ControlPlaneError as e:
        local_error = str(e)
    try:
        store = open_rule_store(sd)
        reports = store.peer_reports()
        own = store.host_key()
    except StoreError as e:
        if local is None:
            fail(f"{local_error}; and the other hosts' proxies cannot be read: {e}")
        err_console.print(f"[yellow]warning:[/] only this host's proxies: {e}", soft_wrap=True, highlight=False)
        reports, own = [], ""
    if local is None and not reports:
        fail(local_error)
    hosts: list[dict] = []
    if local is not None:
        hosts.append({"host": local.get("host", ""), "revision": local["revision"], "proxies": local["proxies"],
                      "this_host": True, "stale": False})
    hosts += [dict(r, this_host=False) for r in reports if r.get("key") != own or local is None]
    if output == "json":
        if len(hosts) == 1 and local is not None:
            print(json.dumps(local, indent=1))  # one host: Pilot's own answer, as before
        else:
            print(json.dumps({"revision": local["revision"] if local else None, "proxies": local["proxies"] if local else [],
                              "hosts": hosts}, indent=1))
        return
    many = len(hosts) > 1 or local is None
    cols = (("HOST",) if many else ()) + ("PROXY", "SERVICE", "STATUS", "VERSION", "ACKED", "REVISION", "ERROR")
    t = Table(*cols, box=None)
    for h in hosts:
        host = h.get("host") or "?"
        if h.get("stale"):
            host += " (not reporting)"
        for p in h["proxies"]:
            colour = {"SYNCED": "green", "STALE": "yellow", "NACKED": "red"}.get(p["status"], "white")
            rev = p.get("acked_revision")
            row = (p["proxy"], p["service"], f"[{colour}]{p['status']}[/]", p["current"], p["acked"] or "-",
                   "-" if rev is None else str(rev), p.get("error") or "")
            t.add_row(*(((host,) if many else ()) + row))
    console.print(t)
    if local is None:
        err_console.print(f"[yellow]this host's Pilot does not answer:[/] {local_error}", soft_wrap=True, highlight=False)
    revs = sorted({h["revision"] for h in hosts})
    console.print(f"rules revision {local['revision'] if local else revs[-1]}"
                  + (f" (hosts at revisions {', '.join(map(str, revs))})" if len(revs) > 1 else ""), style="dim")


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
