"""The stage chain is built per config snapshot, with only the stages that config
uses (stages.default_chain): a config swap that adds a policy takes effect on
the next request of a connection already open, including a connection of a
listener that the swap moved (it still serves during the drain), and the same
request path without the policy skips the stage.

Over the memory network backend (proxy/testing.py): no sockets, no sleeps.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import trio

from meshctl.model.base import FrozenDict
from meshctl.model.istio import AuthorizationPolicy
from meshctl.model.proxyconfig import Listener, ProxyConfig, Settings, Workload
from meshctl.model.base import Duration
from meshctl.proxy import stages
from meshctl.proxy.runtime import ProxyRuntime
from meshctl.proxy.snapshot import Snapshot
from meshctl.proxy.stats import Stats
from meshctl.proxy.testing import MemoryBackend, request_heads

APP = ("10.0.0.9", 8080)
PORT = 15006


async def _app(stream) -> None:
    async for _ in request_heads(stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")


def _config(port: int = PORT, *, deny_all: bool = False) -> ProxyConfig:
    return ProxyConfig(
        version="deny" if deny_all else "open",
        workload=Workload(name="reviews-0", service="reviews"),
        listeners=(Listener(name="inbound", direction="inbound", address="127.0.0.1", port=port,
                            app_address=APP[0], app_port=APP[1]),),
        # Istio's allow-nothing policy (spec: {}): every request is denied
        authorization=FrozenDict({"default/allow-nothing": AuthorizationPolicy()}) if deny_all else FrozenDict(),
        settings=Settings(drain_timeout=Duration(30.0)),
    )


async def _get(stream) -> int:
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")[1:]
                           if ln.lower().startswith(b"content-length:")), 0)
            if len(rest) >= length:
                return int(head.split(b" ", 2)[1])
        chunk = await stream.receive_some()
        assert chunk, "the proxy closed the connection"
        data += chunk


async def test_a_policy_applied_while_a_connection_is_open_denies_its_next_request(autojump_clock):
    backend = MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        backend.serve(*APP, _app, nursery)
        await nursery.start(partial(rt.run, _config(), handle_signals=False))
        conn = await backend.connect("127.0.0.1", PORT)
        assert await _get(conn) == 200
        rt.apply(_config(deny_all=True))
        assert await _get(conn) == 403  # same keep-alive connection, new snapshot's chain
        rt.apply(_config())
        assert await _get(conn) == 200
        await conn.aclose()
        rt.drain(0)


async def test_a_connection_of_a_moved_listener_gets_the_policy_of_a_later_config(autojump_clock):
    backend = MemoryBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        backend.serve(*APP, _app, nursery)
        await nursery.start(partial(rt.run, _config(), handle_signals=False))
        conn = await backend.connect("127.0.0.1", PORT)
        assert await _get(conn) == 200
        rt.apply(_config(PORT + 1))  # the listener moves; this connection drains on the old one
        assert await _get(conn) == 200
        rt.apply(_config(PORT + 1, deny_all=True))  # a later config, after the old listener left
        assert await _get(conn) == 403
        await conn.aclose()
        rt.drain(0)


def test_the_chain_leaves_out_the_stages_the_config_does_not_use():
    lst = _config().listeners[0]
    plain = stages.default_chain(lst, Snapshot(_config(), Stats()))
    denying = stages.default_chain(lst, Snapshot(_config(deny_all=True), Stats()))
    assert stages.AUTHZ not in plain and stages.AUTHZ in denying
    assert [s for s in denying if s is not stages.AUTHZ] == list(plain)
    traced = Snapshot(replace(_config(), settings=Settings(tracing_zipkin="zipkin://127.0.0.1:9411")), Stats())
    assert stages.TRACE in stages.default_chain(lst, traced) and stages.TRACE not in plain
    assert stages.default_chain(lst) == stages._full_chain(lst)  # no snapshot: every stage


def test_authority_port_of_a_request():
    from meshctl.proxy.stages import _authority_port

    cases = {"backend": 80, "backend:80": 80, "backend:8080": 8080, "[::1]:9": 9, "[::1]": 80, "a:b": 80, "": 80,
             ":": 80, "x:": 80, "h:1:2": 2}
    assert {a: _authority_port(a) for a in cases} == cases
    assert _authority_port("backend", 443) == 443
