"""`meshctl up -d` shows mesh.yaml's errors as the foreground `up` does (issue 18, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .helpers import mesh_ports

MISSPELLED = """\
settings:
  portRange: {ports}
services:
- name: hello
  port: 9080
  healthcheck: {{http: /health}}
  versions:
  - name: v1
    command: [python3, -m, http.server]
"""

EXPECTED = "mesh.yaml:6: services[0].healthcheck: unknown field (did you mean healthCheck?)"


def _up(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "meshctl", "up", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def test_up_detached_prints_the_mesh_file_error_and_fails(tmp_path: Path) -> None:
    ports, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(MISSPELLED.format(ports=ports))
    fg = _up(tmp_path, "-f", "mesh.yaml", "--state-dir", str(tmp_path / "state"))
    bg = _up(tmp_path, "-d", "-f", "mesh.yaml", "--state-dir", str(tmp_path / "state"))
    assert fg.returncode != 0 and EXPECTED in fg.stderr, fg.stderr
    assert bg.returncode != 0, bg.stderr
    assert EXPECTED in bg.stderr, bg.stderr
    assert "supervisor.log" not in bg.stderr


def test_a_mesh_that_fails_to_come_up_does_not_become_the_current_one(tmp_path: Path, monkeypatch) -> None:
    # `meshctl status` from any directory finds the mesh `up` started last; one whose app cannot
    # start must not take that place from the mesh that runs.
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    running = tmp_path / "running" / ".meshctl"
    running.mkdir(parents=True)
    (running / "control.json").write_text("{}")
    (config / "meshctl").mkdir(parents=True)
    (config / "meshctl" / "current").write_text(f"{running}\n")
    ports, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(MISSPELLED.format(ports=ports).replace("healthcheck", "healthCheck")
                                        .replace("[python3, -m, http.server]", "[no-such-binary-xyz]"))
    for args in (("-f", "mesh.yaml"), ("-d", "-f", "mesh.yaml")):
        r = _up(tmp_path, *args)
        assert r.returncode != 0 and "no-such-binary-xyz" in r.stderr + r.stdout, r.stderr
        assert (config / "meshctl" / "current").read_text().strip() == str(running)
