"""HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on the same listener,
translated to an HTTP/1.1 app: real curl, h2load and h2-library clients."""

from __future__ import annotations

import json
import re
import socket

import h2.config
import h2.connection
import h2.events
import trio

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, registry_only, route_to, running_proxy, vhost


def _simple(upstream):
    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    return cfg, lp


def _h2curl(lp: int, *args: str):
    return curl("--http2-prior-knowledge", "--connect-to", f"reviews:9080:127.0.0.1:{lp}", *args)


async def test_curl_h2c_and_http11_share_the_listener(upstream):
    cfg, lp = _simple(upstream)
    async with running_proxy(registry_only(cfg)):  # unknown hosts: a local 502
        r = await _h2curl(lp, "-si", "http://reviews:9080/a?b=1", "-H", "x-custom: kept")
        out = r.stdout.decode()
        assert out.startswith("HTTP/2 200"), out
        info = json.loads(out.split("\r\n\r\n", 1)[1])
        assert info["path"] == "/a?b=1"
        seen = dict(info["headers"])
        assert seen["host"] == "reviews:9080"  # :authority became Host for the HTTP/1.1 app
        assert seen["x-custom"] == "kept"
        assert len(seen["x-request-id"]) == 36
        # POST body through HTTP/2 to HTTP/1.1
        r = await _h2curl(lp, "-s", "--data-binary", "hello h2", "http://reviews:9080/p")
        assert json.loads(r.stdout)["body"] == "hello h2"
        # HTTP/1.1 on the same port still works
        r = await curl("-si", "--connect-to", f"reviews:9080:127.0.0.1:{lp}", "http://reviews:9080/h1")
        assert r.stdout.startswith(b"HTTP/1.1 200")
        # a local reply (no route) on HTTP/2
        r = await _h2curl(lp, "-si", "http://nope:9080/", "--connect-to", f"nope:9080:127.0.0.1:{lp}")
        assert r.stdout.startswith(b"HTTP/2 502")
        assert b"x-meshctl-reason: no route" in r.stdout.lower()


async def test_large_bodies_both_ways_over_h2(upstream):
    cfg, lp = _simple(upstream)
    async with running_proxy(cfg):
        n = 20 * 1024 * 1024
        r = await _h2curl(lp, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                          f"http://reviews:9080/download?n={n}")
        assert r.stdout.decode() == f"200 {n}"
        body = b"u" * (5 * 1024 * 1024 + 7)
        r = await trio.run_process(
            ["curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "--connect-to",
             f"reviews:9080:127.0.0.1:{lp}", "--data-binary", "@-", "http://reviews:9080/upload"],
            stdin=body, capture_stdout=True, capture_stderr=True)
        assert json.loads(r.stdout) == {"received": len(body)}


async def test_h2load_many_multiplexed_streams_without_failures(upstream):
    cfg, lp = _simple(upstream)
    async with running_proxy(cfg):
        r = await trio.run_process(
            ["h2load", "-n", "2000", "-c", "4", "-m", "10", "-H", ":authority: reviews:9080",
             f"http://127.0.0.1:{lp}/load"], capture_stdout=True, capture_stderr=True)
        out = r.stdout.decode()
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
        assert m, out
        assert m.group(4) == "2000" and m.group(5) == "0" and m.group(6) == "0", out
        assert "status codes: 2000 2xx" in out, out
    assert len(upstream.requests) == 2000


def _h2_client_socket(lp: int, window: int = 65535):
    s = socket.create_connection(("127.0.0.1", lp))
    s.settimeout(5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window, h2.settings.SettingCodes.ENABLE_PUSH: 0})
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


async def _statuses(s: socket.socket, c: h2.connection.H2Connection, want: set[int]) -> dict[int, str]:
    """Read the (non-blocking) socket until the streams in ``want`` have response heads:
    {stream id: :status} of every head received meanwhile."""
    got: dict[int, str] = {}
    with trio.fail_after(5):
        while not want <= set(got):
            await trio.sleep(0.02)
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            assert data, "proxy closed the connection"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    got[ev.stream_id] = dict(ev.headers)[":status"]
            s.sendall(c.data_to_send())
    return got


async def test_slow_h2_reader_backpressures_the_upstream(upstream):
    """A client that stops reading (no WINDOW_UPDATE) must not make the proxy
    buffer the whole response: the codec's queue stays about one chunk."""
    import h2.settings  # noqa: F401

    cfg, lp = _simple(upstream)
    async with running_proxy(cfg) as rt:
        s, c = _h2_client_socket(lp)
        c.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080"),
                           (":path", "/download?n=104857600")], end_stream=True)
        s.sendall(c.data_to_send())
        got = 0
        s.setblocking(False)
        for _ in range(40):
            await trio.sleep(0.05)
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    got += len(ev.data)
        # only the initial window was sent
        assert got <= 65535
        from meshctl.proxy.h2conn import H2ConnState

        states = [x for x in rt.conns if isinstance(x, H2ConnState)]
        assert len(states) == 1
        queued = states[0].h2.h2.queued(1)
        assert queued <= 2 * 1024 * 1024, queued  # not the 100 MB response
        s.close()
        with trio.fail_after(5):
            while rt.conns:
                await trio.sleep(0.05)


async def test_h2_client_that_does_not_read_its_socket_backpressures_the_upstream(upstream):
    """Windows wide open but the socket not read: the connection's unwritten bytes
    stay bounded (streams wait for the writer past a high-water mark) instead of
    the proxy reading the whole 100 MB response into memory."""
    import h2.settings  # noqa: F401

    cfg, lp = _simple(upstream)
    async with running_proxy(cfg) as rt:
        s, c = _h2_client_socket(lp, window=2**31 - 1)
        c.increment_flow_control_window(2**31 - 1 - 65535)
        c.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080"),
                           (":path", "/download?n=104857600")], end_stream=True)
        s.sendall(c.data_to_send())
        from meshctl.proxy.h2conn import H2ConnState

        await trio.sleep(1.5)  # time enough to read far more than the bound from the upstream
        states = [x for x in rt.conns if isinstance(x, H2ConnState)]
        assert len(states) == 1
        conn = states[0].h2
        assert conn.written < 50 * 1024 * 1024  # the socket took a part only (kernel buffers)
        unwritten = conn.emitted - conn.written
        assert unwritten <= 4 * 1024 * 1024, unwritten  # not the rest of the 100 MB response
        s.close()
        with trio.fail_after(5):
            while rt.conns:
                await trio.sleep(0.05)


async def test_client_reset_cancels_the_stream_only(upstream):
    import h2.settings  # noqa: F401

    cfg, lp = _simple(upstream)
    async with running_proxy(cfg):
        s, c = _h2_client_socket(lp, window=1 << 20)
        hdr = [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080")]
        c.send_headers(1, hdr + [(":path", "/slow?ms=2000")], end_stream=True)
        c.send_headers(3, hdr + [(":path", "/fast")], end_stream=True)
        c.reset_stream(1)
        s.sendall(c.data_to_send())
        s.setblocking(False)
        assert await _statuses(s, c, {3}) == {3: "200"}
        s.close()


async def test_reset_of_a_stream_served_by_a_reused_task(upstream):
    """A stream task serves one stream after another; a reset ends the stream it serves
    then (counted as DC), and the streams that follow on the connection are served."""
    import h2.settings  # noqa: F401

    cfg, lp = _simple(upstream)
    async with running_proxy(cfg) as rt:
        s, c = _h2_client_socket(lp, window=1 << 20)
        s.setblocking(False)
        hdr = [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080")]
        c.send_headers(1, hdr + [(":path", "/fast")], end_stream=True)
        s.sendall(c.data_to_send())
        assert await _statuses(s, c, {1}) == {1: "200"}  # its task now waits for the next stream
        await trio.sleep(0.1)
        seen = len(upstream.requests)
        c.send_headers(3, hdr + [(":path", "/slow?ms=3000")], end_stream=True)
        s.sendall(c.data_to_send())
        with trio.fail_after(5):
            while len(upstream.requests) == seen:  # stream 3 is at the upstream
                await trio.sleep(0.02)
        c.reset_stream(3)
        s.sendall(c.data_to_send())
        with trio.fail_after(2):  # the reset ends the request at once, not when /slow answers
            while rt.stats.flags["DC"] == 0:
                await trio.sleep(0.02)
        for sid in (5, 7):
            c.send_headers(sid, hdr + [(":path", "/fast")], end_stream=True)
        s.sendall(c.data_to_send())
        assert await _statuses(s, c, {5, 7}) == {5: "200", 7: "200"}
        assert rt.stats.flags["DC"] == 1
        s.close()


async def test_drain_sends_goaway_and_lets_open_streams_finish(upstream):
    import h2.settings  # noqa: F401

    cfg, lp = _simple(upstream)
    async with running_proxy(cfg) as rt:
        s, c = _h2_client_socket(lp, window=1 << 20)
        hdr = [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080")]
        c.send_headers(1, hdr + [(":path", "/slow?ms=2000")], end_stream=True)
        s.sendall(c.data_to_send())
        # the stream is open (at the upstream) when the drain starts: waited for, not slept on
        with trio.fail_after(10):
            while not upstream.requests:
                await trio.sleep(0.02)
        rt.drain()
        s.setblocking(False)
        raw = b""
        with trio.fail_after(5):
            while True:
                await trio.sleep(0.02)
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    break
                raw += data
        s.close()
        # h2's own client state machine stops at any GOAWAY; read the frames directly
        from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

        seen = []
        while raw:
            f, length = Frame.parse_frame_header(memoryview(raw[:9]))
            f.parse_body(memoryview(raw[9:9 + length]))
            raw = raw[9 + length:]
            if isinstance(f, GoAwayFrame):
                seen.append(("goaway", f.error_code, f.last_stream_id))
            elif isinstance(f, HeadersFrame) and f.stream_id == 1:
                seen.append("headers")
            elif isinstance(f, DataFrame) and f.stream_id == 1 and "END_STREAM" in f.flags:
                seen.append("end")
        assert seen[0] == ("goaway", 0, 1)  # graceful: NO_ERROR, stream 1 will be answered
        assert seen[1:] == ["headers", "end"]


async def test_upstream_cut_mid_body_resets_the_h2_stream(upstream):
    """An HTTP/1.1 app that dies mid-response: the HTTP/2 client sees its stream
    reset at once (it cannot learn it from a close, the connection is shared)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    app_port = srv.getsockname()[1]

    def serve_one():
        s, _ = srv.accept()
        s.recv(65536)
        s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        s.close()

    lp = free_port()
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", app_port)])],
    )
    async with running_proxy(cfg):
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, serve_one)
            with trio.fail_after(8):
                r = await _h2curl(lp, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                  "http://reviews:9080/cut")
        # curl reports the reset stream (with or without the head seen first), not a complete body
        assert r.returncode == 92, (r.returncode, r.stderr)
        assert b"not closed cleanly" in r.stderr
    srv.close()
