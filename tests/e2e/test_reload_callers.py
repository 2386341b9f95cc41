"""`meshctl up -f` again with a changed proxy setting (embedded registry): a restarted
sidecar is stopped (SIGINT, at once: the new one binds its ports) only once every other
proxy runs a config without it, not as soon as Pilot drops it. Pilot's callers apply a
new config some milliseconds after its push; one still routing to the stopped sidecar
got 503 UF (a gateway 13 ms late, tests/e2e/test_reload_registry.py, once).

The late caller here is a proxy of Pilot's API (registered, long-polling, ACKing by the
next poll as a sidecar does) that runs every new config HOLD seconds after it gets it:
before, the sidecar was stopped milliseconds after the caller was handed the config
without it, HOLD before the caller ran it."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from meshctl.credentials import bearer, mesh_credential
from meshctl.state import read_control

from .helpers import HELLO_APP, mesh_ports
from .test_reload_registry import _log_times
from .test_up_registries import meshctl, status

pytestmark = pytest.mark.e2e

HOLD = 1.5  # under registration.CALLER_GONE_AFTER: a live proxy, slow


def _mesh(port_range: str, extra: str = "") -> str:
    return (f"settings: {{portRange: {port_range}, readyTimeout: 20s{extra}}}\n"
            "services:\n- name: hello\n  port: 9080\n  healthCheck: {tcp: true, interval: 1s}\n"
            "  versions:\n  - {name: v1, command: [python3, hello_app.py]}\n")


class SlowCaller:
    """A proxy as Pilot sees one (service ``client``) that runs each new config HOLD s after
    Pilot hands it over: (offered, run) wall-clock times of each, the first one aside."""

    def __init__(self, pilot: str, headers: dict) -> None:
        self.pilot, self.headers = pilot, headers
        self.times: list[tuple[float, float]] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10, headers=self.headers) as c:
            c.put(f"{self.pilot}/v1/proxies/slow-client-0",
                  json={"workload": {"name": "slow-client-0", "service": "client"}}).raise_for_status()
            version = ""
            while not self._stop.is_set():
                r = c.get(f"{self.pilot}/v1/config/slow-client-0", params={"version": version, "wait": "1s"})
                if r.status_code == 304:
                    continue
                r.raise_for_status()
                offered = time.time()
                if version:
                    time.sleep(HOLD)
                    self.times.append((offered, time.time()))
                version = r.json()["version"]  # the next long poll ACKs it
                self.ready.set()

    def __enter__(self) -> "SlowCaller":
        self._t.start()
        assert self.ready.wait(20), "no first config from Pilot"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(10)


def test_a_restarted_sidecar_stops_only_once_a_slow_caller_runs_a_config_without_it(tmp_path):
    shutil.copy(HELLO_APP, tmp_path / "hello_app.py")
    port_range, _ = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(_mesh(port_range))
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=tmp_path, timeout=180)
    try:
        state = tmp_path / ".meshctl"
        pid = status(tmp_path)["workloads"][0]["proxy_pid"]
        with SlowCaller(read_control(state)["pilot"], bearer(mesh_credential(state, create=False))) as caller:
            (tmp_path / "mesh.yaml").write_text(_mesh(port_range, ", requestTimeout: 30s"))
            r = meshctl("up", "-f", "mesh.yaml", cwd=tmp_path, timeout=180)
            assert "mesh updated" in r.stdout
        assert status(tmp_path)["workloads"][0]["proxy_pid"] != pid
        stopped = _log_times(state / "logs" / "hello-v1-0.proxy.log", "SIGINT: draining")[-1]
        # the caller was handed hello-v1-0's leaving before its sidecar stopped ...
        offered, ran = next((o, t) for o, t in caller.times if o < stopped)
        # ... and ran it (asked Pilot again with it) before the stop; logs have milliseconds
        assert stopped >= ran - 0.002, (f"stopped {stopped - offered:.3f}s after the caller was handed the config, "
                                        f"{ran - offered:.3f}s before it ran it", caller.times)
    finally:
        meshctl("down", cwd=tmp_path, check=False)
