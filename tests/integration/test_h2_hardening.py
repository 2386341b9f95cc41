"""HTTP/2 hardening as the proxy wires it: the concurrent-stream limit refuses
streams (the connection lives on), a rapid-reset flood (CVE-2023-44487) and a
broken peer get GOAWAY and the connection closed, without hurting other clients."""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.errors
import h2.events
import trio
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from meshctl.model.base import Duration
from meshctl.model.istio import FaultDelay, HTTPFaultInjection, Percent

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, running_proxy, vhost


def _delayed(upstream, seconds: float):
    lp = free_port()
    route = route_to("reviews", 9080, fault=HTTPFaultInjection(
        delay=FaultDelay(fixed_delay=Duration(seconds), percentage=Percent(100.0))))
    cfg = config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route,))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream.port)])],
    )
    return cfg, lp


def _frames(raw: bytes) -> list:
    out = []
    while len(raw) >= 9:
        f, length = Frame.parse_frame_header(memoryview(raw[:9]))
        if len(raw) < 9 + length:
            break
        f.parse_body(memoryview(raw[9:9 + length]))
        raw = raw[9 + length:]
        out.append(f)
    return out


async def _read_until_closed(s: socket.socket, limit: float, done=None) -> tuple[bytes, bool]:
    """Read until the peer closes, ``limit`` seconds pass, or ``done(raw)`` says enough."""
    s.setblocking(False)
    raw = b""
    with trio.move_on_after(limit):
        while done is None or not done(raw):
            await trio.sleep(0.02)
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return raw, True
            if not data:
                return raw, True
            raw += data
    return raw, False


def _client(lp: int):
    s = socket.create_connection(("127.0.0.1", lp))
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return s, c


HDR = [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080"), (":path", "/x")]


async def test_streams_past_the_limit_are_refused_and_the_rest_answered(upstream):
    cfg, lp = _delayed(upstream, 0.5)
    async with running_proxy(cfg):
        s, c = _client(lp)
        # sent before the proxy's SETTINGS (MAX_CONCURRENT_STREAMS 100) can be seen
        for i in range(105):
            c.send_headers(1 + 2 * i, HDR, end_stream=True)
        s.sendall(c.data_to_send())

        def all_answered(raw: bytes) -> bool:  # 100 responses (0.5 s each, concurrently) and 5 refusals
            return sum(isinstance(f, (HeadersFrame, RstStreamFrame)) for f in _frames(raw)) >= 105

        raw, closed = await _read_until_closed(s, 15, all_answered)
        more, _ = await _read_until_closed(s, 0.3)  # anything further (a GOAWAY, an extra answer) shows now
        raw += more
        s.close()
        frames = _frames(raw)
        refused = [f.stream_id for f in frames if isinstance(f, RstStreamFrame)
                   and f.error_code == h2.errors.ErrorCodes.REFUSED_STREAM]
        answered = {f.stream_id for f in frames if isinstance(f, HeadersFrame)}
        assert len(refused) == 5
        assert len(answered) == 100 and not answered & set(refused)
        assert not any(isinstance(f, GoAwayFrame) for f in frames)  # the connection itself is fine
        assert len(upstream.requests) == 100


async def test_rapid_reset_flood_gets_goaway_and_close_other_clients_unaffected(upstream):
    cfg, lp = _delayed(upstream, 2.0)
    async with running_proxy(cfg):
        s, c = _client(lp)
        for i in range(300):
            c.send_headers(1 + 2 * i, HDR, end_stream=True)
            c.reset_stream(1 + 2 * i)
        s.sendall(c.data_to_send())
        raw, closed = await _read_until_closed(s, 3)
        s.close()
        goaways = [f for f in _frames(raw) if isinstance(f, GoAwayFrame)]
        assert closed
        assert goaways and goaways[-1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # nothing of the flood reached the app, and another client is served
        assert len(upstream.requests) == 0
        r = await curl("--http2-prior-knowledge", "--connect-to", f"reviews:9080:127.0.0.1:{lp}", "-s",
                       "-o", "/dev/null", "-w", "%{http_code}", "http://reviews:9080/ok")
        assert r.stdout == b"200"


async def test_protocol_error_closes_the_connection_with_goaway(upstream):
    cfg, lp = _delayed(upstream, 0.0)
    async with running_proxy(cfg):
        s = socket.create_connection(("127.0.0.1", lp))
        # the preface, then a DATA frame on stream 0 (a connection error)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                  + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"x")
        raw, closed = await _read_until_closed(s, 3)
        s.close()
        goaways = [f for f in _frames(raw) if isinstance(f, GoAwayFrame)]
        assert closed
        assert goaways and goaways[-1].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
