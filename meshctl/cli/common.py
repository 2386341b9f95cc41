"""Pieces every CLI noun shares: the state-dir option, errors, control-plane calls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table as _RichTable

from ..state import ENV_VAR, StateDirNotFound, read_control, require_state_dir

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
        e = first_exception(group, OSError)
        if e is None:
            raise
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


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


def control_url(sd: Path, role: str) -> str | None:
    """The URL of a running control-plane role, or None when it is not running."""
    return read_control(sd).get(role)


def call(url: str, method: str, path: str, *, json: Any = None, timeout: float = 5.0) -> httpx.Response:
    try:
        return httpx.request(method, url.rstrip("/") + path, json=json, timeout=timeout)
    except httpx.HTTPError as e:
        raise ConnectionError(f"{url}: {e.__class__.__name__}: {e}") from e


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
