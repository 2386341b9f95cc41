"""Shell completion: the checked-in scripts are current and complete real commands."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_checked_in_completion_scripts_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-completions.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def complete_bash(words: str) -> list[str]:
    parts = words.split(" ")
    env = {**os.environ, "_MESHCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    r = subprocess.run([sys.executable, "-c", "from meshctl.cli.main import app; app(prog_name='meshctl')"],
                       capture_output=True, text=True, env=env)
    return r.stdout.split()


def test_bash_completion_offers_nouns_and_subcommands():
    assert "route" in complete_bash("meshctl rou")
    assert {"apply", "validate", "explain"} <= set(complete_bash("meshctl route "))
    assert "proxy-status" in complete_bash("meshctl pilot proxy-s")
