"""`meshctl mixer serve`, `meshctl top` (live) and `meshctl stat` (once)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..state import write_control
from .common import StateDirOption, console, control, fail, or_fail, serve_forever, state_dir

app = typer.Typer(help="Mixer: mesh-wide telemetry and global rate-limit quotas.", no_args_is_help=True)

SORTS = ("rps", "p99", "errors", "name")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="mixer")
    root.command("top")(top)
    root.command("stat")(stat)


# ------------------------------------------------------------------ serve


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(15004, help="Port (0 picks a free one)."),
    target: List[str] = typer.Option([], "--target", help="Also scrape this sidecar admin address (HOST:PORT); repeatable."),
    interval: float = typer.Option(1.0, help="Seconds between scrapes."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Run Mixer in the foreground: scrape every sidecar, serve /metrics, /v1/top and /v1/quota."""
    import trio

    from ..mixer.server import Mixer, run_mixer

    sd = Path(state) if state else Path(os.environ.get("MESHCTL_STATE_DIR") or ".meshctl")
    if interval <= 0:
        fail(f"--interval must be positive, got {interval}", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mixer %(levelname)s %(message)s")
    sd.mkdir(parents=True, exist_ok=True)  # holds the mesh credential Mixer checks callers with
    mixer = Mixer(sd, {t: t for t in target}, interval=interval)
    from .observe import dashboard_context

    mixer.dashboard_context = dashboard_context(sd)  # rules and faults on the dashboard

    async def main() -> None:
        async with trio.open_nursery() as n:
            bound = await n.start(run_mixer, mixer, host, port)
            url = f"http://{host}:{bound}"
            write_control(sd, mixer=url)
            logging.info("serving on %s (state %s)", url, sd)

    serve_forever(main, host, port)


# ------------------------------------------------------------------ rendering


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.1f}ms"
    if v < 1000:
        return f"{v:.0f}ms"
    return f"{v / 1000:.1f}s"


def _pct(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 0.9995:
        return "100%"
    return f"{v * 100:.1f}%"


def _short(service: str) -> str:
    from ..mixer.aggregate import short_name

    return short_name(service)


def sort_rows(rows: list[dict], sort: str) -> list[dict]:
    if sort == "rps":
        return sorted(rows, key=lambda r: (-r["rps"], _short(r["service"]), r["version"]))
    if sort == "p99":
        return sorted(rows, key=lambda r: (r["p99"] is None, -(r["p99"] or 0), _short(r["service"]), r["version"]))
    if sort == "errors":
        return sorted(rows, key=lambda r: (-(1 - r["success_rate"]) if r["success_rate"] is not None else 1,
                                           -r["errors"], _short(r["service"]), r["version"]))
    return sorted(rows, key=lambda r: (_short(r["service"]), r["version"]))


def filter_rows(rows: list[dict], service: Optional[str]) -> list[dict]:
    if not service:
        return rows
    return [r for r in rows if r["service"] == service or _short(r["service"]) == service
            or r["service"].split(".", 1)[0] == service]


def render_top(data: dict, *, sort: str = "rps", service: Optional[str] = None, title: str = "", width: int = 80):
    """A rich renderable for `top`/`stat` from Mixer's /v1/top answer, ``width`` columns
    wide at most: long service names first take the room of the RL, UO, EJECT and CONN
    columns where every row has 0, then wrap; a name is never cut."""
    rows = sort_rows(filter_rows(data.get("rows", []), service), sort)
    name_w = max([len("SERVICE"), *(len(_short(r["service"])) for r in rows)])
    ver_w = max([len("VER"), *(len(r["version"]) for r in rows)])
    numbers = [("RPS", 6), ("SUCC", 5), ("P50", 6), ("P90", 6), ("P99", 6), ("CONN", 4), ("EJECT", 5), ("UO", 4), ("RL", 5)]

    def others() -> int:  # the width of every column but SERVICE, with the one-space gaps
        return ver_w + sum(w for _, w in numbers) + len(numbers) + 1

    zero = {"RL": "rate_limited", "UO": "overflows", "EJECT": "ejected_hosts", "CONN": "active_connections"}
    for drop, key in zero.items():  # columns that say nothing (all zero) make room first
        if name_w + others() <= width:
            break
        if not any(r[key] for r in rows):
            numbers = [c for c in numbers if c[0] != drop]
    t = Table(box=None, padding=(0, 0, 0, 1), pad_edge=False, header_style="bold", expand=False)
    t.add_column("SERVICE", max_width=max(len("SERVICE"), min(name_w, width - others())), overflow="fold")
    t.add_column("VER", overflow="fold")
    for name, w in numbers:
        t.add_column(name, justify="right", no_wrap=True, min_width=w)
    kept = [name for name, _ in numbers]
    for r in rows:
        sr = r["success_rate"]
        colour = "green" if sr is None or sr >= 0.99 else ("yellow" if sr >= 0.95 else "red")
        cells: dict[str, str | Text] = {
            "RPS": f"{r['rps']:.1f}", "SUCC": Text(_pct(sr), style=colour), "P50": _ms(r["p50"]), "P90": _ms(r["p90"]),
            "P99": _ms(r["p99"]), "CONN": str(r["active_connections"]), "EJECT": str(r["ejected_hosts"]),
            "UO": str(r["overflows"]), "RL": str(r["rate_limited"]),
        }
        t.add_row(_short(r["service"]), r["version"], *(cells[k] for k in kept))
    covered = data.get("covered", 0.0)
    head = Text(title or f"window {data.get('window', 0):g}s (covered {covered:.0f}s), "
                f"{data.get('targets', 0)} sidecars, sort: {sort}", style="dim")
    meaning = {"SUCC": "SUCC success rate", "CONN": "CONN active connections", "EJECT": "EJECT ejected hosts",
               "UO": "UO overflows (circuit breaker)", "RL": "RL rate-limited"}
    legend = Text(", ".join(meaning[k] for k in kept if k in meaning), style="dim")
    parts: list[RenderableType] = [head, t, legend]
    if not rows:
        parts.append(Text("no traffic seen yet" if not service else f"no traffic for {service}", style="dim"))
    failing = data.get("failing") or {}
    if failing:
        parts.append(Text(f"{len(failing)} sidecar(s) not answering: " + ", ".join(sorted(failing))[:70], style="yellow"))
    return Group(*parts)


# ------------------------------------------------------------------ top / stat


def _client(state: Optional[str]):
    client = control(state_dir(state))
    or_fail(client.require, "mixer")
    return client


def _fetch(client, window: str) -> dict:
    return or_fail(client.top, window)


def _check_sort(sort: str) -> None:
    if sort not in SORTS:
        fail(f"--sort {sort!r}: one of {', '.join(SORTS)}", 2)


def stat(
    window: str = typer.Option("1m", "--window", "-w", help="How far back: 10s, 1m, 5m (at most 15m)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    sort: str = typer.Option("name", "--sort", help="rps, p99, errors or name."),
    service: Optional[str] = typer.Option(None, "--service", help="Only this service (short name or FQDN)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Per service and version, once: rps, success rate, p50/p90/p99, connections, ejections, overflows, rate-limited."""
    _check_sort(sort)
    data = _fetch(_client(state), window)
    if json_out:
        data = dict(data, rows=sort_rows(filter_rows(data.get("rows", []), service), sort))
        print(json.dumps(data, indent=1))
        return
    console.print(render_top(data, sort=sort, service=service, width=console.width))


def top(
    sort: str = typer.Option("rps", "--sort", help="rps, p99, errors or name."),
    service: Optional[str] = typer.Option(None, "--service", help="Only this service (short name or FQDN)."),
    window: str = typer.Option("10s", "--window", "-w", help="Rates over this window."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Live view per service and version, refreshed every second. q or Ctrl-C quits."""
    from rich.live import Live

    _check_sort(sort)
    client = _client(state)
    stop = threading.Event()
    restore = _keys_quit_on_q(stop)
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while not stop.is_set():
                data = _fetch(client, window)
                live.update(render_top(data, sort=sort, service=service, width=console.width), refresh=True)
                stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        restore()


def _keys_quit_on_q(stop: threading.Event):
    """Read keys in cbreak mode on a thread (q quits); returns the terminal's restorer."""
    if not sys.stdin.isatty():
        return lambda: None
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                ch = os.read(fd, 1)
                if ch in (b"q", b"Q") or not ch:
                    stop.set()

    threading.Thread(target=read, daemon=True).start()

    def restore() -> None:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)

    return restore
