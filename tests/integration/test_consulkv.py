"""ConsulKV against a real Consul dev agent (tests/tools/servers.py): get/put with
check-and-set, delete, prefix listing, blocking queries, transactions, errors."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import trio

from meshctl.registry.consulkv import (AsyncConsulKV, ConsulKV, KVError, KVUnavailable, TxnOp, next_index)
from tests.tools.servers import free_port

pytestmark = pytest.mark.consul


def prefix() -> str:
    return f"meshctl-test/{uuid.uuid4().hex[:10]}/"


def test_put_get_and_missing_key(consul_agent):
    kv, p = ConsulKV.from_url(consul_agent), prefix()
    assert kv.get(p + "nothing") is None
    assert kv.put(p + "a", "héllo") is True
    e = kv.get(p + "a")
    assert e is not None and e.value == "héllo".encode() and e.text == "héllo" and e.modify_index > 0
    assert kv.put(p + "b", b"\x00\xffbinary")
    assert kv.get(p + "b").value == b"\x00\xffbinary"


def test_check_and_set_refuses_a_stale_index(consul_agent):
    kv, p = ConsulKV.from_url(consul_agent), prefix()
    key = p + "current"
    assert kv.put(key, "1", cas=0) is True  # 0: only if absent
    assert kv.put(key, "x", cas=0) is False  # it exists now
    first = kv.get(key)
    assert kv.put(key, "2", cas=first.modify_index) is True
    # a writer that read before the change loses, and nothing is written
    assert kv.put(key, "3", cas=first.modify_index) is False
    assert kv.get(key).text == "2"
    assert kv.delete(key, cas=first.modify_index) is False
    assert kv.get(key) is not None
    assert kv.delete(key, cas=kv.get(key).modify_index) is True
    assert kv.get(key) is None


def test_list_and_keys_stay_inside_the_prefix(consul_agent):
    kv, p = ConsulKV.from_url(consul_agent), prefix()
    sibling = p.rstrip("/") + "-other/"
    for k in ("r/1", "r/2", "faults"):
        kv.put(p + k, k)
    kv.put(sibling + "r/1", "not mine")
    assert sorted(e.key for e in kv.list(p)) == [p + "faults", p + "r/1", p + "r/2"]
    assert kv.keys(p + "r/") == [p + "r/1", p + "r/2"]
    assert kv.list(p + "none/") == [] and kv.keys(p + "none/") == []
    kv.delete_prefix(p)
    assert kv.list(p) == []
    assert [e.text for e in kv.list(sibling)] == ["not mine"]
    with pytest.raises(KVError, match="empty prefix"):
        kv.delete_prefix("")


def test_blocking_get_returns_on_change_and_after_wait(consul_agent):
    kv, p = ConsulKV.from_url(consul_agent), prefix()
    key = p + "watched"
    kv.put(key, "v1")
    index, e = kv.get_blocking(key, 0, wait=5)  # index 0: answers at once
    assert e.text == "v1" and index > 0
    # nothing changes: held for about `wait`, same index back
    t0 = time.monotonic()
    again, e2 = kv.get_blocking(key, index, wait=1)
    assert 0.8 < time.monotonic() - t0 < 4 and again == index and e2.text == "v1"
    # a write from elsewhere wakes the query well before its wait
    timer = threading.Timer(0.5, lambda: ConsulKV.from_url(consul_agent).put(key, "v2"))
    timer.start()
    t0 = time.monotonic()
    newer, e3 = kv.get_blocking(key, index, wait=20)
    timer.join()
    assert time.monotonic() - t0 < 5 and newer > index and e3.text == "v2"


def test_transaction_is_all_or_nothing(consul_agent):
    kv, p = ConsulKV.from_url(consul_agent), prefix()
    kv.put(p + "current", "1")
    cur = kv.get(p + "current")
    ok = kv.txn([TxnOp.cas(p + "rev/2", "two", 0), TxnOp.cas(p + "current", "2", cur.modify_index),
                 TxnOp.set(p + "note", "x")])
    assert ok is True
    assert kv.get(p + "current").text == "2" and kv.get(p + "rev/2").text == "two" and kv.get(p + "note").text == "x"
    # a second writer with the old index: none of its operations land
    lost = kv.txn([TxnOp.cas(p + "rev/3", "three", 0), TxnOp.cas(p + "current", "3", cur.modify_index),
                   TxnOp.delete(p + "note")])
    assert lost is False
    assert kv.get(p + "rev/3") is None and kv.get(p + "current").text == "2" and kv.get(p + "note") is not None
    assert kv.txn([TxnOp.check_not_exists(p + "rev/2")]) is False
    assert kv.txn([TxnOp.check_index(p + "rev/2", kv.get(p + "rev/2").modify_index), TxnOp.delete(p + "rev/2")])
    assert kv.get(p + "rev/2") is None


def test_unreachable_agent_is_kv_unavailable_naming_it():
    port = free_port()
    kv = ConsulKV.from_url(f"consul://127.0.0.1:{port}?token=s3cret", request_timeout=2)
    with pytest.raises(KVUnavailable) as info:
        kv.get("meshctl/x")
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "cannot connect" in msg and "s3cret" not in msg
    with pytest.raises(KVError, match="relative"):
        kv.get("/absolute")
    with pytest.raises(KVError, match="not a Consul URL"):
        ConsulKV.from_url("eureka://127.0.0.1:8761/eureka")


def test_next_index_follows_consuls_rules():
    assert next_index(0, "15") == 15
    assert next_index(15, 15) == 15
    assert next_index(15, 20) == 20
    assert next_index(20, 3) == 0  # went backwards: the agent's state was reset
    assert next_index(0, 0) == 1  # never block on index 0


async def test_async_list_blocking_wakes_on_a_put(consul_agent):
    kv, p = AsyncConsulKV(ConsulKV.from_url(consul_agent)), prefix()
    await kv.put(p + "a", "1")
    index, items = await kv.list_blocking(p, 0, wait=5)
    assert [e.text for e in items] == ["1"]
    got: list = []

    async def watch() -> None:
        got.append(await kv.list_blocking(p, index, wait=20))

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        await trio.sleep(0.3)
        assert not got
        assert await kv.put(p + "b", "2")
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.05)
    new_index, items = got[0]
    assert new_index > index and sorted(e.text for e in items) == ["1", "2"]
    # cancelling a blocking query does not hang
    with trio.move_on_after(0.2) as scope:
        await kv.list_blocking(p, new_index, wait=30)
    assert scope.cancelled_caught
