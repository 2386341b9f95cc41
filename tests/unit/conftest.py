"""Fixtures shared by unit test modules: a real `meshctl citadel serve` process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

SERVE = "from meshctl.cli.citadel import app; app()"


@pytest.fixture
def citadel_process(tmp_path):
    sd = tmp_path / ".meshctl"
    subprocess.run([sys.executable, "-c", SERVE, "init", "--state-dir", str(sd)], check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--port", "0", "--cert-ttl", "1h", "--state-dir", str(sd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60  # a process start-up: generous for a loaded machine
        url = None
        while url is None:
            if proc.poll() is not None:
                raise AssertionError(f"citadel serve exited: {proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("citadel serve did not publish its address in control.json")
            try:
                url = json.loads((sd / "control.json").read_text()).get("citadel")
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        yield url, sd
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def citadel_token():
    """token(state_dir, "ns/sa"): a one-time bootstrap token, issued by another process than the server."""
    return _token


def _token(sd, identity):
    out = subprocess.run(
        [sys.executable, "-c", SERVE, "token", identity, "--state-dir", str(sd)], check=True, capture_output=True
    )
    return out.stdout.decode().strip()
