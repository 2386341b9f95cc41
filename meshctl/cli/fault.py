"""`meshctl inject-fault`: delay or abort a service's requests through Pilot, for a while.

    meshctl inject-fault SERVICE (--delay 2s | --abort 503) [--percent 50]
                         [--match header:end-user=jason] [--subset v2] [--ttl 5m]
    meshctl inject-fault list
    meshctl inject-fault clear [SERVICE | ID]

The fault is stored in the state directory (pilot/faults.py) and layered by
Pilot over the service's routes; the user's VirtualService is not touched. Pilot
itself ends the fault when its TTL runs out, so no CLI has to stay running.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..model.proxyconfig import fqdn
from ..pilot.compile import Inputs
from ..pilot.query import mesh_hosts, mesh_routes
from ..pilot.faults import (
    FaultError,
    InjectedFault,
    active_faults,
    describe,
    describe_match,
    new_fault,
    subsets_routed,
)
from ..pilot.kvstore import open_fault_store, open_rule_store
from ..pilot.store import StoreError
from .common import StateDirOption, Table, console, control, err_console, fail, or_fail, state_dir

VERBS = ("list", "clear")


def register(root: typer.Typer) -> None:
    root.command(
        "inject-fault",
        help=(
            "Delay or abort a service's requests for a while, through Pilot, without editing your rules.\n\n"
            "  meshctl inject-fault SERVICE (--delay 2s | --abort 503) [--percent 50]\n"
            "                       [--match header:end-user=jason] [--subset v2] [--ttl 5m]\n\n"
            "  meshctl inject-fault list\n\n"
            "  meshctl inject-fault clear [SERVICE | ID]\n\n"
            "--match (repeatable, ANDed): header:NAME=VALUE, header:NAME^=PREFIX, header:NAME~=REGEX, "
            "uri:/PREFIX, uri:=/EXACT, method:GET."
        ),
        no_args_is_help=True,
    )(inject_fault)


def _complete_target(incomplete: str) -> list[str]:
    """list, clear and the services of the mesh found from here (shell completion)."""
    words = list(VERBS)
    try:
        from ..registry.embedded import load_snapshot
        from ..state import find_state_dir

        sd = find_state_dir()
        if sd is not None:
            words += sorted(load_snapshot(sd))
    except Exception:  # completion must never fail loudly
        pass
    return [w for w in words if w.startswith(incomplete)]


def _short(host: str) -> str:
    return host.split(".")[0] if host.endswith(".svc.cluster.local") else host


def _mesh_namespace(sd: Path) -> str:
    """settings.namespace of the state directory's mesh; ``default`` when none is found."""
    from ..loader.codec import LoadError
    from ..loader.gateways import find_mesh_file
    from ..model.proxyconfig import DEFAULT_NAMESPACE
    from ..supervisor.plan import load_mesh_lines

    path = find_mesh_file(sd)
    if path is None:
        return DEFAULT_NAMESPACE
    try:
        spec, _ = load_mesh_lines(path)
    except LoadError:
        return DEFAULT_NAMESPACE
    return spec.settings.namespace or DEFAULT_NAMESPACE


def _resolve_service(sd: Path, name: str) -> tuple[str, Inputs]:
    """The FQDN of ``name`` if the registry or the rules know it; else fail naming what is known."""
    try:
        resources = list(open_rule_store(sd).current().resources)
    except StoreError as e:
        fail(str(e))
    inp = Inputs(resources, control(sd).registry_snapshot())
    known = mesh_hosts(inp)
    # a short name: the service of the mesh's namespace (settings.namespace), as a short host is for
    # its callers (pilot/compile.py domains_for); another namespace's is named name.namespace
    host = name if name in known else fqdn(name, _mesh_namespace(sd))
    same = sorted(h for h in inp.services if "." not in name and h.endswith(".svc.cluster.local") and h.split(".")[0] == name)
    if host not in known and same:
        fail(f"unknown service {name!r}: no {name} in this mesh's namespace ({host}); a short name is of the mesh's "
             f"namespace, and {', '.join(same)} is another's: name it {' or '.join('.'.join(h.split('.')[:2]) for h in same)}")
    if host not in known:
        names = ", ".join(sorted(_short(h) for h in known)) or "none"
        fail(f"unknown service {name!r}: neither the registry nor the rules know it (known services: {names})")
    return host, inp


def _poke_pilot(sd: Path) -> str | None:
    return or_fail(control(sd).reload_faults)


def _wait_synced(sd: Path, timeout: float) -> None:
    """Wait until every proxy runs the config with the change; warn (not fail) if not:
    the fault is stored either way and proxies get it when they come back."""
    res = or_fail(control(sd).wait_synced, timeout, stop_on_nack=False)
    if res.synced:
        console.print(f"all {len(res.proxies)} proxies synced", style="dim")
        return
    behind = ", ".join(p["proxy"] for p in res.proxies if p.get("status") != "SYNCED")
    err_console.print(f"[yellow]warning:[/] not every proxy has the change after {timeout:g}s: {behind or 'Pilot did not answer'}")


def _until(f: InjectedFault, now: float) -> str:
    if f.expires is None:
        return "until cleared"
    left = max(0.0, f.expires - now)
    at = time.strftime("%H:%M:%S", time.localtime(f.expires))
    return f"until {at} ({left:.0f}s left)"


def inject_fault(
    target: Optional[str] = typer.Argument(None, metavar="SERVICE | list | clear", help="The service to fault, or list / clear.",
                                    autocompletion=_complete_target),
    what: Optional[str] = typer.Argument(None, metavar="[SERVICE | ID]", help="For clear: only this service's faults, or this fault."),
    delay: Optional[str] = typer.Option(None, "--delay", help="Delay requests by this long, e.g. 2s or 500ms."),
    abort: Optional[int] = typer.Option(None, "--abort", help="Answer requests with this HTTP status, e.g. 503."),
    percent: float = typer.Option(100.0, "--percent", help="Share of requests to fault, 0-100."),
    match: Optional[List[str]] = typer.Option(None, "--match", help="Only requests matching this (repeatable, ANDed)."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Only routes to this subset (from a DestinationRule)."),
    ttl: Optional[str] = typer.Option(None, "--ttl", help="Remove the fault after this long, e.g. 5m (default: until cleared)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the proxies run the change."),
    state: Optional[str] = StateDirOption,
) -> None:
    sd = state_dir(state)
    fault_opts = {"--delay": delay, "--abort": abort, "--match": match or None, "--subset": subset, "--ttl": ttl}
    if target in VERBS:
        given = [k for k, v in fault_opts.items() if v is not None] + (["--percent"] if percent != 100.0 else [])
        if given:
            fail(f"{', '.join(given)}: only for injecting a fault (meshctl inject-fault SERVICE ...), not with {target!r}", 2)
        if target == "list":
            if what is not None:
                fail(f"unexpected argument {what!r}: `meshctl inject-fault list` takes none", 2)
            _list(sd)
        else:
            _clear(sd, what, wait)
        return
    if target is None:
        fail("give a SERVICE to fault, or list / clear", 2)
    if what is not None:
        fail(f"unexpected argument {what!r}: one SERVICE per inject-fault", 2)
    _add(sd, target, delay, abort, percent, match or [], subset, ttl, wait)


def _add(sd: Path, service: str, delay, abort, percent, match, subset, ttl, wait: bool) -> None:
    host, inp = _resolve_service(sd, service)
    now = time.time()
    try:
        f = new_fault(id=secrets.token_hex(3), service=host, now=now, delay=delay, abort=abort, percent=percent,
                      match=match, subset=subset, ttl=ttl)
    except FaultError as e:
        fail(str(e))
    routes = mesh_routes(inp, host)
    if subset:
        dr = inp.destination_rules.get(host)
        defined = [s.name for s in dr.spec.subsets] if dr else []  # type: ignore[attr-defined]
        if subset not in defined:
            fail(f"subset {subset!r} of {_short(host)}: no DestinationRule defines it (defined: {', '.join(defined) or 'none'})")
        if subset not in subsets_routed(routes):
            err_console.print(f"[yellow]warning:[/] no route of {_short(host)} sends traffic to subset {subset!r} now: "
                              "the fault applies once one does", soft_wrap=True)
    try:
        open_fault_store(sd).add(f, now)
    except (FaultError, OSError) as e:
        fail(f"fault not stored: {e}")
    where = f" on routes to subset {subset}" if subset else ""
    console.print(
        f"fault {f.id} injected into {_short(host)}: {describe(f)} of {describe_match(f.match)}{where}, {_until(f, now)}",
        highlight=False, soft_wrap=True,
    )
    if routes:
        console.print(f"layered over the {len(routes)} route(s) of your VirtualService for {_short(host)}, which is unchanged",
                      style="dim", highlight=False, soft_wrap=True)
    url = _poke_pilot(sd)
    if url is None:
        console.print("(Pilot is not running: proxies get the fault when it starts)", style="dim")
    elif wait:
        _wait_synced(sd, 10.0)


def _list(sd: Path) -> None:
    now = time.time()
    try:
        faults = active_faults(open_fault_store(sd).load(), now)
    except FaultError as e:
        fail(str(e))
    if not faults:
        console.print("no injected faults")
        return
    t = Table("ID", "SERVICE", "FAULT", "MATCH", "SUBSET", "EXPIRES", box=None)
    for f in sorted(faults, key=lambda f: f.created):
        t.add_row(f.id, _short(f.service), describe(f), describe_match(f.match), f.subset or "-", _until(f, now))
    console.print(t)


def _clear(sd: Path, what: Optional[str], wait: bool) -> None:
    now = time.time()
    # a short name: the service of the mesh's namespace, as for `inject-fault` (not another namespace's)
    want = None if what is None else {what, fqdn(what, _mesh_namespace(sd))}
    try:
        removed = open_fault_store(sd).remove(lambda f: want is None or f.id in want or f.service in want, now)
    except (FaultError, OSError) as e:
        fail(str(e))
    if not removed:
        if what is None:
            console.print("no injected faults")
            return
        fail(f"no injected fault for {what!r} (see `meshctl inject-fault list`)")
    for f in removed:
        console.print(f"fault {f.id} on {_short(f.service)} cleared ({describe(f)} of {describe_match(f.match)})", highlight=False, soft_wrap=True)
    url = _poke_pilot(sd)
    if url is not None and wait:
        _wait_synced(sd, 10.0)
