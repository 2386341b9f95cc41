"""Upstream HTTP/2 (h2pool): HTTP/1.1 and HTTP/2 clients reach an HTTP/2-only
app (h2_testkit.H2App, on the h2 library) through the proxy."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trio

from meshctl.model.istio import ConnectionPoolSettings, HTTPSettings, TrafficPolicy

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, running_proxy, vhost

sys.path.insert(0, os.path.dirname(__file__))
from h2_testkit import H2App  # noqa: E402


@pytest.fixture
def h2app():
    apps = []

    def make(**kw):
        a = H2App(**kw)
        apps.append(a)
        return a

    yield make
    for a in apps:
        a.close()


def _cfg(app_port: int, *, protocol: str = "http2", http: HTTPSettings | None = None):
    lp = free_port()
    c = cluster("grpcsvc", 9090, [("127.0.0.1", app_port)], protocol=protocol)
    if http is not None:
        c = dataclasses.replace(c, traffic_policy=TrafficPolicy(connection_pool=ConnectionPoolSettings(http=http)))
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("grpcsvc", 9090, (route_to("grpcsvc", 9090),))],
        clusters=[c],
    )
    return cfg, lp


async def test_http11_client_reaches_http2_only_app_over_one_multiplexed_connection(h2app):
    app = h2app()
    cfg, lp = _cfg(app.port)
    async with running_proxy(cfg):
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as c:
            r = await c.post("http://grpcsvc:9090/echo?x=1", content=b"hi there", headers={"x-custom": "v"})
            assert r.status_code == 200
            assert r.headers["x-app"] == "h2"
            info = r.json()
            assert info["authority"] == "grpcsvc:9090" and info["path"] == "/echo?x=1"
            assert info["body"] == "hi there"
            assert dict(info["headers"])["x-custom"] == "v"
            assert "host" not in dict(info["headers"]) and "connection" not in dict(info["headers"])

            async def one(i: int, results: list) -> None:
                async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{lp}") as cc:
                    rr = await cc.get(f"http://grpcsvc:9090/echo?i={i}")
                    results.append(rr.json()["path"])

            results: list = []
            async with trio.open_nursery() as n:
                for i in range(20):
                    n.start_soon(one, i, results)
            assert sorted(results) == sorted(f"/echo?i={i}" for i in range(20))
    assert app.connections == 1  # every request multiplexed on one upstream connection


async def test_large_response_from_h2_app_with_flow_control(h2app):
    app = h2app()
    cfg, lp = _cfg(app.port)
    async with running_proxy(cfg):
        n = 8 * 1024 * 1024
        r = await curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-x", f"http://127.0.0.1:{lp}",
                       f"http://grpcsvc:9090/download?n={n}")
        assert r.stdout.decode() == f"200 {n}"
        # and to an HTTP/2 client
        r = await curl("--http2-prior-knowledge", "--connect-to", f"grpcsvc:9090:127.0.0.1:{lp}", "-o", "/dev/null",
                       "-w", "%{http_code} %{size_download}", f"http://grpcsvc:9090/download?n={n}")
        assert r.stdout.decode() == f"200 {n}"


async def test_h2_client_to_h2_app_carries_trailers_both_ways(h2app):
    app = h2app()
    cfg, lp = _cfg(app.port)
    async with running_proxy(cfg):
        s = socket.create_connection(("127.0.0.1", lp))
        s.settimeout(5)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        c.initiate_connection()
        c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "grpcsvc:9090"),
                           (":path", "/echo"), ("te", "trailers"), ("x-want-trailers", "1")])
        c.send_data(1, b"body")
        c.send_headers(1, [("x-req-trailer", "t1")], end_stream=True)
        s.sendall(c.data_to_send())
        got: dict = {}
        body = b""
        with trio.fail_after(5):
            while "end" not in got:
                data = await trio.to_thread.run_sync(s.recv, 65536)
                assert data
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        got["head"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        got["trailers"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.StreamEnded):
                        got["end"] = True
                s.sendall(c.data_to_send())
        s.close()
        assert got["head"][":status"] == "200"
        assert got["trailers"] == {"x-trailer": "yes"}
        info = json.loads(body)
        assert info["body"] == "body"
        assert info["trailers"] == [["x-req-trailer", "t1"]]
        assert dict(info["headers"])["te"] == "trailers"


async def test_h2_upgrade_policy_and_use_client_protocol(h2app, upstream):
    app = h2app()
    # an "http" cluster with h2UpgradePolicy UPGRADE goes HTTP/2 upstream
    cfg, lp = _cfg(app.port, protocol="http", http=HTTPSettings(h2_upgrade_policy="UPGRADE"))
    async with running_proxy(cfg):
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "http://grpcsvc:9090/echo")
        assert json.loads(r.stdout)["authority"] == "grpcsvc:9090"
    # useClientProtocol: HTTP/2 clients go HTTP/2 (they reach the h2-only app), HTTP/1.1 ones HTTP/1.1
    # (the h2-only app cannot answer them)
    cfg, lp = _cfg(app.port, protocol="http", http=HTTPSettings(use_client_protocol=True))
    async with running_proxy(cfg):
        r = await curl("-s", "--http2-prior-knowledge", "--connect-to", f"grpcsvc:9090:127.0.0.1:{lp}",
                       "http://grpcsvc:9090/h2")
        assert json.loads(r.stdout)["path"] == "/h2"
        r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                       "http://grpcsvc:9090/h1")
        assert r.stdout in (b"502", b"503")


async def test_refused_stream_is_retried_and_concurrent_stream_limit_respected(h2app):
    app = h2app()
    cfg, lp = _cfg(app.port, http=HTTPSettings(max_concurrent_streams=2))
    async with running_proxy(cfg):
        r = await curl("-s", "-w", " %{http_code}", "-x", f"http://127.0.0.1:{lp}", "http://grpcsvc:9090/refuse?key=a")
        assert r.stdout.endswith(b" 200"), r.stdout
        assert app.hits["a"] == 2  # refused once, retried once

        async def one(i: int) -> None:
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                           f"http://grpcsvc:9090/download?n={4 << 20}")
            codes.append(r.stdout)

        codes: list = []
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(one, i)
        assert codes == [b"200"] * 6
        # maxConcurrentStreams 2: never more than 2 streams on one connection, more connections opened
        assert app.max_open <= 2
        assert app.connections >= 2


async def test_inbound_speaks_http2_to_the_app_only_when_declared_or_grpc(h2app, upstream):
    from meshctl.model.proxyconfig import Listener

    # an HTTP/1.1 app: an h2c client straight to its inbound listener is translated to HTTP/1.1
    in_port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                       app_address="127.0.0.1", app_port=upstream.port, service="grpcsvc")
    async with running_proxy(config(listeners=[inbound])):
        r = await curl("-s", "--http2-prior-knowledge", f"http://127.0.0.1:{in_port}/direct")
        assert json.loads(r.stdout)["path"] == "/direct"
    # the workload's service declared http2: the inbound talks HTTP/2 to its app, even to an HTTP/1.1 client
    app = h2app()
    in_port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                       app_address="127.0.0.1", app_port=app.port, service="grpcsvc")
    declared = config(listeners=[inbound], clusters=[cluster("grpcsvc", 9090, [("127.0.0.1", 1)], protocol="http2")])
    async with running_proxy(declared):
        r = await curl("-s", f"http://127.0.0.1:{in_port}/declared")
        assert json.loads(r.stdout)["path"] == "/declared"


async def test_idle_upstream_connections_are_closed(h2app):
    from meshctl.model.base import Duration
    from meshctl.model.proxyconfig import Settings

    app = h2app()
    cfg, lp = _cfg(app.port)
    cfg = dataclasses.replace(cfg, settings=Settings(connect_timeout=Duration(1.0), idle_timeout=Duration(0.3)))
    async with running_proxy(cfg) as rt:
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "http://grpcsvc:9090/echo")
        assert json.loads(r.stdout)["path"] == "/echo"
        assert sum(len(v) for v in rt.forwarder.h2.pool.conns.values()) == 1
        # closed once idle for 0.3 s: waited for (bounded), not slept on, for a slow machine
        with trio.move_on_after(5):
            while rt.forwarder.h2.pool.conns:
                await trio.sleep(0.05)
        assert rt.forwarder.h2.pool.conns == {}
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "http://grpcsvc:9090/again")  # a new one is opened
        assert json.loads(r.stdout)["path"] == "/again"
    assert app.connections == 2


@pytest.mark.parametrize("path", ["/early", "/early-reset"])
async def test_an_early_answer_from_an_h2_app_is_relayed_and_its_stream_reset(h2app, path):
    """An HTTP/2 app answers a POST completely (END_STREAM) before any of its body came, then
    resets the stream with NO_ERROR (RFC 9113 8.1: "stop sending"), or does not (the reset is
    optional). The HTTP/1.1 client gets the answer, whole and told ``connection: close`` (its
    body is still unsent), not a failure; and when the app did not reset the stream, the
    sidecar does, rather than leave it open, half-closed, on the shared connection (it would
    hold one of the connection's concurrent streams for good)."""
    app = h2app()
    cfg, lp = _cfg(app.port)
    async with running_proxy(cfg):

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", lp), timeout=10) as s:
                s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: grpcsvc:9090\r\ncontent-length: 1048576\r\n\r\n"
                          + b"b" * 65536)  # some of the body: the rest never comes
                got = b""
                while not got.endswith(b"early answer"):
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
                return got

        got = await trio.to_thread.run_sync(client)
        head = got.split(b"\r\n\r\n")[0].lower()
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"early answer"), got
        assert b"connection: close" in head, got
        if path == "/early-reset":
            return  # (the stream is closed: nothing for the sidecar to reset)
        with trio.move_on_after(10):
            while not app.resets:
                await trio.sleep(0.02)
        assert app.resets, "the upstream stream was left open"
