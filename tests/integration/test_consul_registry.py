"""ConsulRegistry against a real Consul dev agent (started by tests/tools/servers.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import trio

from meshctl.registry import keep_alive_loop, open_registry
from meshctl.registry.base import RegistryError
from meshctl.registry.consul import ConsulRegistry
from tests.tools.watching import ids, inst, unique, watching

pytestmark = pytest.mark.consul

def make(url: str, **kw) -> ConsulRegistry:
    reg = open_registry(url, "/nonexistent-state-dir")
    assert isinstance(reg, ConsulRegistry)
    reg.ttl = kw.get("ttl", 2.0)
    reg.wait = kw.get("wait", 5.0)
    reg._backoff_args = (0.1, 0.5)
    return reg


def consul_put(http: str, path: str, body: dict) -> None:
    req = urllib.request.Request(f"{http}{path}", data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def consul_knows(http: str, service_id: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http}/v1/agent/service/{service_id}", timeout=5) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return False


async def test_register_shows_up_with_labels_and_deregister_removes_it(consul_agent):
    svc = unique("reviews")
    reg = make(consul_agent)
    async with watching(reg) as w:
        await reg.register(inst(f"{svc}-v2-0", svc, 9081, app=svc, version="v2", **{"topology.io/zone": "a"}))
        snap = await w.until(lambda s: ids(s, svc) == [f"{svc}-v2-0"])
        (got,) = snap[svc]
        assert (got.address, got.port) == ("127.0.0.1", 9081)
        # labels survive, including a key that Consul's Meta would not accept
        assert got.labels == {"app": svc, "version": "v2", "topology.io/zone": "a"}
        assert reg.reachable and reg.last_error == ""

        await reg.deregister(f"{svc}-v2-0")
        await w.until(lambda s: svc not in s)
    await reg.aclose()


async def test_missed_ttl_takes_instance_out_and_keep_alive_brings_it_back(consul_agent):
    svc = unique("ratings")
    reg = make(consul_agent, ttl=1.0)
    async with watching(reg) as w, trio.open_nursery() as nursery:
        await reg.register(inst(f"{svc}-v1-0", svc, version="v1"))
        await reg.register(inst(f"{svc}-v1-1", svc, version="v1"))
        await w.until(lambda s: len(ids(s, svc)) == 2)
        nursery.start_soon(keep_alive_loop, reg, f"{svc}-v1-1", 0.3)
        # v1-0 gets no heartbeat: its TTL check goes critical and it leaves the snapshot
        start = trio.current_time()
        await w.until(lambda s: ids(s, svc) == [f"{svc}-v1-1"])
        assert trio.current_time() - start < 8  # the 1 s TTL, with slack for a loaded machine
        await reg.keep_alive(f"{svc}-v1-0")
        await w.until(lambda s: len(ids(s, svc)) == 2)
        nursery.cancel_scope.cancel()
    await reg.deregister(f"{svc}-v1-0")
    await reg.deregister(f"{svc}-v1-1")
    await reg.aclose()


async def test_draining_takes_instance_out_of_rotation(consul_agent):
    svc = unique("details")
    reg = make(consul_agent, ttl=30.0)
    async with watching(reg) as w:
        await reg.register(inst(f"{svc}-0", svc))
        await reg.register(inst(f"{svc}-1", svc))
        await w.until(lambda s: len(ids(s, svc)) == 2)
        await reg.set_draining(f"{svc}-0")
        await w.until(lambda s: ids(s, svc) == [f"{svc}-1"])
        # a heartbeat does not end the drain
        await reg.keep_alive(f"{svc}-0")
        await trio.sleep(1)
        assert ids(w.latest, svc) == [f"{svc}-1"]
    await reg.deregister(f"{svc}-0")
    await reg.deregister(f"{svc}-1")
    await reg.aclose()


async def test_http_check_follows_the_target(consul_agent):
    """An instance registered with an HTTP check is in rotation only while its URL answers 2xx."""
    svc = unique("web")
    reg = make(consul_agent)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def tiny_http(stream):
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    async with watching(reg) as w:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, tiny_http, [listener])
            await reg.register(
                inst(f"{svc}-0", svc, port), http_check_url=f"http://127.0.0.1:{port}/healthz", http_check_interval=0.5
            )
            await w.until(lambda s: ids(s, svc) == [f"{svc}-0"])
            await reg.keep_alive(f"{svc}-0")  # no TTL to pass: just checks the agent still knows it
            nursery.cancel_scope.cancel()
        await listener.aclose()
        await w.until(lambda s: ids(s, svc) == [])  # connection refused → critical
    await reg.deregister(f"{svc}-0")
    await reg.aclose()


async def test_service_registered_directly_in_consul_is_seen(consul_agent):
    svc = unique("legacy")
    consul_put(
        consul_agent.http,
        "/v1/agent/service/register",
        {
            "ID": f"{svc}-a",
            "Name": svc,
            "Address": "127.0.0.2",
            "Port": 7000,
            "Tags": ["primary", "track=stable"],
            "Meta": {"version": "v3"},
        },
    )
    reg = make(consul_agent)
    try:
        async with watching(reg) as w:
            snap = await w.until(lambda s: bool(ids(s, svc)))
            (got,) = snap[svc]
            assert (got.id, got.address, got.port) == (f"{svc}-a", "127.0.0.2", 7000)
            assert got.labels == {"version": "v3", "track": "stable"}
            assert "consul" not in snap  # the agent's own service is not a mesh service
    finally:
        await reg.aclose()
        consul_put(consul_agent.http, f"/v1/agent/service/deregister/{svc}-a", {})


async def test_agent_restart_watch_recovers_and_registration_is_retried(consul_agent):
    """The sidecar side registers and heartbeats; the pilot side watches.
    While the agent is down the watcher keeps its last snapshot and reports
    unreachable; after the (empty) dev agent comes back, the heartbeat
    registers the instance again and the watcher sees it."""
    svc = unique("productpage")
    sidecar = make(consul_agent, ttl=3.0)
    pilot = make(consul_agent)
    async with watching(pilot) as w, trio.open_nursery() as nursery:
        await sidecar.register(inst(f"{svc}-0", svc, version="v1"))
        before = await w.until(lambda s: ids(s, svc) == [f"{svc}-0"])
        nursery.start_soon(keep_alive_loop, sidecar, f"{svc}-0", 0.3)

        await trio.to_thread.run_sync(consul_agent.stop)
        # (a server shutting down may first answer 5xx; then connections are refused)
        with trio.fail_after(10):
            while pilot.reachable or "connection refused" not in pilot.last_error:
                await trio.sleep(0.05)
        assert "cannot connect (connection refused)" in pilot.last_error
        assert consul_agent in pilot.last_error
        # nothing new is yielded while the agent is away; the last snapshot stands
        seen = len(w.history)
        await trio.sleep(1.0)
        assert len(w.history) == seen and w.latest == before
        with pytest.raises(RegistryError, match="is the Consul agent running"):
            await sidecar.keep_alive(f"{svc}-0")

        await trio.to_thread.run_sync(consul_agent.start)
        # the restarted dev agent has an empty catalog: the instance only comes
        # back because the sidecar's heartbeat registers it again
        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(consul_knows, consul_agent.http, f"{svc}-0"):
                await trio.sleep(0.1)
        # (a snapshot equal to the last one is not yielded again: poll the state)
        with trio.fail_after(20):
            while not (pilot.reachable and ids(w.latest, svc) == [f"{svc}-0"]):
                await trio.sleep(0.05)
        after = w.latest
        assert after[svc][0].labels["version"] == "v1"
        assert pilot.reachable and pilot.last_error == ""
        nursery.cancel_scope.cancel()
    await sidecar.deregister(f"{svc}-0")
    await pilot.aclose()
    await sidecar.aclose()


async def test_unreachable_agent_error_names_url_and_cause():
    from tests.tools.servers import free_port

    url = f"consul://127.0.0.1:{free_port()}"
    reg = open_registry(url, "/nonexistent")
    with pytest.raises(RegistryError) as info:
        await reg.ping()
    assert str(info.value).startswith(f"{url}: ")
    assert "cannot connect (connection refused) — is the Consul agent running?" in str(info.value)
    with pytest.raises(RegistryError, match="is the Consul agent running"):
        await reg.register(inst("x-0", "x"))
    assert not reg.reachable and "connection refused" in reg.last_error
    await reg.aclose()


async def test_an_instances_locality_travels_in_its_metadata(consul_agent):
    """Locality load balancing across hosts: each host's instances carry their locality."""
    from dataclasses import replace

    from meshctl.model.base import FrozenDict
    from meshctl.pilot.compile import META_LOCALITY

    svc = unique("helloworld")
    reg = make(consul_agent)
    async with watching(reg) as w:
        await reg.register(replace(inst(f"{svc}-0", svc, app=svc), meta=FrozenDict({META_LOCALITY: "region1/zone2/rack-7"})))
        snap = await w.until(lambda s: ids(s, svc) == [f"{svc}-0"])
        assert snap[svc][0].meta[META_LOCALITY] == "region1/zone2/rack-7"
        await reg.deregister(f"{svc}-0")
    await reg.aclose()
