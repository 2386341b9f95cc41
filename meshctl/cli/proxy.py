"""`meshctl proxy ...`: run a sidecar (or gateway) from a ProxyConfig file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

proxy_app = typer.Typer(help="Run and inspect sidecar proxies.", no_args_is_help=True)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("meshctl")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False


def _fail(message: str) -> None:
    typer.echo(f"meshctl proxy run: {message}", err=True)
    raise typer.Exit(2)


@proxy_app.command("run")
def run(
    config: Path = typer.Option(None, "--config", "-c", help="ProxyConfig file (YAML or JSON)."),
    pilot: str = typer.Option(None, "--pilot", help="Follow Pilot at this URL instead of a file (needs --node)."),
    node: Path = typer.Option(None, "--node", help="With --pilot: this proxy's Node file (workload and listeners)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="With --pilot: where the last good config is kept."),
    admin_port: int = typer.Option(15000, "--admin-port", help="Admin API port on 127.0.0.1 (0: any free port)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve the listeners of a ProxyConfig until SIGTERM (drains, exits 0).

    SIGHUP, or any change to the file, reloads it; a bad new config is
    rejected and the running one kept."""
    import trio

    from ..loader.codec import LoadError
    from ..loader.proxyconfig import load_proxy_config
    from ..proxy.runtime import ConfigRejected, ProxyRuntime

    _setup_logging(log_level)
    if pilot:
        _run_with_pilot(pilot, node, state_dir, admin_port)
        return
    if config is None:
        _fail("give --config FILE, or --pilot URL --node FILE")
    if not config.exists():
        _fail(f"{config}: no such file")
    try:
        cfg = load_proxy_config(config)
    except LoadError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{config}: {exc.strerror or exc}")
    rt = ProxyRuntime(config_path=config, loader=load_proxy_config)
    try:
        trio.run(lambda: rt.run(cfg, admin_port=admin_port))
    except ConfigRejected as exc:
        _fail(f"{config}: config rejected: {exc.reason}")
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled as a drain
        raise typer.Exit(130)


def _run_with_pilot(pilot: str, node_file: Path | None, state_dir: Path | None, admin_port: int) -> None:
    import json

    import trio

    from ..loader.codec import LoadError, from_data
    from ..pilot.compile import Node
    from ..proxy.pilot_client import run_with_pilot
    from ..proxy.runtime import ConfigRejected, ProxyRuntime

    if node_file is None:
        _fail("--pilot needs --node FILE (the proxy's workload and listeners)")
    try:
        node = from_data(Node, json.loads(node_file.read_text()), path="", file=str(node_file))
    except OSError as exc:
        _fail(f"{node_file}: {exc.strerror or exc}")
    except (ValueError, LoadError) as exc:
        _fail(f"{node_file}: {exc}")
    rt = ProxyRuntime()
    try:
        trio.run(run_with_pilot, rt, pilot, node, state_dir, admin_port)
    except ConfigRejected as exc:
        _fail(f"config from {pilot} rejected: {exc.reason}")
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled as a drain
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.add_typer(proxy_app, name="proxy")
