"""`meshctl route`: apply, get, delete, history, rollback, validate, explain."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from ..loader.resources import LoadErrors, dump_resources, load_resources
from ..loader.validate import validate
from ..model.istio import SPEC_TYPES, Resource
from ..pilot.kvstore import open_rule_store
from ..pilot.store import StoreError
from .common import StateDirOption, Table, console, control, err_console, fail, or_fail, state_dir

app = typer.Typer(help="Istio rules: VirtualService, DestinationRule, ServiceEntry, Gateway, ...", no_args_is_help=True)

FileOption = typer.Option(..., "-f", "--filename", help="A YAML/JSON file or a directory of them; repeatable.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="route")


def _load(files: List[Path]) -> list[Resource]:
    try:
        return load_resources(files)
    except LoadErrors as e:
        fail(f"{len(e.errors)} error(s) in the rule files:\n{e}")
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")


def _report(findings) -> int:
    errors = 0
    for f in findings:
        if f.level == "error":
            errors += 1
            err_console.print(f"[bold red]error:[/] [red]{escape(f'{f.source}: {f.field}: {f.message}')}[/]", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"[yellow]warning:[/] {escape(f'{f.source}: {f.field}: {f.message}')}", highlight=False, soft_wrap=True)
    return errors


def _mesh_gateways(mesh: Optional[Path], sd: Optional[Path]):
    """mesh.yaml's gateways for the Gateway port check: --mesh, else the state directory's mesh."""
    from ..loader.codec import LoadError
    from ..loader.gateways import MeshGateways, find_mesh_file
    from ..supervisor.plan import load_mesh_lines

    path = mesh or find_mesh_file(sd)
    if path is None:
        return None
    try:
        spec, lines = load_mesh_lines(path)
    except LoadError as e:
        fail(f"cannot check Gateways against {path}:\n{e}")
    return MeshGateways.from_spec(str(path), spec, lines)


def _gateway_findings(resources, mesh: Optional[Path], sd: Optional[Path], context=()) -> list:
    from ..loader.gateways import gateway_port_findings

    from ..loader.gateways import credential_findings

    gws = _mesh_gateways(mesh, sd)
    found = gateway_port_findings(resources, gws, context) if gws is not None else []
    return found + (credential_findings(resources, sd) if sd is not None else [])


def _tracing_findings(resources, mesh: Optional[Path], sd: Optional[Path], *, running: bool) -> list:
    """Telemetry tracing fields that would do nothing: the mesh names no tracing backend. Checked
    against --mesh, else (``running``: route apply) the settings Pilot hands its proxies, else the
    state directory's mesh.yaml; nothing to check against (offline, no mesh.yaml): no finding."""
    from ..loader.codec import LoadError
    from ..loader.gateways import find_mesh_file
    from ..loader.tracing_backend import tracing_backend_findings, wants_tracing
    from ..supervisor.plan import load_mesh_lines

    if not wants_tracing(resources):
        return []
    if mesh is None and running and sd is not None:
        live = control(sd).mesh_tracing()
        if live is not None:
            return tracing_backend_findings(resources, live, "the running mesh")
    path = mesh or find_mesh_file(sd)
    if path is None:
        return []
    try:
        spec, _ = load_mesh_lines(path)
    except LoadError:
        return []  # the Gateway check says what is wrong with it
    return tracing_backend_findings(resources, bool(spec.settings.tracing.zipkin or spec.settings.tracing.otlp),
                                    f"the mesh of {path}")


def _host_findings(resources, sd: Optional[Path], context=()) -> list:
    """VirtualService/DestinationRule hosts that name no service of the mesh's registry (a rule
    for another namespace than the mesh's settings.namespace, say): warnings, Istio accepts them."""
    from ..pilot.query import unknown_service_findings

    if sd is None:
        return []
    return unknown_service_findings(resources, context, control(sd).registry_snapshot())


LIVE_TIMEOUT = 1.0  # seconds `route validate` gives Consul KV and Pilot to answer


def _live_findings(resources, sd: Optional[Path], applied: tuple) -> tuple[list, list[str]]:
    """`route validate`'s check against the running mesh: VirtualService/DestinationRule hosts
    against the services of its registry (Pilot's view, asked once with LIVE_TIMEOUT, never
    retried; the embedded registry's saved snapshot when Pilot is away). (findings, what was
    not checked and why)."""
    from ..controlclient import ControlPlaneError
    from ..pilot.kvstore import read_location
    from ..pilot.query import port_level_mtls_findings, unknown_service_findings
    from ..registry.embedded import load_snapshot

    if sd is None:
        return [], ["hosts against the registry's services: no mesh here (no state directory)"]
    try:
        snapshot = control(sd).pilot_registry(LIVE_TIMEOUT)
    except ControlPlaneError as e:
        try:
            kind = read_location(sd).get("kind")
        except StoreError:
            kind = "files"
        registry = _registry_url(sd)
        if kind == "consul" or registry.startswith(("consul:", "eureka:")):
            return [], [f"hosts against the services of the registry {registry or 'Consul'}: {e}"]
        snapshot = dict(load_snapshot(sd))  # the embedded registry: its saved snapshot is on disk
    return unknown_service_findings(resources, applied, snapshot) + port_level_mtls_findings(resources, snapshot), []


def _registry_url(sd: Path) -> str:
    """The registry the mesh in ``sd`` ran with, as `up` recorded it ("" when unknown: embedded)."""
    import json

    try:
        return str(json.loads((sd / "status.json").read_text())["registry"]["url"] or "")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _port_findings(resources, sd: Optional[Path]) -> list:
    """PeerAuthentication portLevelMtls ports that no selected workload serves (pilot/query.py)."""
    from ..model.istio import PeerAuthentication
    from ..pilot.query import port_level_mtls_findings

    if sd is None or not any(isinstance(r.spec, PeerAuthentication) and r.spec.port_level_mtls for r in resources):
        return []
    return port_level_mtls_findings(resources, control(sd).registry_snapshot())


MeshOption = typer.Option(None, "--mesh", help="mesh.yaml whose gateways serve the Gateway ports (default: the state directory's).")


def _store(sd: Path):
    """The rule store of this mesh: Consul KV with a Consul registry, else the state directory's files."""
    try:
        return open_rule_store(sd)
    except StoreError as e:
        fail(str(e))


def _do(fn, *args):
    """A store operation; its StoreError (Consul away, a lost race, a bad revision) is the command's error."""
    try:
        return fn(*args)
    except StoreError as e:
        fail(str(e))


def _poke_pilot(sd: Path) -> str | None:
    """Tell a running Pilot to re-read the store; it would notice within a second anyway."""
    return or_fail(control(sd).reload_rules)


def _wait_synced(sd: Path, timeout: float) -> None:
    res = or_fail(control(sd).wait_synced, timeout)
    if res.synced:
        console.print(f"all {len(res.proxies)} proxies synced")
    elif res.nacked:
        fail("; ".join(f"{p['proxy']} rejected the config: {p['error']}" for p in res.nacked))
    else:
        fail(f"proxies not synced after {timeout}s: {res.behind() or 'Pilot did not answer'}; "
             "see `meshctl pilot proxy-status`")


@app.command("apply")
def apply(
    files: List[Path] = FileOption,
    wait: bool = typer.Option(False, "--wait", help="Wait until every proxy has ACKed the new config."),
    mesh: Optional[Path] = MeshOption,
    state: Optional[str] = StateDirOption,
) -> None:
    """Create or replace rules, like `kubectl apply`; running proxies get them at once."""
    resources = _load(files)
    sd = state_dir(state)
    store = _store(sd)
    current = _do(store.current)
    findings = validate(resources, context=current.resources) + _gateway_findings(resources, mesh, sd, current.resources)
    findings += _tracing_findings(resources, mesh, sd, running=True) + _host_findings(resources, sd, current.resources)
    findings += _port_findings(resources, sd)
    if _report(findings):
        fail("nothing applied: fix the errors above (`meshctl route validate` checks files offline)")
    before = current.number
    rev, changes = _do(store.apply, resources)
    for c in changes:
        console.print(str(c), highlight=False)
    url = _poke_pilot(sd)
    if rev.number != before:
        console.print(f"revision {rev.number}" + ("" if url else " (Pilot is not running: proxies get it when it starts)"))
    if wait and url:
        _wait_synced(sd, 10.0)
    if wait:
        _wait_other_hosts(store, rev.number, 15.0)
    _say_injected_faults(sd, resources)


def _wait_other_hosts(store, revision: int, timeout: float) -> None:
    """With the rules in Consul KV: wait until the proxies of every host (as each host's Pilot
    reports them) ACKed ``revision``. Hosts whose Pilot stopped reporting are named, not waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reports = store.peer_reports()
        except StoreError as e:
            err_console.print(f"[yellow]warning:[/] cannot tell whether the other hosts have it: {e}", soft_wrap=True)
            return
        live = [r for r in reports if not r.get("stale")]
        behind = [f"{r.get('host')}/{p['proxy']}" for r in live for p in r.get("proxies", ())
                  if p.get("status") != "SYNCED" or p.get("acked_revision") != revision]
        behind += [f"{r.get('host')} (Pilot at revision {r.get('revision')})" for r in live
                   if r.get("revision") != revision and not r.get("proxies")]
        if not behind:
            if reports:
                hosts = sorted({str(r.get("host")) for r in live})
                console.print(f"all proxies of {len(hosts)} host(s) ({', '.join(hosts)}) at revision {revision}")
                for r in reports:
                    if r.get("stale"):
                        err_console.print(f"[yellow]warning:[/] host {r.get('host')} has not reported for a while "
                                          "(down or cut off): it gets the rules when it is back", soft_wrap=True)
            return
        if time.monotonic() > deadline:
            fail(f"not every host's proxies at revision {revision} after {timeout:g}s: {', '.join(behind[:10])}; "
                 "see `meshctl pilot proxy-status`")
        time.sleep(0.2)


def _say_injected_faults(sd: Path, resources: list[Resource]) -> None:
    """An injected fault (`meshctl inject-fault`) is layered over the user's routes: say so
    when it covers a VirtualService just applied, or its effect would hide this one's."""
    from ..model.istio import VirtualService
    from ..model.proxyconfig import fqdn
    from ..pilot.faults import describe, describe_match

    hosts = {fqdn(h, r.namespace): h for r in resources if isinstance(r.spec, VirtualService) for h in r.spec.hosts}
    for f in control(sd).injected_faults():
        if f.service in hosts:
            left = "" if f.expires is None else f" for {max(0.0, f.expires - time.time()):.0f}s more"
            match = f" ({describe_match(f.match)})" if f.match else ""
            err_console.print(
                f"[yellow]note:[/] injected fault {f.id} ({describe(f)}{match}) overrides the routes of "
                f"{hosts[f.service]} just applied{left}: `meshctl inject-fault clear {hosts[f.service]}` ends it",
                highlight=False, soft_wrap=True)


@app.command("validate")
def validate_cmd(files: List[Path] = FileOption, mesh: Optional[Path] = MeshOption,
                 online: bool = typer.Option(False, "--online", help="Also check against the running mesh (its registry's "
                                             "services, the applied rules), and fail at once if it does not answer."),
                 state: Optional[str] = StateDirOption) -> None:
    """Check rule files, like `istioctl analyze`, with the rules the mesh has applied; exit 1 on
    errors. Offline: the files and the applied rules this host last knew; hosts are checked
    against the running mesh's services when Pilot answers within a second, and the output
    says what was not checked otherwise. --online asks Consul KV for the rules in force and
    requires every check, failing at once with the cause."""
    from ..state import find_state_dir

    resources = _load(files)
    sd = find_state_dir(state)
    # With a mesh at hand, the rules applied to it count as `route apply` counts them
    # (a subset its DestinationRule lacks is an error at both), read from the state
    # directory: offline, Pilot and Consul are not asked.
    applied = _applied_rules(sd)
    skipped: list[str] = []
    if online:
        applied, skipped = _current_rules(sd, applied)
    live, why = _live_findings(resources, sd, applied)
    skipped += why
    if online and skipped:
        fail("cannot validate online: " + "; ".join(skipped))
    errors = _report(validate(resources, context=applied) + _gateway_findings(resources, mesh, sd, applied)
                     + _tracing_findings(resources, mesh, sd, running=False) + live)
    if errors:
        raise typer.Exit(1)
    console.print(f"{len(resources)} resource(s) valid"
                  + (f" with the {len(applied)} rule(s) applied to the mesh in {sd}" if applied else "")
                  + (" (validated offline)" if skipped else ""))
    for why_not in skipped:
        console.print(f"[yellow]not checked:[/] {escape(why_not)}", highlight=False, soft_wrap=True)


def _applied_rules(sd: Optional[Path]) -> tuple:
    """The rules in force in the mesh of ``sd`` as this host last knew them; () without one."""
    if sd is None:
        return ()
    try:
        return tuple(open_rule_store(sd).last_known().resources)
    except (StoreError, OSError, ValueError):
        return ()


def _current_rules(sd: Optional[Path], applied: tuple) -> tuple[tuple, list[str]]:
    """`route validate --online`: the rules in force now (Consul KV asked once, LIVE_TIMEOUT),
    else ``applied`` and why they may be stale."""
    if sd is None:
        return applied, []
    try:
        return tuple(open_rule_store(sd, request_timeout=LIVE_TIMEOUT).current().resources), []
    except (StoreError, OSError, ValueError) as e:
        return applied, [f"the rules in force (this host's last known copy may be stale): {e}"]


def _kind(kind: str) -> str:
    kinds = {k.lower(): k for (_, k) in SPEC_TYPES}
    aliases = {"vs": "virtualservice", "dr": "destinationrule", "se": "serviceentry", "gw": "gateway"}
    k = aliases.get(kind.lower(), kind.lower()).rstrip("s") if kind.lower() not in kinds else kind.lower()
    if k not in kinds:
        fail(f"unknown kind {kind!r}: one of {', '.join(sorted(kinds.values()))}")
    return kinds[k]


@app.command("get")
def get(
    kind: Optional[str] = typer.Argument(None),
    name: Optional[str] = typer.Argument(None),
    namespace: str = typer.Option("default", "-n", "--namespace"),
    output: str = typer.Option("table", "-o", "--output", help="table, yaml or json"),
    state: Optional[str] = StateDirOption,
) -> None:
    """List applied rules, or print them as YAML/JSON."""
    sd = state_dir(state)
    rev = _do(_store(sd).current)
    items = list(rev.resources)
    if kind:
        k = _kind(kind)
        items = [r for r in items if r.kind == k]
    if name:
        items = [r for r in items if r.name == name and r.namespace == namespace]
        if not items:
            fail(f"{kind} {namespace}/{name} not found")
    if output in ("yaml", "json"):
        print(dump_resources(items, "yaml" if output == "yaml" else "json"), end="")
        return
    if output != "table":
        fail(f"unknown output format {output!r}: table, yaml or json", 2)
    t = Table("KIND", "NAMESPACE", "NAME", "HOSTS", box=None)
    for r in items:
        hosts = getattr(r.spec, "hosts", None) or ([r.spec.host] if hasattr(r.spec, "host") else [])
        t.add_row(r.kind, r.namespace, r.name, ",".join(hosts))
    console.print(t)
    console.print(f"revision {rev.number}", style="dim")


@app.command("delete")
def delete(
    kind: Optional[str] = typer.Argument(None),
    name: Optional[str] = typer.Argument(None),
    files: Optional[List[Path]] = typer.Option(None, "-f", "--filename"),
    namespace: str = typer.Option("default", "-n", "--namespace"),
    state: Optional[str] = StateDirOption,
) -> None:
    """Delete rules by KIND NAME, or every rule named in -f files."""
    if files:
        keys = [r.key for r in _load(files)]
    elif kind and name:
        keys = [(_kind(kind), namespace, name)]
    else:
        fail("give KIND NAME, or -f FILE", 2)
    sd = state_dir(state)
    rev, changes = _do(_store(sd).delete, keys)
    missing = [c for c in changes if c.action == "not found"]
    for c in changes:
        console.print(str(c), highlight=False)
    _poke_pilot(sd)
    if missing and len(missing) == len(changes):
        raise typer.Exit(1)


@app.command("history")
def history(state: Optional[str] = StateDirOption) -> None:
    """Every revision of the rules, newest last."""
    store = _store(state_dir(state))
    cur = _do(store.current_number)
    t = Table("REVISION", "TIME", "RESOURCES", "CHANGE", box=None)
    for rev in _do(store.history):
        mark = " *" if rev.number == cur else ""
        t.add_row(f"{rev.number}{mark}", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rev.time)), str(len(rev.resources)), rev.change)
    console.print(t)


@app.command("rollback")
def rollback(
    revision: Optional[int] = typer.Argument(None, help="Revision to restore (default: the one before the current)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Restore an earlier revision of the rules (recorded as a new revision)."""
    sd = state_dir(state)
    rev = _do(_store(sd).rollback, revision)
    _poke_pilot(sd)
    console.print(f"revision {rev.number}: {rev.change}")


@app.command("explain")
def explain(
    method: str = typer.Argument(..., help="HTTP method, e.g. GET"),
    url: str = typer.Argument(..., help="e.g. http://reviews:9080/reviews/0"),
    header: Optional[List[str]] = typer.Option(None, "-H", "--header", help="'name: value' (repeatable)"),
    source: Optional[str] = typer.Option(None, "--from", help="The calling service (its labels match sourceLabels)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Which rule, route, subset and endpoints a request gets, and why: offline, by the proxies' own code."""
    from ..core.route import Forward, RequestView
    from ..core.routebuild import build_router
    from ..core.routeexplain import explain as explain_route
    sd = state_dir(state)
    parts = urlsplit(url)
    if not parts.hostname:
        fail(f"{url!r}: give an absolute URL like http://reviews:9080/path", 2)
    headers = []
    for h in header or []:
        if ":" not in h:
            fail(f"bad header {h!r}: use 'name: value'", 2)
        k, v = h.split(":", 1)
        headers.append((k.strip().lower(), v.strip()))
    cfg = control(sd).offline_config(source)
    if source and cfg.workload.name == f"{source}-explain":  # no proxy of that service has registered
        err_console.print(f"warning: no proxy of service {source!r} runs in this mesh: explaining for a caller "
                          f"labelled app={source} (check the name: `meshctl status`)", highlight=False)
    table = cfg.route_tables.get("outbound")
    if table is None:
        fail("no outbound routes compiled")
    authority = parts.netloc
    req = RequestView(
        method=method.upper(),
        scheme=parts.scheme or "http",
        authority=authority,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        headers=headers,
        port=parts.port or 80,
        source_labels=cfg.workload.labels,
        source_namespace=cfg.workload.namespace,
    )
    router = build_router(table, cfg.settings)
    for line in explain_route(router, req):
        console.print(line, highlight=False)
    decision = router.decide(req, random.Random())
    if isinstance(decision, Forward):
        cluster = cfg.clusters.get(decision.cluster)
        eps = cluster.endpoints if cluster else ()
        console.print(f"cluster: {decision.cluster}", highlight=False)
        if not eps:
            console.print("  no endpoints: the request would get 503 (no healthy upstream)", highlight=False)
        for ep in eps:
            where = f" locality {ep.locality}" if ep.locality else ""
            console.print(f"  endpoint {ep.address}:{ep.port} {ep.instance} {ep.health}{where} {dict(ep.labels)}", highlight=False)
        if cluster is not None and cluster.traffic_policy is not None:
            from ..core.locality import explain as explain_locality, plan_locality

            from .pilot import live_endpoints

            tp = cluster.traffic_policy
            lb = tp.load_balancer
            healthy = [e for e in eps if e.health == "HEALTHY"]
            plan = plan_locality(lb.locality_lb_setting if lb else None, tp.outlier_detection is not None,
                                 cfg.workload.locality, cfg.workload.labels, healthy)
            eligible = healthy
            if plan.active and source:  # the calling proxy's own outlier ejections, when it runs
                live = (live_endpoints(sd, cfg.workload.name) or {}).get(cluster.name)
                if live is not None:
                    ejected = {e["address"] for e in live if e.get("ejected")}
                    eligible = [e for e in healthy if f"{e.address}:{e.port}" not in ejected]
            for line in explain_locality(plan, eligible):
                console.print(line, highlight=False)
