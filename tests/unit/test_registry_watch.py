"""The shared watch machinery of the remote registries (BackgroundWatcher, WatchState)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshctl.model.base import FrozenDict
from meshctl.registry import BackgroundWatcher
from meshctl.registry.base import Instance


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def snap(*ids: str):
    return FrozenDict({"svc": tuple(Instance(id=i, service="svc", address="127.0.0.1", port=1) for i in ids)})


async def test_a_crashing_refresh_loop_is_restarted_and_the_watch_goes_on(autojump_clock):
    runs = []

    async def refresh(state):
        runs.append(trio.current_time())
        if len(runs) == 1:
            state.publish(snap("a"))
            raise KeyError("nonsense from the server")
        state.publish(snap("a", "b"))
        await trio.sleep_forever()

    watcher = BackgroundWatcher("test://registry", refresh)
    snaps = watcher.snapshots()
    assert await snaps.__anext__() == snap("a")
    assert await snaps.__anext__() == snap("a", "b")
    assert len(runs) == 2 and runs[1] > runs[0]  # restarted after a pause
    # the failure was recorded, then cleared by the next successful publish
    assert watcher.state.reachable and watcher.state.last_error == ""
    await snaps.aclose()


async def test_same_snapshot_is_not_yielded_twice_and_failures_keep_the_last_one(autojump_clock):
    gate = trio.Event()

    async def refresh(state):
        state.publish(snap("a"))
        await trio.sleep(1)
        state.fail("test://registry: cannot connect")
        state.publish(snap("a"))  # back, nothing changed
        await gate.wait()
        state.publish(snap("b"))
        await trio.sleep_forever()

    watcher = BackgroundWatcher("test://registry", refresh)
    snaps = watcher.snapshots()
    assert await snaps.__anext__() == snap("a")
    await trio.sleep(2)
    gate.set()
    assert await snaps.__anext__() == snap("b")
    await snaps.aclose()


async def test_loop_stops_when_the_last_watcher_leaves(autojump_clock):
    stopped = trio.Event()

    async def refresh(state):
        try:
            state.publish(snap("a"))
            await trio.sleep_forever()
        finally:
            stopped.set()

    watcher = BackgroundWatcher("test://registry", refresh)
    one, two = watcher.snapshots(), watcher.snapshots()
    await one.__anext__()
    await two.__anext__()
    await one.aclose()
    await trio.sleep(1)
    assert not stopped.is_set()
    await two.aclose()
    with trio.fail_after(1):
        await stopped.wait()
