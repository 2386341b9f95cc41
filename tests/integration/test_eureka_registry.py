"""EurekaRegistry against a real Eureka server (Spring Cloud Netflix, started by tests/tools/servers.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import trio

from meshctl.registry import keep_alive_loop, open_registry
from meshctl.registry.base import RegistryError
from meshctl.registry.eureka import EurekaRegistry
from tests.tools.watching import ids, inst, unique, watching

pytestmark = pytest.mark.eureka

def make(url: str, *, lease: float = 2.0) -> EurekaRegistry:
    reg = open_registry(url, "/nonexistent-state-dir")
    assert isinstance(reg, EurekaRegistry)
    reg.renewal_interval = 0.5
    reg.lease_duration = lease
    reg.poll_interval = 0.2
    reg._backoff_args = (0.1, 0.5)
    return reg


def eureka_call(method: str, url: str, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_register_shows_up_with_labels_and_deregister_removes_it(eureka_server):
    svc = unique("reviews")
    reg = make(eureka_server, lease=30)
    async with watching(reg) as w:
        await reg.register(inst(f"{svc}-v2-0", svc, 9081, app=svc, version="v2", **{"topology.io/zone": "a"}))
        await reg.register(inst(f"{svc}-v1-0", svc, 9080, app=svc, version="v1"))
        snap = await w.until(lambda s: len(ids(s, svc)) == 2)
        v1, v2 = snap[svc]
        assert (v2.id, v2.address, v2.port) == (f"{svc}-v2-0", "127.0.0.1", 9081)
        assert v2.labels == {"app": svc, "version": "v2", "topology.io/zone": "a"}
        assert v1.labels["version"] == "v1"
        assert reg.reachable and reg.last_error == ""
        # Eureka's own view: app upper-cased, vipAddress = service
        assert eureka_call("GET", f"{eureka_server.http}/apps/{svc.upper()}/{svc}-v2-0") == 200

        await reg.deregister(f"{svc}-v2-0")
        await w.until(lambda s: ids(s, svc) == [f"{svc}-v1-0"])
        await reg.deregister(f"{svc}-v1-0")
        await w.until(lambda s: svc not in s)
        # after the first full fetch every change came through /apps/delta (our copy kept matching the
        # server's hash code, so no second full fetch). Both registrations may already be in that first
        # full fetch when the watch starts slowly; the two deregistrations happen after it, so each needs a delta.
        assert reg.full_fetches == 1 and reg.delta_fetches >= 2
    await reg.aclose()


async def test_missed_heartbeats_evict_and_keep_alive_registers_again(eureka_server):
    svc = unique("ratings")
    reg = make(eureka_server, lease=1.0)
    async with watching(reg) as w, trio.open_nursery() as nursery:
        await reg.register(inst(f"{svc}-0", svc))
        await reg.register(inst(f"{svc}-1", svc))
        await w.until(lambda s: len(ids(s, svc)) == 2)
        nursery.start_soon(keep_alive_loop, reg, f"{svc}-1")
        # -0 sends no heartbeat: Eureka evicts it once its lease runs out
        start = trio.current_time()
        await w.until(lambda s: ids(s, svc) == [f"{svc}-1"], timeout=20)
        assert trio.current_time() - start < 10
        # its next heartbeat gets a 404 and registers it again
        await reg.keep_alive(f"{svc}-0")
        await w.until(lambda s: len(ids(s, svc)) == 2)
        nursery.cancel_scope.cancel()
    await reg.deregister(f"{svc}-0")
    await reg.deregister(f"{svc}-1")
    await reg.aclose()


async def test_draining_marks_out_of_service_and_heartbeats_keep_it_so(eureka_server):
    svc = unique("details")
    reg = make(eureka_server, lease=30)
    async with watching(reg) as w:
        await reg.register(inst(f"{svc}-0", svc))
        await reg.register(inst(f"{svc}-1", svc))
        await w.until(lambda s: len(ids(s, svc)) == 2)
        await reg.set_draining(f"{svc}-0")
        await w.until(lambda s: ids(s, svc) == [f"{svc}-1"])
        await reg.keep_alive(f"{svc}-0")
        await trio.sleep(0.8)
        assert ids(w.latest, svc) == [f"{svc}-1"]
    await reg.deregister(f"{svc}-0")
    await reg.deregister(f"{svc}-1")
    await reg.aclose()


def _server_status(server, svc: str, iid: str) -> str | None:
    """The instance's status on the Eureka server itself (None: the server does not know it)."""
    req = urllib.request.Request(f"{server.http}/apps/{svc.upper()}/{iid}", headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)["instance"]["status"]
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, exc
        return None


# (before the server restart test: a restarted server served a stale delta to a new watch now and then)
async def test_a_keep_alive_re_registering_while_the_instance_is_deregistered_does_not_resurrect_it(eureka_server):
    """A draining instance's heartbeat gets a 404 (the server lost it) and registers it again;
    its deregistration comes while that registration is in flight (here: forced just before
    the POST leaves, through an httpx request hook). Before: the POST and the OUT_OF_SERVICE
    mark that follows it landed after the DELETE, so the instance came back OUT_OF_SERVICE,
    with nobody renewing it, until its lease ran out."""
    svc = unique("reviews")
    iid = f"{svc}-v1-0@127.0.0.1:9080"
    reg = make(eureka_server, lease=30)
    try:
        await reg.register(inst(iid, svc))
        await reg.set_draining(iid)
        assert _server_status(eureka_server, svc, iid) == "OUT_OF_SERVICE"
        # the server loses it (restart, eviction): the next heartbeat gets a 404
        assert eureka_call("DELETE", f"{eureka_server.http}/apps/{svc.upper()}/{iid}") == 200
        raced = []

        async def deregister_before_the_post(request) -> None:
            if request.method == "POST" and not raced:
                raced.append(request.url.path)
                await reg.deregister(iid)

        reg._http().event_hooks["request"].append(deregister_before_the_post)
        await reg.keep_alive(iid)
        assert raced, "the heartbeat did not register the instance again"
        assert _server_status(eureka_server, svc, iid) is None
    finally:
        await reg.aclose()


async def test_registering_an_id_again_clears_the_out_of_service_its_drain_left(eureka_server):
    """A drained instance whose DELETE never reached the server (a timeout under load: the
    supervisor drops the retry once the sidecar is registered again) and whose restarted
    sidecar registers the same id (<workload>@<address>:<port>) again. Eureka keeps a status
    override across a registration of an instance it still has; before, the new sidecar stayed
    OUT_OF_SERVICE for good, heartbeats and all, and no caller ever reached it."""
    svc = unique("ratings")
    iid = f"{svc}-v1-0@127.0.0.1:9080"
    reg = make(eureka_server, lease=30)
    try:
        async with watching(reg) as w:
            await reg.register(inst(iid, svc))
            await reg.set_draining(iid)
            await w.until(lambda s: ids(s, svc) == [])
            await reg.register(inst(iid, svc))
            await reg.keep_alive(iid)
            assert _server_status(eureka_server, svc, iid) == "UP"
            await w.until(lambda s: ids(s, svc) == [iid])
            await reg.keep_alive(iid)
            assert _server_status(eureka_server, svc, iid) == "UP"
        await reg.deregister(iid)
    finally:
        await reg.aclose()


async def test_instance_registered_by_another_eureka_client_is_seen(eureka_server):
    """A Spring-style registration: vipAddress in mixed case, metadata as labels,
    a DOWN instance that must stay out of rotation."""
    svc = unique("catalog")
    app = svc.upper()

    def doc(iid: str, port: int, status: str) -> dict:
        return {
            "instance": {
                "instanceId": iid,
                "hostName": "localhost",
                "app": app,
                "ipAddr": "127.0.0.3",
                "vipAddress": svc.capitalize(),
                "secureVipAddress": svc.capitalize(),
                "status": status,
                "port": {"$": port, "@enabled": "true"},
                "securePort": {"$": 443, "@enabled": "false"},
                "dataCenterInfo": {
                    "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                    "name": "MyOwn",
                },
                "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
                "metadata": {"version": "v7", "management.port": str(port)},
            }
        }

    assert eureka_call("POST", f"{eureka_server.http}/apps/{app}", doc(f"localhost:{svc}:8080", 8080, "UP")) == 204
    assert eureka_call("POST", f"{eureka_server.http}/apps/{app}", doc(f"localhost:{svc}:8081", 8081, "DOWN")) == 204
    reg = make(eureka_server)
    try:
        async with watching(reg) as w:
            snap = await w.until(lambda s: bool(ids(s, svc)))
            (got,) = snap[svc]
            assert (got.id, got.address, got.port) == (f"localhost:{svc}:8080", "127.0.0.3", 8080)
            assert got.labels == {"version": "v7", "management.port": "8080"}
    finally:
        await reg.aclose()
        for port in (8080, 8081):
            eureka_call("DELETE", f"{eureka_server.http}/apps/{app}/localhost:{svc}:{port}")


async def test_server_restart_watch_keeps_last_snapshot_then_recovers(eureka_server):
    svc = unique("productpage")
    sidecar = make(eureka_server, lease=30)
    pilot = make(eureka_server)
    async with watching(pilot) as w, trio.open_nursery() as nursery:
        await sidecar.register(inst(f"{svc}-0", svc, version="v1"))
        before = await w.until(lambda s: ids(s, svc) == [f"{svc}-0"])
        nursery.start_soon(keep_alive_loop, sidecar, f"{svc}-0")

        await trio.to_thread.run_sync(eureka_server.stop)
        # (a server shutting down may first answer 5xx; then connections are refused)
        with trio.fail_after(10):
            while pilot.reachable or "connection refused" not in pilot.last_error:
                await trio.sleep(0.05)
        assert "cannot connect (connection refused) — is the Eureka server running?" in pilot.last_error
        assert eureka_server in pilot.last_error
        seen = len(w.history)
        await trio.sleep(1.0)
        assert len(w.history) == seen and w.latest == before
        with pytest.raises(RegistryError, match="is the Eureka server running"):
            await sidecar.keep_alive(f"{svc}-0")

        await trio.to_thread.run_sync(eureka_server.start)
        # the new server starts empty: the instance is back only through re-registration
        with trio.fail_after(20):
            while eureka_call("GET", f"{eureka_server.http}/apps/{svc.upper()}/{svc}-0") != 200:
                await trio.sleep(0.2)
        # (a snapshot equal to the last one is not yielded again: poll the state)
        with trio.fail_after(20):
            while not (pilot.reachable and ids(w.latest, svc) == [f"{svc}-0"]):
                await trio.sleep(0.05)
        after = w.latest
        assert after[svc][0].labels == {"version": "v1"}
        assert pilot.last_error == ""
        nursery.cancel_scope.cancel()
    await sidecar.deregister(f"{svc}-0")
    await pilot.aclose()
    await sidecar.aclose()


async def test_unreachable_server_error_names_url_and_cause():
    from tests.tools.servers import free_port

    url = f"eureka://127.0.0.1:{free_port()}/eureka"
    reg = open_registry(url, "/nonexistent")
    with pytest.raises(RegistryError) as info:
        await reg.ping()
    assert str(info.value).startswith(f"{url}: ")
    assert "cannot connect (connection refused) — is the Eureka server running?" in str(info.value)
    assert not reg.reachable
    await reg.aclose()


async def test_an_instances_locality_travels_in_its_metadata(eureka_server):
    """Locality load balancing across hosts: each host's instances carry their locality."""
    from dataclasses import replace

    from meshctl.model.base import FrozenDict
    from meshctl.pilot.compile import META_LOCALITY

    svc = unique("helloworld")
    reg = make(eureka_server, lease=30)
    async with watching(reg) as w:
        await reg.register(replace(inst(f"{svc}-0", svc, app=svc), meta=FrozenDict({META_LOCALITY: "region1/zone2/rack-7"})))
        snap = await w.until(lambda s: ids(s, svc) == [f"{svc}-0"])
        assert snap[svc][0].meta[META_LOCALITY] == "region1/zone2/rack-7"
        await reg.deregister(f"{svc}-0")
    await reg.aclose()
