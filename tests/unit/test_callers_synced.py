"""Registrations.wait_callers_synced against a real Pilot (in this process, over HTTP,
its embedded registry), its proxies fakes that long-poll as a sidecar does but run
(ACK) a new config only when the test says: before a restarted sidecar is stopped,
every other proxy runs a config without it; its wave's proxies, NACKing ones and
gone ones are not waited for; Pilot unreachable or a proxy that never ACKs holds it
CALLERS_SYNC_WAIT at most."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from meshctl.credentials import bearer, mesh_credential
from meshctl.loader.codec import to_data
from meshctl.loopback import plain_http_client
from meshctl.model.proxyconfig import Node, Workload
from meshctl.pilot.server import Pilot, run_pilot
from meshctl.registry.embedded import EmbeddedRegistry
from meshctl.supervisor import registration
from meshctl.supervisor.plan import make_plan
from meshctl.supervisor.registration import workload_instance
from meshctl.supervisor.run import Supervisor

MESH = ("services:\n- name: hello\n  port: 9080\n"
        "  versions: [{name: v1, command: [python3, app.py], replicas: 2}]\n")


class FakeProxy:
    """A proxy as Pilot sees one: its node PUT, a long poll always open naming the version
    it runs; a new config is run at once, or with ``hold`` only on ``run_offered()``."""

    def __init__(self, url: str, state_dir: Path, name: str, service: str = "client") -> None:
        self.url, self.name, self.service = url, name, service
        self.headers = bearer(mesh_credential(state_dir))
        self.version = ""
        self.offered = ""  # the last config Pilot handed it
        self.hold = False
        self._go = trio.Event()
        self.got = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with plain_http_client(timeout=None, headers=self.headers) as c:
            node = Node(workload=Workload(name=self.name, service=self.service))
            (await c.put(f"{self.url}/v1/proxies/{self.name}", json=to_data(node))).raise_for_status()
            started = False
            while True:
                r = await c.get(f"{self.url}/v1/config/{self.name}", params={"version": self.version, "wait": "30s"})
                if r.status_code == 304:
                    continue
                r.raise_for_status()
                self.offered = r.json()["version"]
                self.got.set()
                if self.hold:
                    await self._go.wait()
                    self._go = trio.Event()
                self.version = self.offered  # the next long poll ACKs it
                if not started:
                    started = True
                    task_status.started()

    def run_offered(self) -> None:
        self._go.set()

    async def nack(self) -> None:
        async with plain_http_client(timeout=5, headers=self.headers) as c:
            await c.post(f"{self.url}/v1/ack/{self.name}", json={"version": self.offered, "error": "no"})


class Mesh:
    def __init__(self, sup: Supervisor, pilot: Pilot, nursery: trio.Nursery) -> None:
        self.sup, self.pilot, self.nursery = sup, pilot, nursery
        self.regs = sup.registrations
        self.plans = {w.name: w for w in make_plan(sup.spec, sup.mesh_path.parent, lambda p: True).workloads}

    async def proxy(self, name: str, service: str = "client") -> FakeProxy:
        p = FakeProxy(self.sup.control.pilot_url, self.sup.state_dir, name, service)
        await self.nursery.start(p.run)
        return p

    def status(self, name: str) -> str:
        return next(p["status"] for p in self.pilot.status()["proxies"] if p["proxy"] == name)

    def start_wait(self, leaving: str, exclude: set[str]) -> trio.Event:
        done = trio.Event()

        async def wait() -> None:
            await self.regs.wait_callers_synced(self.plans[leaving], exclude)
            done.set()

        self.nursery.start_soon(wait)
        return done


@pytest.fixture
async def mesh(tmp_path, nursery):
    (tmp_path / "mesh.yaml").write_text(MESH)
    sup = Supervisor(tmp_path / "mesh.yaml", tmp_path / "state")
    pilot = Pilot(sup.state_dir, EmbeddedRegistry(sup.state_dir))
    port = await nursery.start(run_pilot, pilot, "127.0.0.1", 0)
    sup.control.urls["pilot"] = f"http://127.0.0.1:{port}"
    sup.registrations.use_embedded()
    m = Mesh(sup, pilot, nursery)
    for w in m.plans.values():
        await pilot.registry.register(workload_instance(w))
    yield m
    await sup.registrations.aclose()


async def test_waits_until_every_other_proxy_runs_a_config_without_the_leaving_instance(mesh):
    caller = await mesh.proxy("client-0")
    gateway = await mesh.proxy("gw")  # a gateway is a caller too
    peer = await mesh.proxy("hello-v1-1", "hello")  # its sidecar stops in the same wave
    own = await mesh.proxy("hello-v1-0", "hello")  # the leaving instance's own sidecar
    nacker = await mesh.proxy("client-1")
    gone = await mesh.proxy("client-2")  # stopped a minute ago: Pilot keeps its entry
    for p in (caller, gateway, peer, own, nacker, gone):
        p.hold, p.got = True, trio.Event()
    await mesh.pilot.registry.deregister("hello-v1-0")
    done = mesh.start_wait("hello-v1-0", {"hello-v1-0", "hello-v1-1"})
    for p in (caller, gateway, peer, own, nacker, gone):
        await p.got.wait()  # handed the config without hello-v1-0, not run yet
    mesh.pilot.proxies["client-2"].last_seen -= 60  # as Pilot has it a minute after
    await nacker.nack()
    await trio.sleep(0.5)
    assert not done.is_set()
    assert [mesh.status(n) for n in ("client-0", "gw", "client-1")] == ["STALE", "STALE", "NACKED"]
    caller.run_offered()
    await trio.sleep(0.5)
    assert not done.is_set() and mesh.status("client-0") == "SYNCED"
    gateway.run_offered()
    with trio.fail_after(1.0):
        await done.wait()
    # not waited for: the wave's sidecars, the NACKing proxy, the one gone
    assert {n: mesh.status(n) for n in ("hello-v1-0", "hello-v1-1", "client-1", "client-2")} == {
        "hello-v1-0": "STALE", "hello-v1-1": "STALE", "client-1": "NACKED", "client-2": "STALE"}


async def test_a_caller_that_never_runs_it_holds_the_stop_the_bound_at_most_named_in_a_warning(mesh, monkeypatch, caplog):
    monkeypatch.setattr(registration, "CALLERS_SYNC_WAIT", 0.6)
    caller = await mesh.proxy("client-0")
    caller.hold = True
    await mesh.pilot.registry.deregister("hello-v1-0")
    t0 = trio.current_time()
    with trio.fail_after(3.0):
        await mesh.start_wait("hello-v1-0", set()).wait()
    assert 0.6 <= trio.current_time() - t0 < 1.5
    assert mesh.status("client-0") == "STALE"
    assert any(r.levelno == logging.WARNING and "hello-v1-0" in r.getMessage() and "STALE: client-0" in r.getMessage()
               for r in caplog.records), caplog.text


async def test_pilot_unreachable_holds_the_stop_the_bound_at_most(mesh, monkeypatch, caplog):
    monkeypatch.setattr(registration, "CALLERS_SYNC_WAIT", 0.6)
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        mesh.sup.control.urls["pilot"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = trio.current_time()
    with trio.fail_after(3.0):
        await mesh.start_wait("hello-v1-0", set()).wait()
    assert 0.6 <= trio.current_time() - t0 < 1.5
    assert "Pilot does not answer" in caplog.text, caplog.text
