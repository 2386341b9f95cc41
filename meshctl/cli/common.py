"""Pieces every CLI noun shares: the state-dir option, errors, the control-plane client."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table as _RichTable

from ..state import ENV_VAR, StateDirNotFound, require_state_dir

console = Console()
err_console = Console(stderr=True)

StateDirOption = typer.Option(
    None, "--state-dir", envvar=ENV_VAR, help="Mesh state directory (default: .meshctl/ here or in a parent)."
)


class Table(_RichTable):
    """rich's Table whose cells wrap when the terminal is narrow: a long name (a gateway,
    a SPIFFE identity) folds onto a second line instead of being cut to 'istio-ingressga…'."""

    def add_column(self, header="", *args: Any, **kw: Any) -> None:
        kw.setdefault("overflow", "fold")
        super().add_column(header, *args, **kw)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def serve_forever(main, host: str, port: int) -> None:
    """``trio.run(main)`` for a `... serve` command: Ctrl-C ends it quietly, and a port
    that cannot be bound is an error naming it."""
    import trio

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror}")
    except BaseExceptionGroup as group:  # the bind failed inside a nursery
        bind = first_exception(group, OSError)
        if bind is None:
            raise
        fail(f"cannot listen on {host}:{port}: {getattr(bind, 'strerror', None) or bind}")


def first_exception(e: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in e, looking inside exception groups."""
    if isinstance(e, kind):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = first_exception(sub, kind)
            if found is not None:
                return found
    return None


def state_dir(explicit: Optional[str]) -> Path:
    try:
        return require_state_dir(explicit)
    except StateDirNotFound as e:
        fail(str(e))


def control(sd: Path):
    """The control-plane client (meshctl/controlclient.py) for the mesh in ``sd``."""
    from ..controlclient import ControlClient

    return ControlClient(sd)


def or_fail(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a ControlPlaneError turned into `fail` with its message."""
    from ..controlclient import ControlPlaneError

    try:
        return fn(*args, **kwargs)
    except ControlPlaneError as e:
        fail(str(e))


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
