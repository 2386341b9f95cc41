"""Issue 13 item 9: a rolling restart of one instance of a two-instance service
under steady load loses no request (Istio-style drain: the supervisor takes the
instance out of the registry, then its sidecar keeps serving for
settings.drainDuration with `connection: close` while callers move away)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import HELLO_APP, LoadGenerator, http_get, mesh_ports

pytestmark = pytest.mark.e2e

WRAPPER = f"""import os, runpy, sys
sys.argv = [{str(HELLO_APP)!r}, os.environ["PORT"], sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def meshctl(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy")}
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def mesh_yaml(generation: int) -> str:
    return (
        f"settings: {{portRange: {PORTS}}}\n"
        "services:\n"
        "- name: hello\n"
        "  port: 9080\n"
        "  healthCheck: {http: /health, interval: 1s}\n"
        "  versions:\n"
        "  - {name: v1, command: [python3, hello.py, v1]}\n"
        f"  - {{name: v2, command: [python3, hello.py, v2], env: {{GENERATION: '{generation}'}}}}\n"
    )


PORTS = mesh_ports()[0]


def test_rolling_restart_of_one_instance_under_load_loses_no_request(tmp_path):
    work = tmp_path
    (work / "hello.py").write_text(WRAPPER)
    (work / "mesh.yaml").write_text(mesh_yaml(1))
    # no retries: a request sent to the leaving instance cannot be saved by a retry elsewhere
    (work / "no-retries.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hello}\nspec:\n"
        "  hosts: [hello]\n  http:\n  - route:\n    - destination: {host: hello}\n    retries: {attempts: 0}\n")
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        meshctl("route", "apply", "-f", "no-retries.yaml", cwd=work)
        time.sleep(1.0)
        st = json.loads(meshctl("status", "--json", cwd=work).stdout)
        outbound = int(next(w for w in st["workloads"] if w["name"] == "hello-v1-0")["outbound_address"].rsplit(":", 1)[1])
        seen = {json.loads(http_get(outbound, "http://hello:9080/")[1])["version"] for _ in range(20)}
        assert seen == {"v1", "v2"}
        # 1. SIGTERM to v2's sidecar (as `kill`, a node drain or a crash-looping restart
        #    would send): it keeps serving while the supervisor sees it not ready and
        #    takes it out of the endpoints; then it exits and is restarted.
        v2 = next(w for w in st["workloads"] if w["name"] == "hello-v2-0")
        with LoadGenerator(outbound, "http://hello:9080/", rps=100, connections=4) as load:
            time.sleep(1.0)
            load.mark()
            os.kill(v2["proxy_pid"], signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:  # restarted and registered again
                time.sleep(0.5)
                w = next(w for w in json.loads(meshctl("status", "--json", cwd=work).stdout)["workloads"]
                         if w["name"] == "hello-v2-0")
                if w.get("proxy_pid") != v2["proxy_pid"] and w["state"] == "ready":
                    break
                assert time.monotonic() < deadline, w
            load.mark()
            time.sleep(1.0)
        res = load.result
        assert res.failed == 0 and set(res.statuses) == {200}, ("sidecar SIGTERM", res.statuses, res.errors[:5])
        assert load.ran_in_every_phase(), ("sidecar SIGTERM", load.marks)  # before, until restarted, after
        # 2. a rolling restart by `up` with v2's spec changed: deregistered first, then drained
        with LoadGenerator(outbound, "http://hello:9080/", rps=100, connections=4) as load:
            time.sleep(1.0)
            load.mark()
            t = time.monotonic()
            (work / "mesh.yaml").write_text(mesh_yaml(2))  # v2's instance changes: it is restarted
            meshctl("up", "-f", "mesh.yaml", cwd=work)
            restart = time.monotonic() - t
            load.mark()
            time.sleep(1.0)
        res = load.result
        assert load.ran_in_every_phase(), ("up", load.marks, restart)  # before, during `up`, after
        assert res.failed == 0 and set(res.statuses) == {200}, ("up", res.statuses, res.errors[:5], restart)
        st = json.loads(meshctl("status", "--json", cwd=work).stdout)
        assert sorted(w["name"] for w in st["workloads"]) == ["hello-v1-0", "hello-v2-0"]
        seen = {json.loads(http_get(outbound, "http://hello:9080/")[1])["version"] for _ in range(20)}
        assert seen == {"v1", "v2"}
    finally:
        t = time.monotonic()
        meshctl("down", cwd=work)
        assert time.monotonic() - t < 15  # a whole-mesh stop does not wait out drain periods
