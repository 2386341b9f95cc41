"""`meshctl --version`: version, commit, Python, and compiled or pure mode (issue 18)."""

from __future__ import annotations

import re
import subprocess
import sys

from meshctl import launch


def test_version_names_version_commit_python_and_mode():
    r = subprocess.run([sys.executable, "-m", "meshctl", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    py = ".".join(map(str, sys.version_info[:3]))
    assert re.fullmatch(rf"meshctl \d+\.\d+\.\d+\S* \(commit (\w+(-dirty)?|unknown); Python {re.escape(py)}; "
                        rf"(pure|compiled); .+\)\n", r.stdout), r.stdout
    mode = "compiled" if launch.compiled() else "pure"
    assert f"; {mode};" in r.stdout


def test_processes_start_from_the_same_interpreter_or_file():
    # From a virtualenv: `python -m`; the one-file build (frozen) starts itself with a subcommand.
    assert launch.meshctl_argv("pilot", "serve") == [sys.executable, "-m", "meshctl", "pilot", "serve"]
    assert launch.proxy_argv("--pilot", "x") == [sys.executable, "-m", "meshctl.proxy", "--pilot", "x"]
