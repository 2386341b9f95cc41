"""The proxy's DNS cache: TTLs from DNS answers, refreshed off the request path.

core/dnscache.py with an injected clock; proxy/dns.py against a real DNS server
(a few lines of dnspython on a local UDP port) and the system resolver."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rrset
import pytest
import trio

from meshctl.core.dnscache import DnsCache
from meshctl.proxy import dns as pdns


def test_ttls_are_the_answers_clamped_and_names_without_one_get_the_default():
    c = DnsCache(min_ttl=1, max_ttl=300, default_ttl=5)
    assert c.put("a.example", ("10.0.0.1",), 30, now=0).expires == 30
    assert c.put("b.example", ("10.0.0.2",), 0, now=0).expires == 1
    assert c.put("c.example", ("10.0.0.3",), 86400, now=0).expires == 300
    assert c.put("localhost", ("127.0.0.1",), None, now=0).expires == 5
    assert c.due(4) == ["b.example"]
    assert sorted(c.due(31)) == ["a.example", "b.example", "localhost"]


def test_an_expired_name_is_still_served_and_a_failed_refresh_keeps_the_last_answer():
    c = DnsCache(negative_ttl=5)
    c.put("a.example", ("10.0.0.1",), 10, now=0)
    assert c.get("a.example", now=20) == ("10.0.0.1",)  # past its TTL: served while the refresh is due
    c.fail("a.example", "SERVFAIL", now=20)
    assert c.get("a.example", now=21) == ("10.0.0.1",)
    assert c.due(22) == [] and c.due(25) == ["a.example"]  # retried after negative_ttl
    c.put("a.example", ("10.0.0.9",), 10, now=25)
    assert c.get("a.example", now=26) == ("10.0.0.9",)


def test_unused_names_are_dropped_and_the_cache_is_bounded():
    c = DnsCache(idle=60, max_entries=2)
    c.put("a", ("1.1.1.1",), 10, now=0)
    c.put("b", ("1.1.1.2",), 10, now=0)
    c.get("a", now=5)
    c.put("c", ("1.1.1.3",), 10, now=6)  # full: the least recently used (b) goes
    assert set(c.entries) == {"a", "c"}
    assert c.due(100) == [] and c.entries == {}


@pytest.fixture
def dns_server():
    """A real DNS server on a local UDP port: svc.test. A 10.9.8.7 with TTL 7."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            name = q.question[0].name
            if str(name) == "svc.test." and q.question[0].rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(name, 7, "IN", "A", "10.9.8.7"))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(r.to_wire(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join()
    sock.close()


async def test_the_ttl_comes_from_the_dns_answer(dns_server):
    assert await pdns.dns_ttl("svc.test", ["127.0.0.1"], dns_server) == 7.0
    assert await pdns.dns_ttl("nothing.test", ["127.0.0.1"], dns_server) is None


async def test_names_are_resolved_once_then_refreshed_in_the_background():
    pdns.CACHE.entries.pop("localhost", None)
    infos = await pdns.lookup("localhost", 8080)
    assert ("127.0.0.1", 8080) in [addr for _, addr in infos]
    e = pdns.CACHE.entries["localhost"]
    e.expires = trio.current_time()  # its TTL has run out: the refresher resolves it again
    with trio.move_on_after(15):  # bounded wait for the background refresh, generous for a slow machine
        async with trio.open_nursery() as n:
            n.start_soon(pdns.refresh)
            while pdns.CACHE.entries["localhost"].expires <= trio.current_time():
                await trio.sleep(0.05)
            n.cancel_scope.cancel()
    assert pdns.CACHE.entries["localhost"].expires > trio.current_time()
    assert "127.0.0.1" in pdns.CACHE.entries["localhost"].addresses


def test_resolution_dns_takes_each_address_in_turn_and_dns_round_robin_the_first():
    c = DnsCache()
    c.put("multi", ("10.0.0.1", "10.0.0.2", "10.0.0.3"), 30, now=0.0)
    assert [c.pick("multi", 1.0, spread=True) for _ in range(4)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert {c.pick("multi", 1.0, spread=False) for _ in range(3)} == {"10.0.0.1"}
    # a new answer: DNS_ROUND_ROBIN follows its first address
    c.put("multi", ("10.0.0.9", "10.0.0.1"), 30, now=40.0)
    assert c.pick("multi", 41.0, spread=False) == "10.0.0.9"
    assert c.pick("unknown", 1.0, spread=True) is None
