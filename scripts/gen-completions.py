"""Write completions/meshctl.{bash,zsh,fish} from the CLI itself.

    python scripts/gen-completions.py          # rewrite the files
    python scripts/gen-completions.py --check  # exit 1 if they are not current

The scripts call back into `meshctl` for candidates (typer/click's dynamic
completion), so every command, option and choice the CLI has completes
without regenerating; the check catches a changed program name or a typer
upgrade that changes the script itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "completions"
SHELLS = {"bash": "meshctl.bash", "zsh": "_meshctl", "fish": "meshctl.fish"}


def render(shell: str) -> str:
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run(
        [sys.executable, "-c", "from meshctl.cli.main import app; app(prog_name='meshctl')", "--show-completion", shell],
        capture_output=True, text=True, env=env,
    )
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"cannot render {shell} completion: {r.stderr.strip()}")
    return r.stdout if r.stdout.endswith("\n") else r.stdout + "\n"


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for shell, name in SHELLS.items():
        text = render(shell)
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("completion scripts are not current (run python scripts/gen-completions.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
