"""`meshctl pilot|mixer|citadel serve` on a port that is taken: one line naming
the address and the cause, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess

import pytest

from proxy_testkit import MESHCTL


@pytest.mark.parametrize("role", ["pilot", "mixer", "citadel"])
def test_a_busy_port_is_named_without_a_traceback(role, tmp_path):
    if role == "citadel":
        subprocess.run([MESHCTL, "citadel", "init", "--state-dir", str(tmp_path)], check=True, capture_output=True, timeout=60)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([MESHCTL, role, "serve", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr and "ExceptionGroup" not in r.stderr
