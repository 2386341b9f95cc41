"""`meshctl route validate` of a mesh whose Consul is away: the files are validated at
once, offline (with the applied rules this host last knew), and the output says so and
what it did not check (hosts against the registry's services); `--online`, which asks
Consul KV for the rules in force, fails at once, naming the cause. Real sockets: a port that refuses connections, and one that accepts and
never answers (a hung agent). The command runs in-process (typer's runner) so its own
time is measured, not the interpreter's start-up."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl.cli.main import app
from meshctl.pilot.kvstore import LOCATION_FILE

from proxy_testkit import free_port

RULES = Path(__file__).parents[2] / "examples" / "bookinfo" / "rules"


@pytest.fixture
def consul_mesh(tmp_path, monkeypatch):
    """A state directory of a mesh that ran with the Consul registry at a given address."""
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    sd = tmp_path / ".meshctl"
    sd.mkdir()

    def at(port: int) -> Path:
        url = f"consul://127.0.0.1:{port}"
        (sd / LOCATION_FILE).write_text(json.dumps({"kind": "consul", "registry": url, "prefix": "meshctl/t/",
                                                    "meshId": "t"}))
        (sd / "status.json").write_text(json.dumps({"state": "stopped", "registry": {"url": url}}))
        return sd

    return at


def _validate(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    r = CliRunner().invoke(app, ["route", "validate", "-f", str(RULES / "virtual-service-all-v1.yaml"), *args],
                           catch_exceptions=False)
    return r.exit_code, r.output, time.monotonic() - started


def test_validate_with_consul_refusing_connections_is_offline_at_once_and_says_so(consul_mesh):
    port = free_port()  # nothing listens: connection refused
    consul_mesh(port)
    code, out, took = _validate()
    assert code == 0, out
    assert "4 resource(s) valid (validated offline)" in out
    assert f"not checked: hosts against the services of the registry consul://127.0.0.1:{port}" in out
    assert took < 2.0, took
    code, out, took = _validate("--online")
    assert code == 1
    assert "cannot validate online:" in out and "connection refused" in out and "is the Consul agent running?" in out
    assert took < 2.0, took


def test_validate_with_a_hung_consul_waits_one_short_timeout(consul_mesh):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # accepts (the kernel does), never answers
    try:
        consul_mesh(hung.getsockname()[1])
        code, out, took = _validate()
        assert code == 0 and "(validated offline)" in out, out
        assert took < 2.0, took  # Consul is not asked offline (a Consul call waits 5 s by default)
        code, out, took = _validate("--online")
        assert code == 1 and "cannot validate online: the rules in force" in out and "no answer within 1s" in out
        assert took < 3.5, took  # one 1 s timeout (a Consul call waits 5 s by default)
    finally:
        hung.close()
