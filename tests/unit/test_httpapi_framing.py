"""The control plane's HTTP server (meshctl.httpapi) on a real socket: a request it
cannot frame or parse gets a 400 naming what is wrong, not a 413 or a silent close."""

from __future__ import annotations

import json
import socket

import trio

from meshctl import httpapi
from meshctl.pilot.server import body_limit


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


async def _answers(raw: bytes) -> tuple[bytes, dict]:
    hits = []

    async def handler(req: httpapi.Request) -> httpapi.Response:
        hits.append(req.path)
        return httpapi.Response.text("ok")

    async with trio.open_nursery() as n:
        port = await n.start(lambda task_status: httpapi.serve(
            handler, "127.0.0.1", 0, limits=httpapi.Limits(body_limit=body_limit), task_status=task_status))
        data = await trio.to_thread.run_sync(_exchange, port, raw)
        n.cancel_scope.cancel()
    assert hits == []  # never reaches a handler
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body) if body else {}


async def test_transfer_encoding_with_content_length_is_400_naming_the_conflict():
    for method in (b"GET /v1/config HTTP/1.1", b"PUT /v1/proxies/x HTTP/1.1"):
        head, err = await _answers(method + b"\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                                   b"content-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert err["reason"] == "bad-request"
        assert "Transfer-Encoding" in err["error"] and "Content-Length" in err["error"], err


async def test_a_control_byte_in_the_path_or_a_header_is_400_not_a_silent_close():
    for raw in (b"GET /v1/a\x00b HTTP/1.1\r\nhost: x\r\n\r\n",
                b"GET /v1/a\x01b HTTP/1.1\r\nhost: x\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\x00c\r\n\r\n"):
        head, err = await _answers(raw)
        assert head.startswith(b"HTTP/1.1 400 "), (raw, head)
        assert b"connection: close" in head.lower()
        assert err["reason"] == "bad-request" and "malformed request" in err["error"], err


async def test_a_get_is_cancelled_when_its_client_closes_a_change_is_not_and_a_pipelined_request_is_answered():
    # a long poll whose client died must not stay in the server for its whole wait; a change
    # (any other method) runs to its end, or it could be left half done
    started = {"/poll": trio.Event(), "/change": trio.Event()}
    ended, changed = trio.Event(), trio.Event()

    async def handler(req: httpapi.Request) -> httpapi.Response:
        if req.path in started:
            started[req.path].set()
        if req.path == "/poll":
            try:
                await trio.sleep_forever()
            finally:
                ended.set()
        if req.method == "PUT":
            await trio.sleep(0.5)
            changed.set()
        await trio.sleep(0.2)  # (the next request arrives while this one is handled)
        return httpapi.Response.text(req.path)

    async def hang_up_while_handled(port: int, raw: bytes, path: str, then: trio.Event) -> None:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(raw)
        await started[path].wait()
        await client.aclose()
        with trio.fail_after(2):
            await then.wait()

    async with trio.open_nursery() as n:
        port = await n.start(lambda task_status: httpapi.serve(handler, "127.0.0.1", 0, task_status=task_status))
        await hang_up_while_handled(port, b"GET /poll HTTP/1.1\r\nhost: x\r\n\r\n", "/poll", ended)
        await hang_up_while_handled(port, b"PUT /change HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
                                    "/change", changed)
        # bytes arriving while a request is handled are the next request, not a goodbye
        raw = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        data = await trio.to_thread.run_sync(_exchange, port, raw)
        n.cancel_scope.cancel()
    assert data.count(b"HTTP/1.1 200") == 2 and data.endswith(b"/b"), data
