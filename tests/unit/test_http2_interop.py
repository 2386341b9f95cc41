"""The HTTP/2 codec against real HTTP/2 clients over loopback: curl
(--http2-prior-knowledge) and h2load, talking to a tiny trio server built on
H2Server (test-only glue below; the real integration lives in meshctl/proxy)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import trio

from meshctl.protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, Reset, ResponseHead
from meshctl.protocol.http2 import H2Server

BIG = 3 * 1024 * 1024 + 17  # over curl's default stream window: exercises outbound flow control


def _curl_has_http2() -> bool:
    if shutil.which("curl") is None:
        return False
    out = subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout
    return "HTTP2" in out


pytestmark = pytest.mark.skipif(not _curl_has_http2(), reason="curl with HTTP2 support not installed")


async def h2_server(nursery, log) -> int:
    """Echo 'METHOD path body-length authority'; /big answers BIG bytes."""

    async def handle(stream):
        log["connections"] += 1
        server = H2Server()
        reqs: dict[int, list] = {}
        async with stream:
            await stream.send_all(server.initiate())
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    server.feed_eof()
                    return
                try:
                    events = server.feed(data)
                except ProtocolError as exc:
                    log["errors"].append(str(exc))
                    await stream.send_all(server.data_to_send())
                    return
                out = bytearray(server.data_to_send())
                for ev in events:
                    if isinstance(ev, RequestHead):
                        reqs[ev.stream_id] = [ev, 0]
                        log["heads"].append(ev)
                    elif isinstance(ev, Data):
                        reqs[ev.stream_id][1] += len(ev.data)
                        out += server.ack_received(ev.stream_id, len(ev.data))
                    elif isinstance(ev, EndOfMessage):
                        head, n = reqs.pop(ev.stream_id)
                        if head.path == "/big":
                            body = b"b" * BIG
                        else:
                            body = f"{head.method} {head.path} {n} {head.authority}\n".encode()
                        out += server.response_head(ev.stream_id, ResponseHead(
                            200, [("content-type", "text/plain"), ("content-length", str(len(body)))]))
                        out += server.data(ev.stream_id, body, end_stream=True)
                    elif isinstance(ev, Reset):
                        reqs.pop(ev.stream_id, None)
                if out:
                    await stream.send_all(bytes(out))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


async def curl(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process(["curl", "-sS", "--http2-prior-knowledge", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_curl_talks_http2_to_h2server(tmp_path):
    log = {"connections": 0, "heads": [], "errors": []}
    async with trio.open_nursery() as nursery:
        port = await h2_server(nursery, log)
        base = f"http://127.0.0.1:{port}"
        with trio.fail_after(20):
            # (one URL per curl run: curl 7.88 itself fails to reuse a prior-knowledge
            # connection, against nginx too: "Error in the HTTP2 framing layer")
            proc = await curl("-i", f"{base}/a?x=1")
            out = proc.stdout.decode()
            assert proc.returncode == 0, proc.stderr
            assert out.startswith("HTTP/2 200")
            assert out.endswith(f"\r\n\r\nGET /a?x=1 0 127.0.0.1:{port}\n")
            assert log["heads"][0].http_version == "2" and ("accept", "*/*") in log["heads"][0].headers
            # upload larger than the default 64 KiB window
            up = tmp_path / "up"
            up.write_bytes(b"u" * 300_000)
            proc = await curl("--data-binary", f"@{up}", "-H", "X-Test: yes", f"{base}/up")
            assert proc.stdout.decode() == f"POST /up 300000 127.0.0.1:{port}\n", proc.stderr
            assert ("x-test", "yes") in log["heads"][-1].headers
            # download larger than curl's receive window: our send queue drains as curl acks
            dest = tmp_path / "big"
            proc = await curl("-o", str(dest), f"{base}/big")
            assert proc.returncode == 0, proc.stderr
            assert dest.stat().st_size == BIG
        assert log["errors"] == []
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
async def test_h2load_1000_requests_no_failures():
    log = {"connections": 0, "heads": [], "errors": []}
    async with trio.open_nursery() as nursery:
        port = await h2_server(nursery, log)
        with trio.fail_after(60):
            proc = await trio.run_process(
                ["h2load", "-n", "1000", "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/load"],
                capture_stdout=True, capture_stderr=True, check=False)
        out = proc.stdout.decode()
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
        assert m, out
        assert m.group(1, 3, 4, 5, 6) == ("1000", "1000", "1000", "0", "0"), out
        assert "status codes: 1000 2xx" in out
        assert log["connections"] == 4 and log["errors"] == []
        # big responses through small client windows (64 KiB per stream, 256 KiB per
        # connection): the codec's send queues drain only as h2load's WINDOW_UPDATEs come
        with trio.fail_after(60):
            proc = await trio.run_process(
                ["h2load", "-n", "8", "-c", "1", "-m", "4", "-w", "16", "-W", "18", f"http://127.0.0.1:{port}/big"],
                capture_stdout=True, capture_stderr=True, check=False)
        out = proc.stdout.decode()
        assert "8 done, 8 succeeded, 0 failed, 0 errored" in out, out
        m = re.search(r"traffic: .*headers .*\((\d+)\) data", out)
        assert m and int(m.group(1)) == 8 * BIG, out
        nursery.cancel_scope.cancel()
