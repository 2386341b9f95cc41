"""The embedded registry: persistence, TTL health on trio's clock, watch snapshots."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from meshctl.model.base import FrozenDict
from meshctl.registry import open_registry
from meshctl.registry.base import Instance, RegistryError
from meshctl.registry.embedded import EmbeddedRegistry, load_instances, load_snapshot


def inst(iid: str, service: str = "reviews", port: int = 9080, **labels: str) -> Instance:
    return Instance(id=iid, service=service, address="127.0.0.1", port=port, labels=FrozenDict(labels))


def ids(snapshot, service: str) -> list[str]:
    return [i.id for i in snapshot.get(service, ())]


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_registration_survives_a_new_registry_object(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    await reg.register(inst("reviews-v1-0", version="v1"))
    await reg.register(inst("reviews-v2-0", port=9081, version="v2"))
    await reg.register(inst("ratings-v1-0", service="ratings", port=9090))
    await reg.deregister("reviews-v1-0")

    again = EmbeddedRegistry(tmp_path)
    snap = again.snapshot()
    assert ids(snap, "reviews") == ["reviews-v2-0"]
    assert ids(snap, "ratings") == ["ratings-v1-0"]
    (v2,) = snap["reviews"]
    assert v2.port == 9081 and v2.labels == {"version": "v2"}
    # and the CLI's synchronous reader agrees
    assert load_snapshot(tmp_path) == snap


async def test_file_is_replaced_atomically_and_leaves_no_temp_files(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    for n in range(5):
        await reg.register(inst(f"reviews-v1-{n}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]
    data = json.loads((tmp_path / "registry.json").read_text())
    assert [i["id"] for i in data["instances"]] == [f"reviews-v1-{n}" for n in range(5)]


def test_load_snapshot_of_an_empty_state_dir_is_empty(tmp_path):
    assert load_snapshot(tmp_path) == {}
    assert load_instances(tmp_path) == []


def test_corrupt_file_is_reported_with_its_path(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(RegistryError, match="registry.json is not valid JSON"):
        load_snapshot(tmp_path)
    with pytest.raises(RegistryError, match="registry.json"):
        EmbeddedRegistry(tmp_path)


async def test_ttl_instance_that_is_not_kept_alive_turns_unhealthy(tmp_path, autojump_clock):
    reg = EmbeddedRegistry(tmp_path)
    await reg.register(inst("reviews-v1-0"), ttl=3)
    await reg.register(inst("reviews-v2-0"), ttl=3)
    seen = []
    async with trio.open_nursery() as nursery:

        async def heartbeat():
            while True:
                await reg.keep_alive("reviews-v2-0")
                await trio.sleep(1)

        nursery.start_soon(heartbeat)
        start = trio.current_time()
        async for snap in reg.watch():
            seen.append((trio.current_time() - start, ids(snap, "reviews")))
            if len(seen) == 2:
                break
        nursery.cancel_scope.cancel()
    assert seen[0] == (0, ["reviews-v1-0", "reviews-v2-0"])
    # v1 drops out exactly when its TTL runs out; v2 stays
    assert seen[1] == (3, ["reviews-v2-0"])
    # the expiry is recorded for other processes, and the instance is still known
    assert ids(load_snapshot(tmp_path), "reviews") == ["reviews-v2-0"]
    assert [(i.id, i.healthy) for i in load_instances(tmp_path)] == [
        ("reviews-v1-0", False),
        ("reviews-v2-0", True),
    ]


async def test_keep_alive_brings_an_expired_instance_back(tmp_path, autojump_clock):
    reg = EmbeddedRegistry(tmp_path, default_ttl=2)
    await reg.register(inst("reviews-v1-0"))
    snaps = reg.watch()
    assert ids(await snaps.__anext__(), "reviews") == ["reviews-v1-0"]
    assert ids(await snaps.__anext__(), "reviews") == []  # expired after 2 s
    await reg.keep_alive("reviews-v1-0")
    assert ids(await snaps.__anext__(), "reviews") == ["reviews-v1-0"]
    await snaps.aclose()


async def test_instance_without_ttl_stays_healthy(tmp_path, autojump_clock):
    reg = EmbeddedRegistry(tmp_path)
    await reg.register(inst("reviews-v1-0"))
    snaps = reg.watch()
    assert ids(await snaps.__anext__(), "reviews") == ["reviews-v1-0"]
    with trio.move_on_after(3600) as scope:
        await snaps.__anext__()
    assert scope.cancelled_caught, "no change should have been reported"
    await snaps.aclose()


async def test_watch_reports_register_drain_and_deregister(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    snaps = reg.watch()
    assert await snaps.__anext__() == {}
    await reg.register(inst("reviews-v1-0", version="v1"))
    snap = await snaps.__anext__()
    assert ids(snap, "reviews") == ["reviews-v1-0"]
    assert snap["reviews"][0].labels["version"] == "v1"
    await reg.register(inst("reviews-v2-0", version="v2"))
    assert ids(await snaps.__anext__(), "reviews") == ["reviews-v1-0", "reviews-v2-0"]
    await reg.set_draining("reviews-v1-0")
    assert ids(await snaps.__anext__(), "reviews") == ["reviews-v2-0"]
    assert [(i.id, i.draining) for i in reg.instances()] == [("reviews-v1-0", True), ("reviews-v2-0", False)]
    await reg.deregister("reviews-v1-0")
    await reg.deregister("reviews-v2-0")
    # the last two changes may coalesce; the watcher ends on the current state
    assert ids(await snaps.__anext__(), "reviews") in ([], ["reviews-v2-0"])
    await snaps.aclose()


async def test_two_watchers_both_see_changes(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    a, b = reg.watch(), reg.watch()
    assert await a.__anext__() == {} and await b.__anext__() == {}
    await reg.register(inst("ratings-v1-0", service="ratings"))
    assert ids(await a.__anext__(), "ratings") == ["ratings-v1-0"]
    assert ids(await b.__anext__(), "ratings") == ["ratings-v1-0"]
    await a.aclose()
    await b.aclose()


async def test_unknown_instance_is_an_error_naming_it(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    with pytest.raises(RegistryError, match="no instance 'ghost-0' is registered"):
        await reg.keep_alive("ghost-0")
    with pytest.raises(RegistryError, match="ghost-0"):
        await reg.set_draining("ghost-0")
    await reg.deregister("ghost-0")  # idempotent


async def test_bad_ttl_and_port_are_rejected(tmp_path):
    reg = EmbeddedRegistry(tmp_path)
    with pytest.raises(RegistryError, match="TTL must be a positive number"):
        await reg.register(inst("a-0"), ttl=-1)
    with pytest.raises(RegistryError, match="invalid port 0"):
        await reg.register(inst("a-0", port=0))


def test_open_registry_embedded(tmp_path):
    for url in ("", "embedded", "  embedded "):
        reg = open_registry(url, tmp_path)
        assert isinstance(reg, EmbeddedRegistry)
        assert reg.path == tmp_path / "registry.json"


async def test_expiry_is_seen_without_a_watcher(tmp_path, autojump_clock):
    reg = EmbeddedRegistry(tmp_path)
    await reg.register(inst("reviews-v1-0"), ttl=5)
    await trio.sleep(4)
    assert ids(reg.snapshot(), "reviews") == ["reviews-v1-0"]
    await trio.sleep(2)
    assert ids(reg.snapshot(), "reviews") == []
    assert [(i.id, i.healthy) for i in reg.instances()] == [("reviews-v1-0", False)]
    assert ids(load_snapshot(tmp_path), "reviews") == []


async def test_restarted_owner_gives_ttl_instances_one_fresh_ttl(tmp_path, autojump_clock):
    first = EmbeddedRegistry(tmp_path)
    await first.register(inst("reviews-v1-0"), ttl=5)
    await trio.sleep(3)
    second = EmbeddedRegistry(tmp_path)  # the control plane restarted
    assert ids(second.snapshot(), "reviews") == ["reviews-v1-0"]
    await trio.sleep(4)
    assert ids(second.snapshot(), "reviews") == ["reviews-v1-0"]  # 4 s < one fresh TTL
    await trio.sleep(2)
    assert ids(second.snapshot(), "reviews") == []
