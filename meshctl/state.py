"""Where a running mesh keeps its state, and how commands find it.

Like git finds `.git`: `--state-dir`, else `MESHCTL_STATE_DIR`, else the first
`.meshctl/` in the current directory or one of its parents, else (like
kubectl's current context) the mesh that `up` started last from this account,
recorded in ``$XDG_CONFIG_HOME/meshctl/current`` (``~/.config/...``). `up`
creates the state directory beside the mesh file; `control.json` inside says
where the control plane listens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_DIR_NAME = ".meshctl"
ENV_VAR = "MESHCTL_STATE_DIR"


class StateDirNotFound(Exception):
    pass


def find_state_dir(explicit: str | Path | None = None, start: Path | None = None, *,
                   use_current: bool = True) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / STATE_DIR_NAME
        if candidate.is_dir():
            return candidate
    if not use_current:
        return None
    try:
        last = Path(current_pointer().read_text().strip())
    except OSError:
        return None
    return last if (last / "control.json").is_file() else None


def current_pointer() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshctl" / "current"


def remember_current(state_dir: Path) -> None:
    """Make ``state_dir`` the mesh that commands find from anywhere (best effort)."""
    try:
        p = current_pointer()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".current.{os.getpid()}")
        tmp.write_text(f"{state_dir.resolve()}\n")
        tmp.replace(p)
    except OSError:
        pass


def require_state_dir(explicit: str | Path | None = None) -> Path:
    found = find_state_dir(explicit)
    if found is None:
        raise StateDirNotFound(
            f"no mesh state directory: no {STATE_DIR_NAME}/ here or in any parent of {Path.cwd()}, and no mesh "
            f"started by `meshctl up` recorded in {current_pointer()}; run `meshctl up` first, "
            f"or pass --state-dir / set {ENV_VAR}"
        )
    return found


def read_control(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "control.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_control(state_dir: Path, **entries: object) -> None:
    """Merge entries into control.json (atomic rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = read_control(state_dir)
    data.update(entries)
    tmp = state_dir / f".control.json.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(state_dir / "control.json")
