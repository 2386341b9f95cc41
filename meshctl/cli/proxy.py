"""`meshctl proxy ...`: run a sidecar (or gateway) from a ProxyConfig file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

proxy_app = typer.Typer(help="Run and inspect sidecar proxies.", no_args_is_help=True)


@proxy_app.command("run")
def run(
    config: Path = typer.Option(None, "--config", "-c", help="ProxyConfig file (YAML or JSON)."),
    pilot: str = typer.Option(None, "--pilot", help="Follow Pilot at this URL instead of a file."),
    node: Path = typer.Option(None, "--node", help="With --pilot: this proxy's node file (JSON)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="The mesh's state directory: with --pilot, where the last "
                                   "good config is kept; with either, the admin API's /config, /mirror and /traces "
                                   "answer its mesh credential (without it, nobody)."),
    admin_port: int = typer.Option(15000, "--admin-port", help="Admin API port on 127.0.0.1 (0: any free port)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    access_log: Path = typer.Option(None, "--access-log", help="Write an access log (JSON lines, rotated at 10 MB x 3) here."),
    mixer: str = typer.Option(None, "--mixer", envvar="MESHCTL_MIXER", help="Mixer URL, for global rate-limit quotas."),
) -> None:
    """Serve the listeners of a ProxyConfig until SIGTERM (drains, exits 0).

    With --config, SIGHUP or any change to the file reloads it; with --pilot,
    configs come by long-poll. A bad new config is rejected and the running
    one kept. A config that cannot load or run exits 2 naming the problem
    (file:line for files)."""
    args = ["--admin-port", str(admin_port), "--log-level", log_level]
    if config is not None:
        args += ["--config", str(config)]
    if pilot is not None:
        args += ["--pilot", pilot]
    if node is not None:
        args += ["--node", str(node)]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    if access_log is not None:
        args += ["--access-log", str(access_log)]
    if mixer:
        args += ["--mixer", mixer]
    if pilot is not None and node is not None and state_dir is not None:
        _hand_over_credential(node, state_dir)
    elif config is not None and state_dir is not None:
        _hand_over_admin_verifier(state_dir)
    if os.environ.get("MESHCTL_PROXY_IN_PROCESS") != "1":
        # the sidecar runs long: replace this process with one that imports
        # only the data path (same pid, so supervisors and signals are unaffected)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            from ..launch import proxy_argv

            os.execv(sys.executable, proxy_argv(*args))
        except OSError:
            pass  # fall back to serving in this process
    from ..proxy.main import main

    raise typer.Exit(main(args))


def _hand_over_credential(node: Path, state_dir: Path) -> None:
    """Run by the mesh's user, `proxy run --pilot` mints the proxy's own Pilot
    credential and hands it over in a one-time 0600 bootstrap file (the sidecar
    reads and deletes it), unless a launcher already gave one."""
    import json

    from ..credentials import (ENV_BOOTSTRAP, CredentialError, mesh_credential, mesh_verifier, proxy_credential,
                               write_bootstrap)

    if os.environ.get(ENV_BOOTSTRAP):
        return
    try:
        name = json.loads(node.read_text())["workload"]["name"]
        secret = mesh_credential(state_dir)
    except (OSError, ValueError, KeyError, TypeError, CredentialError):
        return  # the sidecar says why Pilot refuses it
    os.environ[ENV_BOOTSTRAP] = str(write_bootstrap(state_dir, name, {"pilot_credential": proxy_credential(secret, name),
                                                                      "admin_verifier": mesh_verifier(secret)}))


def _hand_over_admin_verifier(state_dir: Path) -> None:
    """A proxy on a static file has no Pilot credential, but its admin API's /config,
    /mirror and /traces answer the mesh credential of ``state_dir`` (created if new):
    the proxy gets only its SHA-256, in a one-time bootstrap file."""
    from ..credentials import ENV_BOOTSTRAP, CredentialError, mesh_credential, mesh_verifier, write_bootstrap

    if os.environ.get(ENV_BOOTSTRAP):
        return
    try:
        secret = mesh_credential(state_dir)
    except (OSError, CredentialError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--state-dir") from None
    os.environ[ENV_BOOTSTRAP] = str(write_bootstrap(state_dir, "proxy", {"admin_verifier": mesh_verifier(secret)}))


def register(app: typer.Typer) -> None:
    app.add_typer(proxy_app, name="proxy")
