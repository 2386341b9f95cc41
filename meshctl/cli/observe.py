"""Observability commands: `meshctl prometheus-config`, `meshctl dashboard`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from .common import StateDirOption, fail, state_dir


def register(root: typer.Typer) -> None:
    root.command("prometheus-config")(prometheus_config)
    root.command("dashboard")(dashboard)


def dashboard_context(sd: Path) -> Callable[[float], dict]:
    """For Mixer's dashboard: the rules applied and the injected faults in force at ``now``."""

    def context(now: float) -> dict:
        from ..pilot.faults import FaultError, active_faults, describe, describe_match
        from ..pilot.kvstore import open_fault_store, open_rule_store
        from ..pilot.store import StoreError

        # What this host's Pilot has in force (with Consul KV: its last copy; Consul is not asked here).
        try:
            rules = [{"kind": r.kind, "name": r.name, "namespace": r.namespace, "source": r.source or ""}
                     for r in open_rule_store(sd).last_known().resources]
        except (StoreError, OSError, ValueError):
            rules = []
        try:
            faults = active_faults(open_fault_store(sd).last_known(), now)
        except (FaultError, OSError, ValueError):
            faults = ()
        out = []
        for f in faults:
            svc = f.service
            if svc.endswith(".svc.cluster.local"):
                name, ns = svc.split(".")[:2]
                svc = name if ns == "default" else f"{name}.{ns}"
            out.append({"id": f.id, "service": svc, "fault": describe(f), "match": describe_match(f.match),
                        "subset": f.subset or "", "expires": f.expires,
                        "left": None if f.expires is None else max(0.0, f.expires - now)})
        return {"rules": rules, "faults": out, "tracing": tracing_links(sd)}

    return context


def tracing_links(sd: Path) -> dict:
    """Where the mesh's traces can be looked at, from the proxy settings Pilot keeps
    (pilot/nodes.json): Zipkin's UI when spans go to Zipkin, the OTLP endpoint otherwise."""
    import json

    from ..model.proxyconfig import _otlp_url, _zipkin_address

    try:
        nodes = json.loads((sd / "pilot" / "nodes.json").read_text())
    except (OSError, ValueError):
        return {}
    for nd in nodes.values():
        st = nd.get("settings") or {}
        zipkin = st.get("tracingZipkin") or st.get("tracing_zipkin") or ""
        otlp = st.get("tracingOtlp") or st.get("tracing_otlp") or ""
        addr = _zipkin_address(zipkin) if zipkin else None
        if addr is not None:
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            return {"zipkin_ui": f"http://{host}:{addr[1]}/zipkin/"}
        if otlp:
            return {"otlp": _otlp_url(otlp) or otlp}
    return {}


def dashboard(
    open_browser: bool = typer.Option(False, "--open", help="Open the page in a web browser too."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Print the URL of the live dashboard Mixer serves on loopback: service graph, golden
    signals, rules applied and faults in force."""
    from ..controlclient import ControlClient
    from ..credentials import mesh_credential
    from ..mixer.dashboard import token

    sd = state_dir(state)
    url = ControlClient(sd).url("mixer")
    if not url:
        fail("Mixer is not running (start the mesh with `meshctl up`)")
    page = f"{url.rstrip('/')}/dashboard/?token={token(mesh_credential(sd))}"
    sys.stdout.write(page + "\n")
    if open_browser:
        import webbrowser

        # The browser gets a file of the state directory (0600) that moves on to the page, not the
        # page itself: a browser's command line is readable by every local user (/proc/PID/cmdline).
        if not webbrowser.open(dashboard_opener(sd, page).as_uri()):
            fail("no web browser found: open the URL above yourself")


def dashboard_opener(sd: Path, page: str) -> Path:
    """``<state-dir>/dashboard.html``, readable by this user only, that sends a browser to ``page``."""
    import html
    import os

    path = (sd / "dashboard.html").resolve()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
                f'<meta http-equiv="refresh" content="0;url={html.escape(page)}"><title>meshctl dashboard</title></head>'
                f'<body><a href="{html.escape(page)}">Open the dashboard</a></body></html>\n')
    return path


def prometheus_config(
    interval: str = typer.Option("15s", "--interval", help="scrape_interval, e.g. 15s or 1s."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Print a Prometheus scrape configuration for every sidecar and gateway of the running mesh
    (`up` keeps it in <state dir>/prometheus.yml)."""
    from ..mixer.promconfig import from_state_dir

    if not re.fullmatch(r"\d+(ms|s|m|h)", interval):
        fail(f"--interval {interval!r}: a Prometheus duration like 15s, 500ms or 1m")
    sd = state_dir(state)
    if not (sd / "status.json").exists():
        fail(f"no mesh has run in {sd} (no status.json): start it with `meshctl up`")
    sys.stdout.write(from_state_dir(sd, interval))
