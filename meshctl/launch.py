"""How meshctl starts itself again: the CLI for control roles, the lean proxy entry for
sidecars and gateways; from a virtualenv (``python -m``) or from the one-file build
(meshctl/frozen.py: the same file with a subcommand)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

FROZEN = bool(getattr(sys, "frozen", False))


def meshctl_argv(*args: str) -> list[str]:
    return [sys.executable, *args] if FROZEN else [sys.executable, "-m", "meshctl", *args]


def proxy_argv(*args: str) -> list[str]:
    """Sidecars and gateways run the lean entry point: no CLI imports, so 13 of them
    start in a fraction of the time."""
    return [sys.executable, "__proxy__", *args] if FROZEN else [sys.executable, "-m", "meshctl.proxy", *args]


def compiled() -> bool:
    """Whether meshctl's hot path runs compiled (mypyc) or as pure Python: what the build
    recorded (meshctl._build: the modules setup.py compiles, checked one by one), else
    whether any of meshctl's modules is an extension module."""
    try:
        from ._build import COMPILED

        return COMPILED
    except ImportError:
        pass
    import importlib.machinery
    import importlib.util

    for name in ("meshctl.core.balance", "meshctl.core.route", "meshctl.proxy.stats", "meshctl.proxy.stream"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return True
    return False


def commit() -> str:
    """The commit built into the binary, else the checkout's (git), else 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        return (here / "commit.txt").read_text().strip()
    except OSError:
        pass
    head = here.parent / ".git"
    try:
        import subprocess

        if head.exists():
            r = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "--short=12", "HEAD"],
                               capture_output=True, text=True, timeout=5)
            if r.returncode == 0:
                return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("meshctl")
    except PackageNotFoundError:
        v = "unknown"
    py = ".".join(map(str, sys.version_info[:3]))
    mode = "compiled" if compiled() else "pure"
    build = "one-file binary" if FROZEN else os.path.dirname(os.path.dirname(__file__))
    return f"meshctl {v} (commit {commit()}; Python {py}; {mode}; {build})"
