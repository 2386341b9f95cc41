"""meshctl.plainhttp, the sidecar's HTTP client for Pilot and Citadel, against the
control plane's own server (meshctl.httpapi) on a real socket."""

from __future__ import annotations

import socket

import pytest
import trio

from meshctl import httpapi
from meshctl.plainhttp import HTTPError, HTTPStatusError, PlainHTTPClient


async def _serve(nursery, handler) -> str:
    port = await nursery.start(httpapi.serve, handler, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}"


async def test_json_put_get_post_on_one_kept_alive_connection_with_headers_and_params():
    seen = []

    async def handler(req: httpapi.Request) -> httpapi.Response:
        seen.append((req.method, req.path, dict(req.query), req.headers.get("authorization")))
        if req.path == "/missing":
            return httpapi.Response.json({"error": "no such proxy"}, 404)
        return httpapi.Response.json({"got": req.json()} if req.body else {"version": "v7"})

    async with trio.open_nursery() as n:
        url = await _serve(n, handler)
        async with PlainHTTPClient(headers={"authorization": "Bearer t0k"}) as c:
            local_ports = set()
            r = await c.put(f"{url}/v1/proxies/a", json={"name": "a"})
            assert r.status_code == 200 and r.json() == {"got": {"name": "a"}}
            local_ports.add(c._stream.socket.getsockname()[1])
            r = await c.get(f"{url}/v1/config/a", params={"version": "v1", "wait": "0s"})
            assert r.json() == {"version": "v7"}
            local_ports.add(c._stream.socket.getsockname()[1])
            r = await c.post(f"{url}/missing", json={"version": "v1", "error": "bad"})
            local_ports.add(c._stream.socket.getsockname()[1])
            assert r.status_code == 404 and "no such proxy" in r.text
            with pytest.raises(HTTPStatusError) as e:
                r.raise_for_status()
            assert e.value.response.status_code == 404
        n.cancel_scope.cancel()
    assert seen == [
        ("PUT", "/v1/proxies/a", {}, "Bearer t0k"),
        ("GET", "/v1/config/a", {"version": "v1", "wait": "0s"}, "Bearer t0k"),
        ("POST", "/missing", {}, "Bearer t0k"),
    ]
    assert len(local_ports) == 1  # one kept-alive connection for all three


async def test_a_long_poll_waits_past_the_timeout_when_reads_are_unbounded():
    async def handler(req: httpapi.Request) -> httpapi.Response:
        await trio.sleep(3.0)
        return httpapi.Response.json({"version": "v2"})

    # the timeout (1 s) well apart from the answer's 3 s: a loaded machine cannot blur the two
    async with trio.open_nursery() as n:
        url = await _serve(n, handler)
        async with PlainHTTPClient(timeout=1.0, read_timeout=None) as c:
            assert (await c.get(f"{url}/v1/config/a")).json() == {"version": "v2"}
        async with PlainHTTPClient(timeout=1.0) as c:
            with pytest.raises(HTTPError, match="no answer within 1.0s"):
                await c.get(f"{url}/v1/config/a")
        n.cancel_scope.cancel()


async def test_a_kept_alive_connection_the_server_closed_is_replaced_once():
    # a bare server: answers one request per connection, then closes it (keep-alive announced)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []

    async def server() -> None:
        lsock = trio.socket.from_stdlib_socket(listener)
        while True:
            s, _ = await lsock.accept()
            accepted.append(s)
            data = b""
            while b"\r\n\r\n" not in data:
                data += await s.recv(4096)
            await s.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await trio.sleep(0.05)
            s.close()

    async with trio.open_nursery() as n:
        n.start_soon(server)
        async with PlainHTTPClient(timeout=2) as c:
            for _ in range(3):
                assert (await c.get(f"http://127.0.0.1:{port}/x")).json() == {}
                await trio.sleep(0.2)  # the server has closed the kept-alive connection by now
        n.cancel_scope.cancel()
    assert len(accepted) == 3


async def test_what_cannot_be_answered_is_an_http_error_naming_why():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    async with PlainHTTPClient(timeout=2) as c:
        with pytest.raises(HTTPError, match="cannot connect"):
            await c.get(f"http://127.0.0.1:{free}/")
        with pytest.raises(HTTPError, match="only http://"):
            await c.get("https://127.0.0.1:1/")
