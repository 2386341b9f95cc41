"""The control plane under `meshctl up`, attacked and restarted (issue 13 items 1 and 10).

One small mesh (hello x2 behind sidecars, with Pilot, Mixer and Citadel):
- an attacker (user nobody when we are root) deletes a healthy instance and
  registers a rogue one: refused 401, and no request fails meanwhile;
- the mesh's own user deletes an instance behind the supervisor's back: the next
  keep-alive registers it again (it used to get 500 "no instance registered" for ever);
- a killed Pilot is shown as restarting with no pid, then ready with its new pid
  (it used to stay "restarting" with a dead pid for minutes);
- the sidecar's spent bootstrap token is not in /proc/PID/environ, and its access
  log, its last good config, the logs and the mesh credential are the user's alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from meshctl.credentials import bearer, mesh_credential

from .helpers import LoadGenerator, free_port, http_get, mesh_ports, meshctl_run
from .test_control_plane_auth import as_attacker, curl

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("cpup")
    shutil.copy(HERE / "hello_app.py", work / "hello_app.py")
    # below Linux's ephemeral range: 33000+ was inside it, where any client socket can take a planned port
    ports, _ = mesh_ports()
    (work / "mesh.yaml").write_text(f"""
settings: {{portRange: {ports}}}
services:
- name: hello
  port: 9080
  healthCheck: {{http: /health, interval: 0.3s}}
  versions:
  - name: v1
    command: [python3, hello_app.py]
    replicas: 2
""")
    meshctl_run("up", "-d", "-f", str(work / "mesh.yaml"))
    sd = work / ".meshctl"
    try:
        yield {"work": work, "sd": sd, "status": lambda: status(sd)}
    finally:
        meshctl_run("down", "--state-dir", str(sd), timeout=60)


def status(sd: Path) -> dict:
    return json.loads(meshctl_run("status", "--json", "--state-dir", str(sd)).stdout)


def pilot_url(sd: Path) -> str:
    return json.loads((sd / "control.json").read_text())["pilot"]


def healthy(sd: Path) -> list[str]:
    reg = httpx.get(pilot_url(sd) + "/v1/registry", headers=bearer(mesh_credential(sd, create=False)),
                    trust_env=False, timeout=5).json()
    return sorted(i["id"] for i in reg.get("hello", []) if i.get("healthy", True))


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_an_attacker_cannot_take_an_instance_out_or_add_a_rogue_one_and_no_request_fails(mesh):
    st = mesh["status"]()
    outbound = int(st["workloads"][0]["outbound_address"].rsplit(":", 1)[1])
    url = pilot_url(mesh["sd"])
    rogue = {"instance": {"id": "rogue-0", "service": "hello", "address": "127.0.0.1", "port": free_port(),
                          "meta": {"meshctl.io/service-port": "9080"}}}
    with LoadGenerator(outbound, "http://hello:9080/", rps=100, connections=2) as load:
        results = [curl("DELETE", f"{url}/v1/registry/instances/hello-v1-0"),
                   curl("PUT", f"{url}/v1/registry/instances/rogue-0", rogue),
                   curl("PUT", f"{url}/v1/proxies/hello-v1-1", {"workload": {"name": "hello-v1-1", "service": "hello"}}),
                   curl("GET", f"{url}/v1/config/hello-v1-0?wait=0s")]
        load.mark()
        time.sleep(2.0)
    print(f"\nattacks refused {[code for code, _ in results]}; load: {load.result.total} requests, "
          f"{load.result.failed} failed")
    assert [code for code, _ in results] == [401, 401, 401, 401], results
    assert load.result.failed == 0, (load.result.statuses, load.result.errors[:3])
    assert load.ran_in_every_phase(), load.marks  # the load ran through the attacks and after them
    assert healthy(mesh["sd"]) == ["hello-v1-0", "hello-v1-1"]


def test_a_deleted_instance_is_registered_again_by_the_next_keepalive(mesh):
    sd = mesh["sd"]
    r = httpx.delete(pilot_url(sd) + "/v1/registry/instances/hello-v1-1",
                     headers=bearer(mesh_credential(sd, create=False)), trust_env=False, timeout=5)
    assert r.status_code == 200
    # the supervisor renews every 5 s (a third of the 15 s TTL): back within one period
    wait_for(lambda: healthy(sd) == ["hello-v1-0", "hello-v1-1"], 12, "hello-v1-1 registered again")


def test_a_killed_pilot_shows_no_dead_pid_and_comes_back_ready(mesh):
    before = mesh["status"]()["control_plane"]
    assert before["state"] == "ready"
    old = before["pid"]
    os.kill(old, signal.SIGKILL)
    seen = []

    def back():
        cp = mesh["status"]()["control_plane"]
        seen.append((cp["state"], cp["pid"]))
        return cp["state"] == "ready" and cp["pid"] not in (None, old) and cp

    killed = time.monotonic()
    cp = wait_for(back, 20, "Pilot ready again with a new pid")
    print(f"\nPilot killed: shown {sorted(set(seen))}, ready again with pid {cp['pid']} after "
          f"{time.monotonic() - killed:.1f}s")
    os.kill(cp["pid"], 0)  # alive
    assert all(pid != old for state, pid in seen if state != "ready"), seen  # the dead pid is never shown as restarting


def test_spent_bootstrap_token_is_not_in_the_sidecars_environ(mesh):
    st = mesh["status"]()
    for w in st["workloads"]:
        environ = Path(f"/proc/{w['proxy_pid']}/environ").read_bytes()
        assert b"MESHCTL_CITADEL_TOKEN" not in environ and b"mct_" not in environ, w["name"]
        assert b"proxy." + w["name"].encode() not in environ  # nor the Pilot credential
    assert list((mesh["sd"] / "auth" / "bootstrap").iterdir()) == []  # every bootstrap file was read and deleted
    log = (mesh["sd"] / "logs" / "citadel.log").read_text()
    assert "issued spiffe://cluster.local/ns/default/sa/hello (token)" in log


def test_access_logs_configs_logs_and_credential_are_the_mesh_users_alone(mesh):
    sd = mesh["sd"]
    outbound = int(mesh["status"]()["workloads"][0]["outbound_address"].rsplit(":", 1)[1])
    assert http_get(outbound, "http://hello:9080/")[0] == 200
    private_files = [sd / "auth" / "mesh.token", sd / "logs" / "hello-v1-0.access.log", sd / "logs" / "pilot.log",
                     sd / "proxies" / "hello-v1-0.config.json", sd / "pilot" / "nodes.json"]
    for f in private_files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in (sd / "auth", sd / "logs", sd / "proxies", sd / "pilot", sd / "nodes"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    if as_attacker():
        import subprocess

        os.chmod(sd.parent, 0o755)
        os.chmod(sd, 0o755)
        for f in private_files:
            r = subprocess.run([*as_attacker(), "cat", str(f)], capture_output=True, text=True)
            assert r.returncode != 0, f
