"""The codec against real HTTP implementations over real loopback sockets:
curl as the client of an H1Server, Python's http.server as the upstream of an H1Client."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import trio

from meshctl.protocol.events import Data, EndOfMessage, RequestHead, Reset, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


async def echo_server(nursery, log):
    """Answer each request with 'METHOD path body-length' (chunked, or close-delimited for 1.0)."""

    async def handle(stream):
        log["connections"] += 1
        server = H1Server()
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                events = server.feed(data) if data else server.feed_eof()
                for ev in events:
                    if isinstance(ev, RequestHead):
                        head, size = ev, 0
                        log["heads"].append(ev)
                        if ev.expect_continue:
                            await stream.send_all(server.informational(ResponseHead(100, [])))
                    elif isinstance(ev, Data):
                        size += len(ev.data)
                    elif isinstance(ev, EndOfMessage):
                        body = f"{head.method} {head.path} {size}\n".encode()
                        out = server.response_head(ResponseHead(200, [("content-type", "text/plain")]))
                        await stream.send_all(out + server.data(body) + server.end())
                        if not server.keep_alive:
                            return
                if not data:
                    return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


async def curl(*args: str) -> str:
    proc = await trio.run_process(["curl", "-sS", "--http1.1", *args], capture_stdout=True, capture_stderr=True)
    return proc.stdout.decode()


async def test_curl_requests_through_h1server(tmp_path):
    log = {"connections": 0, "heads": []}
    async with trio.open_nursery() as nursery:
        port = await echo_server(nursery, log)
        base = f"http://127.0.0.1:{port}"
        # two requests on one kept-alive connection
        out = await curl(f"{base}/a?x=1", f"{base}/b")
        assert out == "GET /a?x=1 0\nGET /b 0\n"
        assert log["connections"] == 1
        # chunked upload with Expect: 100-continue
        big = tmp_path / "big"
        big.write_bytes(b"z" * 300_000)
        out = await curl("-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                         "--data-binary", f"@{big}", f"{base}/up")
        assert out == "POST /up 300000\n"
        assert log["heads"][-1].expect_continue
        # HEAD: headers only, and curl does not wait for a body
        with trio.fail_after(5):
            out = await curl("-I", f"{base}/h")
        assert out.startswith("HTTP/1.1 200 OK\r\n") and "transfer-encoding" not in out.lower()
        # HTTP/1.0 client: close-delimited body
        out = await curl("-0", f"{base}/old")
        assert out == "GET /old 0\n"
        # through curl's proxy mode: absolute-form target
        out = await curl("-x", base, "http://reviews:9080/p")
        assert out == "GET /p 0\n"
        assert log["heads"][-1].authority == "reviews:9080"
        nursery.cancel_scope.cancel()


async def test_h1client_against_python_http_server(tmp_path):
    (tmp_path / "f.txt").write_bytes(b"file body\n")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                task_status=task_status,
                check=False,
            )
        )
        try:
            stream = None
            with trio.fail_after(10):
                while stream is None:
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        await trio.sleep(0.05)

            async def exchange(stream, method, path):
                client = H1Client()
                await stream.send_all(
                    client.request_head(RequestHead(method, path, [], authority=f"127.0.0.1:{port}", path=path),
                                        end_stream=True))
                events = []
                while not events or not isinstance(events[-1], (EndOfMessage, Reset)):
                    data = await stream.receive_some(65536)
                    events += client.feed(data) if data else client.feed_eof()
                return client, events

            with trio.fail_after(10):
                client, events = await exchange(stream, "GET", "/f.txt")
                assert events[0].status == 200 and events[0].http_version == "1.0"
                assert b"".join(e.data for e in events if isinstance(e, Data)) == b"file body\n"
                assert not client.keep_alive  # HTTP/1.0 server without keep-alive
                await stream.aclose()

                stream = await trio.open_tcp_stream("127.0.0.1", port)
                client, events = await exchange(stream, "HEAD", "/f.txt")
                assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
                assert ("content-length", "10") in events[0].headers
                await stream.aclose()
        finally:
            proc.terminate()
