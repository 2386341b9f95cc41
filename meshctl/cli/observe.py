"""Observability commands: `meshctl prometheus-config`."""

from __future__ import annotations

import re
import sys
from typing import Optional

import typer

from .common import StateDirOption, fail, state_dir


def register(root: typer.Typer) -> None:
    root.command("prometheus-config")(prometheus_config)


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
