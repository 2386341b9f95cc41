"""The rule store and the injected faults in Consul KV (pilot/kvstore.py), against the
suite's real Consul agent: revisions, history cap, rollback, check-and-set under
concurrent writers (threads, and two `meshctl route apply` processes of two "hosts"),
prefixes per mesh, the blocking-query watch and Consul going away."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio

from meshctl.loader.resources import load_resources
from meshctl.pilot.faults import new_fault
from meshctl.pilot.kvstore import (ConsulFaultStore, ConsulRuleStore, kv_prefix, open_fault_store, open_rule_store,
                                   read_location, record_location)
from meshctl.pilot.store import RuleStore, StoreError
from meshctl.registry import Backoff
from meshctl.registry.consulkv import ConsulKV

pytestmark = pytest.mark.consul

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {host}, subset: {subset}}}
"""


def vs(tmp: Path, name: str, host: str = "reviews", subset: str = "v1"):
    f = tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(VS.format(name=name, host=host, subset=subset))
    return load_resources([f])


def mesh_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def store(url: str, mid: str, sd: Path | None = None, **kw) -> ConsulRuleStore:
    return ConsulRuleStore(ConsulKV.from_url(url), kv_prefix(mid), state_dir=sd, **kw)


def test_apply_delete_rollback_and_history_live_in_consul(consul_agent, tmp_path):
    mid = mesh_id()
    s = store(consul_agent, mid)
    assert s.current().number == 0 and s.history() == []
    rev, changes = s.apply(vs(tmp_path, "reviews"))
    assert rev.number == 1 and [c.action for c in changes] == ["created"]
    rev, changes = s.apply(vs(tmp_path, "reviews"))
    assert rev.number == 1 and [c.action for c in changes] == ["unchanged"]  # no empty revision
    rev, _ = s.apply(vs(tmp_path, "reviews", subset="v2"))
    assert rev.number == 2
    rev, changes = s.delete([("virtualservice", "default", "reviews")])
    assert rev.number == 3 and rev.resources == () and [c.action for c in changes] == ["deleted"]
    # another client (another host) sees the same store
    other = store(consul_agent, mid)
    assert [r.number for r in other.history()] == [1, 2, 3]
    back = other.rollback(2)
    assert back.number == 4 and back.change == "rollback to revision 2"
    assert s.current().resources[0].spec.http[0].route[0].destination.subset == "v2"
    # the keys are where the docs say, under the mesh's prefix
    kv = ConsulKV.from_url(consul_agent)
    assert kv.get(f"meshctl/{mid}/rules/current").text == "4"
    assert kv.get(f"meshctl/{mid}/rules/revisions/000004") is not None
    with pytest.raises(StoreError, match="no revision 9"):
        s.rollback(9)


def test_history_keeps_the_last_revisions_only(consul_agent, tmp_path):
    s = store(consul_agent, mesh_id(), keep=3)
    for i in range(6):
        s.apply(vs(tmp_path, f"r{i}"))
    assert [r.number for r in s.history()] == [4, 5, 6]
    with pytest.raises(StoreError, match="revision 2 was pruned: the history keeps the last 3"):
        s.read(2)
    assert len(s.current().resources) == 6


def test_two_meshes_on_one_consul_never_mix(consul_agent, tmp_path):
    a, b = store(consul_agent, mesh_id()), store(consul_agent, mesh_id())
    a.apply(vs(tmp_path, "only-in-a"))
    assert b.current().number == 0 and b.history() == []
    assert [r.name for r in a.current().resources] == ["only-in-a"]


def test_concurrent_writers_lose_no_apply(consul_agent, tmp_path):
    """Six writers (two "hosts" × three threads) apply 5 rules each at once: every
    rule is in the end result, and each lands in a revision of its own."""
    mid = mesh_id()
    files = {(w, i): vs(tmp_path, f"w{w}-r{i}") for w in range(6) for i in range(5)}
    hosts = [store(consul_agent, mid), store(consul_agent, mid)]
    start = threading.Barrier(6)
    errors: list = []

    def writer(w: int) -> None:
        s = hosts[w % 2]
        start.wait()
        try:
            for i in range(5):
                s.apply(files[(w, i)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    cur = hosts[0].current()
    assert cur.number == 30
    assert sorted(r.name for r in cur.resources) == sorted(f"w{w}-r{i}" for w in range(6) for i in range(5))
    hist = hosts[1].history()
    assert [r.number for r in hist] == list(range(1, 31))
    assert all(len(b.resources) == len(a.resources) + 1 for a, b in zip(hist, hist[1:]))


def test_two_route_apply_commands_on_two_hosts_at_once(consul_agent, tmp_path):
    """`meshctl route apply` from two state directories (two hosts) of one mesh, ten at once."""
    mid = mesh_id()
    dirs = []
    for h in ("host-a", "host-b"):
        sd = tmp_path / h / ".meshctl"
        record_location(sd, str(consul_agent), mid)
        dirs.append(sd)
    procs = []
    for i in range(10):
        f = tmp_path / f"vs{i}.yaml"
        f.write_text(VS.format(name=f"svc{i}", host=f"svc{i}", subset="v1"))
        procs.append(subprocess.Popen([sys.executable, "-m", "meshctl", "route", "apply", "-f", str(f),
                                       "--state-dir", str(dirs[i % 2])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "created" in out
    s = open_rule_store(dirs[0])
    assert isinstance(s, ConsulRuleStore)
    assert sorted(r.name for r in s.current().resources) == sorted(f"svc{i}" for i in range(10))
    assert [r.number for r in s.history()] == list(range(1, 11))
    # `route get` and `route history` on the other host read the same
    get = subprocess.run([sys.executable, "-m", "meshctl", "route", "get", "--state-dir", str(dirs[1])],
                         capture_output=True, text=True, timeout=60)
    assert get.returncode == 0 and "svc9" in get.stdout and "revision 10" in get.stdout


def test_location_selection_follows_the_registry(consul_agent, tmp_path):
    sd = tmp_path / ".meshctl"
    assert isinstance(open_rule_store(sd), RuleStore)  # nothing recorded: files
    record_location(sd, str(consul_agent), "m1", token="tok")
    assert read_location(sd)["prefix"] == "meshctl/m1/"
    assert (sd / "rules-location.json").stat().st_mode & 0o077 == 0  # it may hold a token
    assert isinstance(open_rule_store(sd), ConsulRuleStore) and isinstance(open_fault_store(sd), ConsulFaultStore)
    record_location(sd, "embedded", "m1")
    assert isinstance(open_rule_store(sd), RuleStore)
    with pytest.raises(StoreError, match="not a mesh id"):
        record_location(sd, str(consul_agent), "bad/id")


def test_route_apply_with_consul_away_fails_clearly(tmp_path):
    from tests.tools.servers import free_port

    sd = tmp_path / ".meshctl"
    record_location(sd, f"consul://127.0.0.1:{free_port()}", "m")
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(name="x", host="x", subset="v1"))
    r = subprocess.run([sys.executable, "-m", "meshctl", "route", "apply", "-f", str(f), "--state-dir", str(sd)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "rules in Consul KV" in r.stderr and "cannot connect" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


async def test_watch_follows_applies_and_survives_consul_going_away(consul_agent, tmp_path):
    mid = mesh_id()
    writer = store(consul_agent, mid)
    watcher = store(consul_agent, mid, tmp_path / "b")
    await trio.to_thread.run_sync(writer.apply, vs(tmp_path, "first"))
    seen: list = []

    async def follow() -> None:
        async for rev in watcher.watch(backoff=Backoff(0.1, 0.5), wait=8.0):
            seen.append(rev)

    async def until(pred, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.05)

    async with trio.open_nursery() as n:
        n.start_soon(follow)
        await until(lambda: [r.number for r in seen] == [1])
        await trio.to_thread.run_sync(writer.apply, vs(tmp_path, "second"))
        t0 = trio.current_time()
        await until(lambda: [r.number for r in seen] == [1, 2])
        assert trio.current_time() - t0 < 4  # a blocking query, not a poll at its 8 s wait; slack for load
        # the copy this host keeps for a restart while Consul is away
        assert [r.name for r in watcher.last_known().resources] == ["first", "second"]

        await trio.to_thread.run_sync(consul_agent.stop)
        try:
            await until(lambda: not watcher.reachable)
            assert "cannot connect" in watcher.last_error
            await trio.sleep(1.0)
            assert [r.number for r in seen] == [1, 2]  # nothing new, nothing dropped
        finally:
            await trio.to_thread.run_sync(consul_agent.start)
        # a dev agent comes back empty: the rules in force stay until rules are applied again
        await until(lambda: watcher.reachable)
        await trio.sleep(0.5)
        assert [r.number for r in seen] == [1, 2]
        await trio.to_thread.run_sync(writer.apply, vs(tmp_path, "after"))
        await until(lambda: len(seen) == 3)
        assert [r.name for r in seen[-1].resources] == ["after"]
        n.cancel_scope.cancel()


async def test_faults_are_shared_and_expire_by_their_stored_time(consul_agent, tmp_path):
    mid = mesh_id()
    a = ConsulFaultStore(ConsulKV.from_url(consul_agent), kv_prefix(mid))
    b = ConsulFaultStore(ConsulKV.from_url(consul_agent), kv_prefix(mid), state_dir=tmp_path)
    now = time.time()
    f = new_fault(id="f1", service="reviews.default.svc.cluster.local", now=now, abort=503, ttl="2s")
    a.add(f, now)
    got = b.load()
    assert [x.id for x in got] == ["f1"] and got[0].expires == pytest.approx(now + 2)
    with pytest.raises(Exception, match="already exists"):
        b.add(f, now)
    seen: list = []

    async def follow() -> None:
        async for faults in b.watch(wait=2.0):
            seen.append([x.id for x in faults])

    async with trio.open_nursery() as n:
        n.start_soon(follow)
        with trio.fail_after(10):
            while seen != [["f1"]]:
                await trio.sleep(0.05)
        g = new_fault(id="f2", service="ratings.default.svc.cluster.local", now=now, delay="1s")
        await trio.to_thread.run_sync(a.add, g, time.time())
        with trio.fail_after(10):
            while seen[-1] != ["f1", "f2"]:
                await trio.sleep(0.05)
        # pruning at a time after f1's expiry drops it for everyone
        assert await trio.to_thread.run_sync(a.prune, now + 3)
        with trio.fail_after(10):
            while seen[-1] != ["f2"]:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert [x.id for x in b.last_known()] == ["f2"]
    removed = b.remove(lambda x: x.id == "f2", time.time())
    assert [x.id for x in removed] == ["f2"] and a.load() == []
