"""HTTP/2 codec: an H2Client's bytes fed to an H2Server and back, in memory.

Hardening cases (floods, rapid reset, oversized headers) drive the server with
frames crafted with hyperframe/hpack, as a hostile client would send them."""

from __future__ import annotations

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshctl.protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, Reset, ResponseHead
from meshctl.protocol.http2 import (
    GoAway,
    H2Client,
    H2Limits,
    H2Reset,
    H2Server,
    WindowUpdated,
    h1_head_to_h2,
    h2_head_to_h1,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7
CANCEL = 0x8


def frames(data: bytes) -> list[Frame]:
    """Parse a byte string of HTTP/2 frames (no preface)."""
    out = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        out.append(f)
        data = data[9 + length :]
    return out


def goaway_of(data: bytes) -> GoAwayFrame:
    gs = [f for f in frames(data) if isinstance(f, GoAwayFrame)]
    assert gs, "no GOAWAY was sent"
    return gs[-1]


class Pair:
    """A client and a server codec joined back to back."""

    def __init__(self, server_limits: H2Limits = H2Limits(), client_limits: H2Limits = H2Limits(),
                 now=None, connect: bool = True) -> None:
        self.s = H2Server(server_limits, now=now)
        self.c = H2Client(client_limits)
        self.to_s = bytearray(self.c.initiate())
        self.to_c = bytearray(self.s.initiate())
        if connect:
            self.pump()

    def req(self, path="/", method="GET", headers=(), end_stream=True, authority="svc:80") -> int:
        head = RequestHead(method, path, list(headers), authority=authority, path=path)
        sid, out = self.c.request(head, end_stream=end_stream)
        self.to_s += out
        return sid

    def pump(self) -> tuple[list, list]:
        """Shuttle bytes both ways until quiet: (server events, client events)."""
        sev, cev = [], []
        while self.to_s or self.to_c:
            if self.to_s:
                data = bytes(self.to_s)
                self.to_s.clear()
                sev += self.s.feed(data)
                self.to_c += self.s.data_to_send()
            if self.to_c:
                data = bytes(self.to_c)
                self.to_c.clear()
                cev += self.c.feed(data)
                self.to_s += self.c.data_to_send()
        return sev, cev


def by_type(events, cls, sid=None):
    return [e for e in events if isinstance(e, cls) and (sid is None or e.stream_id == sid)]


def body(events, sid) -> bytes:
    return b"".join(e.data for e in by_type(events, Data, sid))


# ---------------------------------------------------------------- round trips
def test_get_round_trip_maps_pseudo_headers_to_head_fields():
    p = Pair()
    sid = p.req("/reviews/1?x=2", headers=[("User-Agent", "t"), ("accept", "*/*")])
    sev, _ = p.pump()
    head, end = sev
    assert isinstance(head, RequestHead) and isinstance(end, EndOfMessage)
    assert (head.method, head.path, head.target, head.authority, head.scheme) == (
        "GET", "/reviews/1?x=2", "/reviews/1?x=2", "svc:80", "http")
    assert head.http_version == "2" and head.stream_id == sid == end.stream_id
    assert head.headers == [("user-agent", "t"), ("accept", "*/*")]  # lower-case, no pseudo-headers
    p.to_c += p.s.response_head(sid, ResponseHead(200, [("content-type", "text/plain"), ("Connection", "keep-alive")]))
    p.to_c += p.s.data(sid, b"hello", end_stream=True)
    _, cev = p.pump()
    rh = cev[0]
    assert isinstance(rh, ResponseHead) and rh.status == 200 and rh.stream_id == sid
    assert rh.headers == [("content-type", "text/plain")]  # connection-specific field dropped
    assert body(cev, sid) == b"hello" and isinstance(cev[-1], EndOfMessage)
    assert p.s.open_streams == 0 and p.c.open_streams == 0


def test_post_with_body_and_trailers_both_ways():
    p = Pair()
    sid = p.req("/upload", method="POST", headers=[("content-type", "application/grpc"), ("te", "trailers")],
                end_stream=False)
    p.to_s += p.c.data(sid, b"a" * 40000)
    p.to_s += p.c.end(sid, [("x-checksum", "abc")])
    sev, _ = p.pump()
    assert sev[0].method == "POST" and ("te", "trailers") in sev[0].headers
    assert body(sev, sid) == b"a" * 40000
    assert sev[-1] == EndOfMessage([("x-checksum", "abc")], sid)
    p.to_c += p.s.response_head(sid, ResponseHead(200, [("content-type", "application/grpc")]))
    p.to_c += p.s.data(sid, b"\0\0\0\0\x02hi")
    p.to_c += p.s.end(sid, [("grpc-status", "0"), ("grpc-message", "ok")])
    _, cev = p.pump()
    assert body(cev, sid) == b"\0\0\0\0\x02hi"
    assert cev[-1] == EndOfMessage([("grpc-status", "0"), ("grpc-message", "ok")], sid)


def test_per_request_ids_stay_out_of_the_hpack_table_and_repeated_fields_are_indexed():
    # x-request-id (and trace ids) differ in every request: indexed, each would push out
    # entries the next requests reuse; coded never-indexed, the second request's repeated
    # fields cost one byte each
    from hpack import Decoder

    p = Pair()
    dec = Decoder()
    sizes = []
    for i in range(2):
        rid = f"{i:08d}-9b2f-4c3e-8d1a-0123456789ab"
        head = RequestHead("POST", "/pkg.Svc/Call", [("content-type", "application/grpc"), ("x-request-id", rid),
                                                     ("traceparent", f"00-{i:032x}-{i:016x}-01"), ("x-app", "v1")],
                           authority="svc:80", path="/pkg.Svc/Call")
        _, out = p.c.request(head, end_stream=True)
        (hf,) = [f for f in frames(out) if isinstance(f, HeadersFrame)]
        fields = dec.decode(hf.data)
        assert ("x-request-id", rid) in fields
        sizes.append(len(hf.data))
    entries = [bytes(n).decode() for n, _ in dec.header_table.dynamic_entries]
    assert "x-request-id" not in entries and "traceparent" not in entries
    assert "x-app" in entries and "content-type" in entries
    assert sizes[1] < sizes[0]


def test_output_fields_are_checked_and_classed_every_time_not_only_when_first_seen():
    # names and values are remembered once checked (the per-request cost of sending
    # them): a remembered name or value must not carry a later field past its checks
    from hpack import Decoder, NeverIndexedHeaderTuple

    p = Pair()
    dec = Decoder()

    def send(headers):
        head = RequestHead("GET", "/", headers, authority="svc:80", path="/")
        _, out = p.c.request(head, end_stream=True)
        (hf,) = [f for f in frames(out) if isinstance(f, HeadersFrame)]
        return dec.decode(hf.data)

    for _ in range(2):
        got = send([("X-App", " token-1 "), ("Connection", "close"), ("te", "trailers"), ("Host", "svc:80")])
        assert got[-2:] == [("x-app", "token-1"), ("te", "trailers")]
        assert not isinstance(got[-2], NeverIndexedHeaderTuple)
        # the same value under a name sent never-indexed stays never-indexed
        got = send([("Authorization", "token-1"), ("cookie", "a=1"), ("cookie", "b=" + "x" * 30)])
        assert got[-3:] == [("authorization", "token-1"), ("cookie", "a=1"), ("cookie", "b=" + "x" * 30)]
        assert [isinstance(f, NeverIndexedHeaderTuple) for f in got[-3:]] == [True, True, False]
    for bad in ([("X-App", "token-1\r\nx-evil: 1")], [("authorization", "a\nb")], [("x-app", "caf\u20ac")],
                [(":path", "/admin")], [("", "v")], [("x-\u00e9", "v")]):
        with pytest.raises(ValueError):
            p.c.request(RequestHead("GET", "/", bad, authority="svc:80", path="/"), end_stream=True)


def test_many_interleaved_streams_keep_their_own_bodies():
    p = Pair()
    sids = [p.req(f"/s/{i}", method="PUT", end_stream=False) for i in range(60)]
    for rnd in range(3):
        for i, sid in enumerate(sids):
            p.to_s += p.c.data(sid, f"{i}:{rnd};".encode())
    for sid in sids:
        p.to_s += p.c.end(sid)
    sev, _ = p.pump()
    assert [h.path for h in by_type(sev, RequestHead)] == [f"/s/{i}" for i in range(60)]
    for i, sid in enumerate(sids):
        got = body(sev, sid)
        assert got == f"{i}:0;{i}:1;{i}:2;".encode()
        p.to_c += p.s.ack_received(sid, len(got))
    # answer in reverse order, interleaving the bodies
    for sid in reversed(sids):
        p.to_c += p.s.response_head(sid, ResponseHead(200, []))
    for sid in sids:
        p.to_c += p.s.data(sid, b"r%d" % sid, end_stream=True)
    _, cev = p.pump()
    assert sorted(h.stream_id for h in by_type(cev, ResponseHead)) == sorted(sids)
    for sid in sids:
        assert body(cev, sid) == b"r%d" % sid
    assert p.s.open_streams == 0 and p.c.open_streams == 0


def test_interim_1xx_heads_before_the_final_one():
    p = Pair()
    sid = p.req("/big", method="POST", headers=[("expect", "100-continue")], end_stream=False)
    sev, _ = p.pump()
    assert sev[0].expect_continue
    p.to_c += p.s.response_head(sid, ResponseHead(100, []))
    p.to_c += p.s.response_head(sid, ResponseHead(103, [("link", "</a.css>; rel=preload")]))
    p.to_c += p.s.response_head(sid, ResponseHead(204, []), end_stream=True)
    _, cev = p.pump()
    assert [h.status for h in by_type(cev, ResponseHead)] == [100, 103, 204]
    assert by_type(cev, ResponseHead)[1].headers == [("link", "</a.css>; rel=preload")]
    sid = p.req("/ws")
    p.pump()
    with pytest.raises(ValueError):  # 101 does not exist in HTTP/2
        p.s.response_head(sid, ResponseHead(101, []))


# ---------------------------------------------------------------- flow control
def test_server_that_does_not_ack_stops_the_client_after_the_stream_window():
    lim = H2Limits(initial_window_size=65535 * 2)
    p = Pair(server_limits=lim)
    sid = p.req("/up", method="POST", end_stream=False)
    total = 400_000
    p.to_s += p.c.data(sid, b"x" * total, end_stream=True)
    sev, _ = p.pump()
    assert len(body(sev, sid)) == 65535 * 2  # exactly the advertised stream window
    assert p.c.send_window(sid) == 0 and p.c.queued(sid) == total - 65535 * 2
    assert not by_type(sev, EndOfMessage)
    got = len(body(sev, sid))
    # the server consumes what it got: the window opens and more flows
    p.to_c += p.s.ack_received(sid, got)
    sev, _ = p.pump()
    more = len(body(sev, sid))
    assert 0 < more <= 65535 * 2
    got += more
    while not by_type(sev, EndOfMessage):
        p.to_c += p.s.ack_received(sid, more)
        sev, _ = p.pump()
        more = len(body(sev, sid))
        got += more
    assert got == total


def test_window_updated_event_when_a_blocked_stream_has_room_again():
    lim = H2Limits(initial_window_size=65535)
    p = Pair(server_limits=lim)
    sid = p.req("/up", method="POST", end_stream=False)
    p.to_s += p.c.data(sid, b"y" * 70000)
    sev, cev = p.pump()
    assert len(body(sev, sid)) == 65535 and p.c.send_window(sid) == 0
    assert not by_type(cev, WindowUpdated)
    p.to_c += p.s.ack_received(sid, 65535)
    sev, cev = p.pump()
    assert len(body(sev, sid)) == 70000 - 65535
    assert by_type(cev, WindowUpdated) == [WindowUpdated(sid)]
    assert p.c.send_window(sid) > 0 and p.c.queued(sid) == 0


def test_response_larger_than_the_client_window_completes_as_the_client_acks():
    p = Pair(client_limits=H2Limits(initial_window_size=65535, connection_window=65535))
    sid = p.req("/big")
    p.pump()
    size = 300_000
    p.to_c += p.s.response_head(sid, ResponseHead(200, [("content-length", str(size))]))
    p.to_c += p.s.data(sid, b"B" * size, end_stream=True)
    _, cev = p.pump()
    got = len(body(cev, sid))
    assert got == 65535 and p.s.queued(sid) == size - 65535 and p.s.open_streams == 1
    while not by_type(cev, EndOfMessage):
        p.to_s += p.c.ack_received(sid, len(body(cev, sid)))
        _, cev = p.pump()
        got += len(body(cev, sid))
    assert got == size
    assert p.s.open_streams == 0 and p.c.open_streams == 0


def test_connection_window_caps_all_streams_together():
    lim = H2Limits(initial_window_size=1 << 20, connection_window=2 << 20)
    p = Pair(server_limits=lim)
    sids = [p.req(f"/{i}", method="POST", end_stream=False) for i in range(4)]
    for sid in sids:
        p.to_s += p.c.data(sid, b"z" * (1 << 20))
    sev, _ = p.pump()
    assert sum(len(e.data) for e in by_type(sev, Data)) == 2 << 20
    for sid in sids:  # acking everything lets the rest through
        p.to_c += p.s.ack_received(sid, len(body(sev, sid)))
    sev2, _ = p.pump()
    assert sum(len(e.data) for e in by_type(sev + sev2, Data)) == 4 << 20


# ---------------------------------------------------------------- resets
def test_reset_by_the_client_reaches_the_server_and_frees_the_stream():
    p = Pair()
    sid = p.req("/slow")
    p.pump()
    p.to_s += p.c.reset(sid)
    sev, _ = p.pump()
    (r,) = sev
    assert isinstance(r, Reset) and r.stream_id == sid and r.error_code == CANCEL
    assert p.s.open_streams == 0
    # the proxy races the reset: writing to the dead stream is a no-op, not a crash
    assert isinstance(p.s.response_head(sid, ResponseHead(200, [])), bytes)
    assert isinstance(p.s.data(sid, b"late"), bytes)


def test_reset_by_the_server_reaches_the_client():
    p = Pair()
    sid = p.req("/x", method="POST", end_stream=False)
    p.to_s += p.c.data(sid, b"abc")
    p.pump()
    p.to_c += p.s.reset(sid, "upstream failed", error_code=0x2)
    _, cev = p.pump()
    (r,) = cev
    assert isinstance(r, H2Reset) and r.stream_id == sid and r.error_code == 0x2 and not r.refused
    assert p.c.open_streams == 0 and p.s.open_streams == 0


def test_feed_eof_resets_every_open_stream():
    p = Pair()
    a, b = p.req("/a"), p.req("/b")
    p.pump()
    assert {r.stream_id for r in p.s.feed_eof()} == {a, b}
    assert p.s.open_streams == 0


# ---------------------------------------------------------------- GOAWAY
def test_graceful_goaway_lets_in_flight_streams_finish_and_refuses_later_ones():
    p = Pair()
    a, b = p.req("/a"), p.req("/b")
    p.pump()
    late = p.req("/late")  # on the wire while the server decides to drain
    p.to_c += p.s.goaway()
    sev, cev = p.pump()
    assert not by_type(sev, RequestHead)  # the late stream never reaches the app
    (ga,) = by_type(cev, GoAway)
    assert ga.last_stream_id == b and ga.error_code == 0
    (refused,) = by_type(cev, Reset)
    assert refused.stream_id == late and refused.refused
    assert not p.c.can_open_stream and not p.c.keep_alive and not p.s.keep_alive
    for sid in (a, b):
        p.to_c += p.s.response_head(sid, ResponseHead(200, []))
        p.to_c += p.s.data(sid, b"done", end_stream=True)
    _, cev = p.pump()
    assert body(cev, a) == body(cev, b) == b"done"
    assert p.s.open_streams == 0 and p.s.closed


def test_client_honours_an_upstream_goaway():
    p = Pair()
    a, b = p.req("/a"), p.req("/b")
    p.pump()
    p.to_c += GoAwayFrame(0, last_stream_id=a, error_code=0).serialize()
    _, cev = p.pump()
    assert by_type(cev, GoAway) == [GoAway(a, 0, b"")]
    (r,) = by_type(cev, Reset)
    assert r.stream_id == b and r.refused
    # stream a still completes after the GOAWAY
    p.to_c += p.s.response_head(a, ResponseHead(200, []), end_stream=True)
    _, cev = p.pump()
    assert by_type(cev, ResponseHead)[0].stream_id == a and by_type(cev, EndOfMessage)
    with pytest.raises(RuntimeError):
        p.req("/c")


def test_non_graceful_goaway_stops_the_codec():
    p = Pair()
    p.req("/a")
    p.pump()
    out = p.s.goaway(graceful=False)
    assert goaway_of(out).error_code == 0 and goaway_of(out).last_stream_id == 1
    assert p.s.closed and p.s.open_streams == 0
    assert p.s.feed(PingFrame(0).serialize()) == []


# ---------------------------------------------------------------- hardening
def test_streams_past_max_concurrent_streams_are_refused_not_fatal():
    p = Pair(server_limits=H2Limits(max_concurrent_streams=2), connect=False)
    # three requests before the server's SETTINGS arrive (the default limit is unbounded)
    sids = [p.req(f"/{i}") for i in range(3)]
    sev, cev = p.pump()
    assert [h.stream_id for h in by_type(sev, RequestHead)] == sids[:2]
    (r,) = by_type(cev, Reset)
    assert r.stream_id == sids[2] and r.refused
    assert p.s.refused_streams == 1
    # the client now knows the limit
    assert not p.c.can_open_stream
    p.to_c += p.s.response_head(sids[0], ResponseHead(200, []), end_stream=True)
    p.pump()
    assert p.c.can_open_stream
    sid = p.req("/again")
    sev, _ = p.pump()
    assert by_type(sev, RequestHead)[0].stream_id == sid


def test_header_list_too_big_gets_431_and_the_connection_goes_on():
    p = Pair()
    sid = p.req("/big", headers=[("x-big", "v" * 70_000)])
    sev, cev = p.pump()
    (r,) = sev
    assert isinstance(r, Reset) and "431" in r.reason and r.stream_id == sid
    assert by_type(cev, ResponseHead)[0].status == 431 and by_type(cev, EndOfMessage)
    # too many fields, under the byte limit
    sid = p.req("/many", headers=[(f"x-h{i}", "1") for i in range(101)])
    sev, cev = p.pump()
    assert by_type(cev, ResponseHead, sid)[0].status == 431
    # HPACK state is intact: the next request is fine
    sid = p.req("/ok", headers=[("x-small", "1")])
    sev, _ = p.pump()
    assert by_type(sev, RequestHead)[0].headers == [("x-small", "1")]
    assert p.s.open_streams == 1


def test_header_block_far_over_the_limit_is_fatal():
    p = Pair()
    p.req("/huge", headers=[("x-huge", "v" * 200_000)])
    with pytest.raises(ProtocolError):
        p.pump()
    assert goaway_of(p.s.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_upstream_response_headers_too_big_reset_the_stream():
    p = Pair(client_limits=H2Limits(max_header_list_size=4096))
    sid = p.req("/")
    p.pump()
    p.to_c += p.s.response_head(sid, ResponseHead(200, [("x-big", "v" * 5000)]), end_stream=True)
    _, cev = p.pump()
    (r,) = cev
    assert isinstance(r, Reset) and r.stream_id == sid and "over the limit of 4096" in r.reason
    assert p.c.open_streams == 0


def raw_client(server: H2Server) -> None:
    """Connection preface + empty SETTINGS, as any client starts."""
    server.feed(PREFACE + SettingsFrame(0).serialize())
    server.data_to_send()


def request_block(enc: Encoder, path: str = "/") -> bytes:
    return enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path)])


def test_rapid_reset_gets_goaway_enhance_your_calm():
    clock = [100.0]
    server = H2Server(H2Limits(rapid_reset_threshold=5, rapid_reset_window=10.0), now=lambda: clock[0])
    raw_client(server)
    enc = Encoder()
    sid = 1

    def open_and_cancel() -> list:
        nonlocal sid
        data = HeadersFrame(sid, request_block(enc), flags=["END_HEADERS", "END_STREAM"]).serialize()
        data += RstStreamFrame(sid, error_code=CANCEL).serialize()
        sid += 2
        return server.feed(data)

    for _ in range(5):
        evs = open_and_cancel()
        assert isinstance(evs[-1], Reset)
        clock[0] += 0.1
    with pytest.raises(ProtocolError, match="rapid reset"):
        open_and_cancel()
    g = goaway_of(server.data_to_send())
    assert g.error_code == ENHANCE_YOUR_CALM
    with pytest.raises(ProtocolError):  # the connection stays dead
        server.feed(PingFrame(0).serialize())


def test_opening_streams_past_the_limit_again_and_again_counts_as_rapid_reset():
    server = H2Server(H2Limits(max_concurrent_streams=1, rapid_reset_threshold=5), now=lambda: 0.0)
    raw_client(server)
    enc = Encoder()
    server.feed(HeadersFrame(1, request_block(enc), flags=["END_HEADERS"]).serialize())
    for sid in range(3, 13, 2):  # 5 refusals: tolerated
        assert server.feed(HeadersFrame(sid, request_block(enc), flags=["END_HEADERS"]).serialize()) == []
        rst = [f for f in frames(server.data_to_send()) if isinstance(f, RstStreamFrame)]
        assert [(f.stream_id, f.error_code) for f in rst] == [(sid, REFUSED_STREAM)]
    with pytest.raises(ProtocolError, match="rapid reset"):
        server.feed(HeadersFrame(13, request_block(enc), flags=["END_HEADERS"]).serialize())
    assert goaway_of(server.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_resets_spread_over_time_or_after_a_response_do_not_count():
    clock = [0.0]
    server = H2Server(H2Limits(rapid_reset_threshold=3, rapid_reset_window=1.0), now=lambda: clock[0])
    raw_client(server)
    enc = Encoder()
    for i in range(10):  # slow resets: one per 0.5 s, never more than 2 in a window
        sid = 2 * i + 1
        server.feed(HeadersFrame(sid, request_block(enc), flags=["END_HEADERS"]).serialize()
                    + RstStreamFrame(sid, error_code=CANCEL).serialize())
        clock[0] += 0.5
    for i in range(10, 20):  # answered before the client resets: not premature
        sid = 2 * i + 1
        server.feed(HeadersFrame(sid, request_block(enc), flags=["END_HEADERS"]).serialize())
        server.response_head(sid, ResponseHead(200, []))
        server.feed(RstStreamFrame(sid, error_code=CANCEL).serialize())
    server.data_to_send()
    evs = server.feed(HeadersFrame(41, request_block(enc, "/alive"), flags=["END_HEADERS"]).serialize())
    assert evs[0].path == "/alive"


def test_ping_flood_is_fatal_when_acks_pile_up():
    server = H2Server(H2Limits(max_queued_control_frames=100))
    raw_client(server)
    pings = b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(60))
    server.feed(pings)
    assert len([f for f in frames(server.data_to_send()) if isinstance(f, PingFrame)]) == 60
    server.feed(pings)  # 60 more after the first ACKs were taken: fine
    with pytest.raises(ProtocolError, match="flood"):
        server.feed(pings)
    out = frames(server.data_to_send())
    assert not [f for f in out if isinstance(f, PingFrame)]  # the queued ACKs are dropped
    assert goaway_of(b"".join(f.serialize() for f in out)).error_code == ENHANCE_YOUR_CALM


def test_settings_flood_is_fatal_too():
    server = H2Server(H2Limits(max_queued_control_frames=50))
    raw_client(server)
    with pytest.raises(ProtocolError, match="flood"):
        server.feed(SettingsFrame(0).serialize() * 51)
    assert goaway_of(server.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_pings_past_the_window_budget_are_fatal_even_when_their_acks_are_taken():
    clock = [100.0]
    server = H2Server(H2Limits(max_inbound_control_frames_per_window=50, control_frame_window=10.0),
                      now=lambda: clock[0])
    raw_client(server)  # (its SETTINGS is the window's first control frame)
    for i in range(49):
        server.feed(PingFrame(0, opaque_data=b"%08d" % i).serialize())
        assert server.data_to_send()  # the ACK, taken at once
    clock[0] += 11.0  # a new window
    for i in range(50):
        server.feed(PingFrame(0, opaque_data=b"%08d" % i).serialize())
        server.data_to_send()
    with pytest.raises(ProtocolError, match="PING flood"):
        server.feed(PingFrame(0, opaque_data=b"x" * 8).serialize())
    assert goaway_of(server.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_a_ping_per_call_that_answers_our_data_is_not_a_flood():
    # grpc-go's bandwidth estimator: a client that gets DATA pings once (with a connection
    # WINDOW_UPDATE), ahead of its next call; a busy connection sends one per call
    server = H2Server(H2Limits(max_inbound_control_frames_per_window=50), now=lambda: 100.0)
    raw_client(server)
    enc = Encoder()
    for n in range(300):
        sid = 2 * n + 1
        wire = HeadersFrame(sid, request_block(enc), flags=["END_HEADERS", "END_STREAM"]).serialize()
        if n:
            wire = (WindowUpdateFrame(0, window_increment=15).serialize()
                    + PingFrame(0, opaque_data=b"bdp-ping").serialize() + wire)
        head = server.feed(wire)[0]
        assert isinstance(head, RequestHead) and head.stream_id == sid
        wire = server.response_head(sid, ResponseHead(200, [("content-type", "application/grpc")]))
        wire += server.data(sid, b"\x00\x00\x00\x00\x0ahello grpc")
        wire += server.end(sid, [("grpc-status", "0")]) + server.data_to_send()
        acks = [f for f in frames(wire) if isinstance(f, PingFrame) and "ACK" in f.flags]
        assert len(acks) == (1 if n else 0)
    # bare PINGs, with no DATA of ours between them, still count: the budget is there
    with pytest.raises(ProtocolError, match="PING flood"):
        for i in range(51):
            server.feed(PingFrame(0, opaque_data=b"%08d" % i).serialize())
            server.data_to_send()


def test_empty_data_frame_flood_gets_goaway():
    server = H2Server()
    raw_client(server)
    server.feed(HeadersFrame(1, request_block(Encoder()), flags=["END_HEADERS"]).serialize())
    assert server.feed(DataFrame(1, b"").serialize() + DataFrame(1, b"x").serialize()) == [Data(b"x", 1)]
    assert server.feed(DataFrame(1, b"").serialize()) == []  # one in a row is tolerated
    with pytest.raises(ProtocolError, match="empty DATA"):
        server.feed(DataFrame(1, b"").serialize())
    assert goaway_of(server.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_continuation_flood_gets_goaway():
    server = H2Server(H2Limits(max_continuation_frames=32))
    raw_client(server)
    data = HeadersFrame(1, b"", flags=[]).serialize()
    data += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(33))
    with pytest.raises(ProtocolError, match="CONTINUATION"):
        server.feed(data)
    assert goaway_of(server.data_to_send()).error_code == ENHANCE_YOUR_CALM


def test_header_block_split_over_the_allowed_continuations_is_accepted():
    server = H2Server(H2Limits(max_continuation_frames=32))
    raw_client(server)
    block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                              (":path", "/split"), ("x-a", "b" * 300)])
    n = len(block)
    parts = [block[i * n // 33 : (i + 1) * n // 33] for i in range(33)]
    assert len(parts) == 33
    data = HeadersFrame(1, parts[0], flags=["END_STREAM"]).serialize()
    for i, part in enumerate(parts[1:]):
        data += ContinuationFrame(1, part, flags=["END_HEADERS"] if i == len(parts) - 2 else []).serialize()
    evs = server.feed(data)
    assert evs[0].path == "/split" and evs[0].headers == [("x-a", "b" * 300)]


def test_malformed_header_block_is_a_connection_error():
    server = H2Server()
    raw_client(server)
    block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                              (":path", "/"), ("X-Upper", "1")])
    with pytest.raises(ProtocolError) as ei:
        server.feed(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert ei.value.status == 400
    assert goaway_of(server.data_to_send()).error_code == 0x1  # PROTOCOL_ERROR


_GOOD_REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]


@pytest.mark.parametrize("fields", [
    pytest.param(_GOOD_REQUEST + [("x-upper", "1"), ("X-Upper", "1")], id="uppercase name after a valid one"),
    pytest.param(_GOOD_REQUEST + [("", "1")], id="empty name"),
    pytest.param(_GOOD_REQUEST + [("x-a ", "1")], id="whitespace after a name"),
    pytest.param(_GOOD_REQUEST + [("x-a", " 1")], id="whitespace before a value"),
    pytest.param(_GOOD_REQUEST + [("x-a", "1\t")], id="whitespace after a value"),
    pytest.param(_GOOD_REQUEST + [("connection", "close")], id="connection"),
    pytest.param(_GOOD_REQUEST + [("transfer-encoding", "chunked")], id="transfer-encoding"),
    pytest.param(_GOOD_REQUEST + [("te", "gzip")], id="te other than trailers"),
    pytest.param(_GOOD_REQUEST + [("x-a", "1"), (":foo", "x")], id="pseudo-header after a regular field"),
    pytest.param(_GOOD_REQUEST + [(":path", "/again")], id="duplicate pseudo-header"),
    pytest.param(_GOOD_REQUEST + [(":foo", "x")], id="unknown pseudo-header"),
    pytest.param(_GOOD_REQUEST + [(":status", "200")], id="response pseudo-header in a request"),
    pytest.param(_GOOD_REQUEST + [(":protocol", "websocket")], id=":protocol without CONNECT"),
    pytest.param(_GOOD_REQUEST[1:], id="no :method"),
    pytest.param([f for f in _GOOD_REQUEST if f[0] != ":path"], id="no :path"),
    pytest.param([f for f in _GOOD_REQUEST if f[0] != ":scheme"], id="no :scheme"),
    pytest.param([f if f[0] != ":path" else (":path", "") for f in _GOOD_REQUEST], id="empty :path"),
    pytest.param([f for f in _GOOD_REQUEST if f[0] != ":authority"], id="no :authority nor host"),
    pytest.param(_GOOD_REQUEST + [("host", "b")], id=":authority and host disagree"),
])
def test_each_malformed_request_block_is_a_connection_error(fields):
    # h2's inbound validation rules (RFC 9113 8.2-8.3), which the codec checks itself in one pass
    server = H2Server()
    raw_client(server)
    ok = Encoder().encode(_GOOD_REQUEST + [("x-upper", "1"), ("host", "a")])
    evs = server.feed(HeadersFrame(1, ok, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert by_type(evs, RequestHead)[0].headers == [("x-upper", "1"), ("host", "a")]
    server.data_to_send()
    with pytest.raises(ProtocolError) as ei:
        server.feed(HeadersFrame(3, Encoder().encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert ei.value.status == 400
    assert goaway_of(server.data_to_send()).error_code == 0x1  # PROTOCOL_ERROR


def test_malformed_trailers_and_responses_are_connection_errors():
    # trailers with a pseudo-header (server side)
    server = H2Server()
    raw_client(server)
    enc = Encoder()
    server.feed(HeadersFrame(1, enc.encode(_GOOD_REQUEST), flags=["END_HEADERS"]).serialize())
    with pytest.raises(ProtocolError):
        server.feed(HeadersFrame(1, enc.encode([(":path", "/x")]), flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert goaway_of(server.data_to_send()).error_code == 0x1
    # responses (client side): no :status; a request pseudo-header in a response
    for block in ([("content-type", "text/plain")], [(":status", "200"), (":path", "/")]):
        client = H2Client()
        client.initiate()
        client.feed(SettingsFrame(0).serialize())
        sid, _ = client.request(RequestHead("GET", "/", [], authority="a", path="/"), end_stream=True)
        with pytest.raises(ProtocolError) as ei:
            client.feed(HeadersFrame(sid, Encoder().encode(block), flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert ei.value.status == 502
        assert goaway_of(client.data_to_send()).error_code == 0x1
    # and a valid response with trailers still passes
    p = Pair()
    sid = p.req()
    sev, _ = p.pump()
    p.to_c += p.s.response_head(sid, ResponseHead(200, [("content-type", "text/plain")]))
    p.to_c += p.s.data(sid, b"hi") + p.s.end(sid, [("grpc-status", "0")])
    _, cev = p.pump()
    assert by_type(cev, ResponseHead)[0].status == 200
    assert by_type(cev, EndOfMessage)[0].trailers == [("grpc-status", "0")]


def test_padding_is_acked_by_the_codec():
    # 300 DATA frames of 10 bytes + 255 bytes of padding: 79,800 flow-controlled
    # bytes through a 65,535-byte window. The app acks only the 10 data bytes it
    # saw; if the codec did not ack the padding, h2 would see a flow-control error.
    server = H2Server(H2Limits(initial_window_size=65535, connection_window=65535))
    raw_client(server)
    server.feed(HeadersFrame(1, request_block(Encoder()), flags=["END_HEADERS"]).serialize())
    for i in range(300):
        (ev,) = server.feed(DataFrame(1, b"%010d" % i, flags=["PADDED"], pad_length=254).serialize())
        assert ev == Data(b"%010d" % i, 1)
        server.ack_received(1, len(ev.data))
    server.data_to_send()


# ---------------------------------------------------------------- translation
def test_h1_head_to_h2_strips_connection_specific_fields_and_moves_host():
    h1 = RequestHead("GET", "/a", [("host", "reviews:9080"), ("connection", "keep-alive, x-hop"),
                                   ("keep-alive", "timeout=5"), ("x-hop", "1"), ("te", "trailers, deflate"),
                                   ("upgrade", "h2c"), ("transfer-encoding", "chunked"),
                                   ("proxy-connection", "x"), ("accept", "*/*")],
                     authority="reviews:9080", path="/a")
    h2 = h1_head_to_h2(h1)
    assert h2.headers == [("te", "trailers"), ("accept", "*/*")]
    assert h2.authority == "reviews:9080" and h2.http_version == "2" and h2.path == "/a"


def test_h2_head_to_h1_adds_host_from_authority():
    h2 = RequestHead("POST", "/p?q", [("content-type", "x")], "2", "https", "ratings:9080", "/p?q", stream_id=5)
    h1 = h2_head_to_h1(h2)
    assert h1.headers == [("host", "ratings:9080"), ("content-type", "x")]
    assert (h1.http_version, h1.target, h1.stream_id, h1.scheme) == ("1.1", "/p?q", 0, "https")


def test_h1_request_reaches_an_h2_server_through_the_helpers():
    from meshctl.protocol.http1 import H1Server

    h1 = H1Server()
    (head, _) = h1.feed(b"GET /x HTTP/1.1\r\nHost: app:80\r\nConnection: keep-alive\r\nUser-Agent: u\r\n\r\n")
    p = Pair()
    sid, out = p.c.request(h1_head_to_h2(head), end_stream=True)
    p.to_s += out
    sev, _ = p.pump()
    assert sev[0].authority == "app:80" and sev[0].headers == [("user-agent", "u")]


def test_closed_streams_are_remembered_up_to_the_limit_oldest_forgotten_first():
    # what the codec answers for a frame on a stream it closed depends on remembering it
    # (ignored, or STREAM_CLOSED); a bounded memory, first closed first forgotten
    import random

    from meshctl.protocol import http2

    rand = random.Random(11)
    s = http2.H2Server()
    model: dict[int, int] = {}
    for _ in range(3000):
        sid = rand.randint(1, 1500) * 2 + 1
        how = rand.randint(0, 1)
        s._remember(sid, how)
        model[sid] = how
        if len(model) > http2._GONE_MAX:
            del model[next(iter(model))]
        assert s._gone == model
    assert list(s._gone) == list(model)


def test_strip_connection_specific_keeps_everything_else_as_it_was():
    import itertools

    from meshctl.protocol.http2 import CONNECTION_SPECIFIC, _strip_connection_specific

    def reference(headers, drop_host):
        nominated = {t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",") if t.strip()}
        out = []
        for k, v in headers:
            if k == "te":
                if "trailers" in (t.strip().lower() for t in v.split(",")):
                    out.append(("te", "trailers"))
                continue
            if k in CONNECTION_SPECIFIC or k in nominated or (drop_host and k == "host"):
                continue
            out.append((k, v))
        return out

    pool = [("host", "a"), ("te", "trailers"), ("te", "gzip, Trailers"), ("te", "gzip"), ("connection", "x-a"),
            ("x-a", "1"), ("upgrade", "h2c"), ("content-type", "application/grpc"), ("keep-alive", "1")]
    for n in range(4):
        for headers in itertools.permutations(pool, n):
            for drop_host in (False, True):
                before = list(headers)
                got = _strip_connection_specific(list(headers), drop_host=drop_host)
                assert got == reference(headers, drop_host) and list(headers) == before
