"""HTTP/2 codec, frame layer (RFC 9113 4-6): the codec parses and builds frames
itself, so its edge cases are checked here with frames crafted by hyperframe
and hpack, as another implementation would send them."""

from __future__ import annotations

import struct

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshctl.protocol.events import Data, EndOfMessage, ProtocolError, RequestHead, ResponseHead
from meshctl.protocol.http2 import H2Client, H2Limits, H2Reset, H2Server, WindowUpdated
from tests.unit.test_http2 import PREFACE, frames

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x1, 0x3, 0x5, 0x6
REQUEST = [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/")]


def raw(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame as bytes, unchecked (hyperframe refuses to build invalid ones)."""
    return struct.pack(">LBL", len(payload) << 8 | ftype, flags, sid) + payload


def of_type(data: bytes, cls: type) -> list:
    return [f for f in frames(data) if isinstance(f, cls)]


def server(limits: H2Limits = H2Limits()) -> H2Server:
    s = H2Server(limits)
    s.initiate()
    s.feed(PREFACE + SettingsFrame(0).serialize())
    s.data_to_send()
    return s


def fatal(s: H2Server | H2Client, data: bytes, code: int) -> None:
    """``data`` is a connection error: ProtocolError, and a GOAWAY with ``code``."""
    with pytest.raises(ProtocolError):
        s.feed(data)
    (g,) = of_type(s.data_to_send(), GoAwayFrame)
    assert g.error_code == code


def headers(sid: int, enc: Encoder, fields=REQUEST, flags=("END_HEADERS",), **kw) -> bytes:
    return HeadersFrame(sid, enc.encode(list(fields)), flags=list(flags), **kw).serialize()


# ---------------------------------------------------------------- framing
def test_bytes_fed_one_at_a_time_give_the_same_events():
    s = H2Server()
    s.initiate()
    enc = Encoder()
    wire = (PREFACE + SettingsFrame(0).serialize() + headers(1, enc)
            + DataFrame(1, b"hello", flags=["END_STREAM"]).serialize())
    events = []
    for i in range(len(wire)):
        events += s.feed(wire[i : i + 1])
    head, data, end = events
    assert isinstance(head, RequestHead) and head.method == "POST"
    assert data == Data(b"hello", 1) and isinstance(end, EndOfMessage)


def test_a_bad_preface_or_a_first_frame_other_than_settings_is_fatal():
    s = H2Server()
    fatal(s, b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n", PROTOCOL_ERROR)
    s = H2Server()
    fatal(s, PREFACE + PingFrame(0).serialize(), PROTOCOL_ERROR)


def test_frame_over_our_max_frame_size_is_a_frame_size_error():
    s = server()
    s.feed(headers(1, Encoder()))
    fatal(s, DataFrame(1, b"x" * 16385).serialize(), FRAME_SIZE_ERROR)


def test_an_incomplete_frame_waits_for_its_last_byte():
    s = server()
    assert s.feed(PingFrame(0).serialize()[:-1]) == [] and s.data_to_send() == b""
    assert s.feed(b"\0") == [] and of_type(s.data_to_send(), PingFrame)[0].flags == {"ACK"}


@pytest.mark.parametrize("wire,code", [
    (struct.pack(">LBL", 7 << 8 | 6, 0, 0) + b"x" * 7, FRAME_SIZE_ERROR),  # PING of 7 bytes
    (raw(0x6, 0, 1, b"x" * 8), PROTOCOL_ERROR),  # PING on a stream
    (struct.pack(">LBL", 3 << 8 | 8, 0, 0) + b"xxx", FRAME_SIZE_ERROR),  # WINDOW_UPDATE of 3 bytes
    (struct.pack(">LBL", 5 << 8 | 3, 0, 1) + b"xxxxx", FRAME_SIZE_ERROR),  # RST_STREAM of 5 bytes
    (RstStreamFrame(9).serialize(), PROTOCOL_ERROR),  # RST_STREAM on an idle stream
    (DataFrame(9, b"x").serialize(), PROTOCOL_ERROR),  # DATA on an idle stream
    (WindowUpdateFrame(9, 1).serialize(), PROTOCOL_ERROR),  # WINDOW_UPDATE on an idle stream
    (raw(0x7, 0, 1, b"\0" * 8), PROTOCOL_ERROR),  # GOAWAY on a stream
    (struct.pack(">LBL", 0 << 8 | 5, 4, 1), PROTOCOL_ERROR),  # PUSH_PROMISE from a client
    (ContinuationFrame(1, b"", flags=["END_HEADERS"]).serialize(), PROTOCOL_ERROR),  # no header block open
])
def test_frames_that_break_the_framing_rules_are_connection_errors(wire, code):
    fatal(server(), wire, code)


# ---------------------------------------------------------------- padding, CONTINUATION, priority
def test_padded_headers_with_priority_and_padded_data_are_read():
    s = server()
    enc = Encoder()
    wire = HeadersFrame(1, enc.encode(REQUEST), flags=["END_HEADERS", "PADDED", "PRIORITY"],
                        pad_length=10, depends_on=0, stream_weight=15).serialize()
    wire += DataFrame(1, b"abc", flags=["PADDED", "END_STREAM"], pad_length=0).serialize()
    head, data, end = s.feed(wire)
    assert head.path == "/" and data == Data(b"abc", 1) and isinstance(end, EndOfMessage)


@pytest.mark.parametrize("ftype", [0x0, 0x1])
def test_padding_as_long_as_the_frame_is_a_protocol_error(ftype):
    s = server()
    s.feed(headers(1, Encoder()))
    payload = bytes([4]) + b"abc"  # pad length 4, only 3 bytes follow
    fatal(s, struct.pack(">LBL", len(payload) << 8 | ftype, 0x8 | 0x4, 1 if ftype == 0 else 3) + payload,
          PROTOCOL_ERROR)


def test_another_frame_inside_a_header_block_is_a_protocol_error():
    enc = Encoder()
    block = enc.encode(REQUEST)
    s = server()
    fatal(s, HeadersFrame(1, block[:3]).serialize() + PingFrame(0).serialize(), PROTOCOL_ERROR)
    s = server()
    fatal(s, HeadersFrame(1, block[:3]).serialize()
          + ContinuationFrame(3, block[3:], flags=["END_HEADERS"]).serialize(), PROTOCOL_ERROR)


def test_stream_depending_on_itself_is_reset_and_the_connection_goes_on():
    s = server()
    enc = Encoder()
    assert s.feed(HeadersFrame(1, enc.encode(REQUEST), flags=["END_HEADERS", "PRIORITY"],
                               depends_on=1).serialize()) == []
    (r,) = of_type(s.data_to_send(), RstStreamFrame)
    assert (r.stream_id, r.error_code) == (1, PROTOCOL_ERROR)
    assert s.feed(PriorityFrame(3, depends_on=3).serialize()) == []
    (r,) = of_type(s.data_to_send(), RstStreamFrame)
    assert (r.stream_id, r.error_code) == (3, PROTOCOL_ERROR)
    (head,) = s.feed(headers(5, enc))
    assert head.stream_id == 5  # HPACK stayed in step: the block of stream 1 was decoded


def test_our_large_header_block_goes_out_as_headers_plus_continuation():
    c = H2Client()
    s = H2Server()
    s.feed(c.initiate())
    c.feed(s.initiate() + s.data_to_send())
    s.feed(c.data_to_send())
    c.feed(s.data_to_send())
    big = [(f"x-h{i}", "v" * 1000) for i in range(40)]  # ~40 KB, over 16,384-byte frames
    sid, out = c.request(RequestHead("GET", "/", big, authority="a", path="/"), end_stream=True)
    assert [type(f).__name__ for f in frames(out)] == ["HeadersFrame", "ContinuationFrame", "ContinuationFrame"]
    head, _ = s.feed(out)
    assert head.headers == big and head.stream_id == sid


def test_a_new_stream_below_the_last_one_or_of_the_wrong_parity_is_fatal():
    enc = Encoder()
    s = server()
    s.feed(headers(5, enc))
    fatal(s, headers(3, enc), PROTOCOL_ERROR)
    fatal(server(), headers(2, Encoder()), PROTOCOL_ERROR)


# ---------------------------------------------------------------- SETTINGS
@pytest.mark.parametrize("settings,code", [
    ({0x4: 1 << 31}, FLOW_CONTROL_ERROR),  # INITIAL_WINDOW_SIZE above 2^31-1
    ({0x5: 16383}, PROTOCOL_ERROR),  # MAX_FRAME_SIZE below 16,384
    ({0x5: 1 << 24}, PROTOCOL_ERROR),  # MAX_FRAME_SIZE above 2^24-1
    ({0x2: 2}, PROTOCOL_ERROR),  # ENABLE_PUSH not 0 or 1
])
def test_settings_out_of_bounds_are_connection_errors(settings, code):
    fatal(server(), SettingsFrame(0, settings=settings).serialize(), code)


def test_settings_of_a_bad_length_or_an_ack_with_a_payload_are_frame_size_errors():
    fatal(server(), struct.pack(">LBL", 5 << 8 | 4, 0, 0) + b"\0" * 5, FRAME_SIZE_ERROR)
    fatal(server(), struct.pack(">LBL", 6 << 8 | 4, 1, 0) + b"\0" * 6, FRAME_SIZE_ERROR)


def test_unknown_settings_are_acked_and_ignored():
    s = server()
    assert s.feed(SettingsFrame(0, settings={0x99: 7}).serialize()) == []
    assert of_type(s.data_to_send(), SettingsFrame)[0].flags == {"ACK"}


def test_peer_max_frame_size_sets_our_data_frame_size():
    s = server()
    s.feed(SettingsFrame(0, settings={0x5: 32768, 0x4: 1 << 20}).serialize()
           + WindowUpdateFrame(0, 1 << 20).serialize() + headers(1, Encoder(), flags=["END_HEADERS", "END_STREAM"]))
    s.data_to_send()
    s.response_head(1, ResponseHead(200, []))
    sizes = [len(f.data) for f in of_type(s.data(1, b"x" * 70000, end_stream=True), DataFrame)]
    assert sizes == [32768, 32768, 70000 - 65536]


def test_a_smaller_initial_window_can_make_a_stream_window_negative():
    s = server()
    s.feed(SettingsFrame(0, settings={0x4: 100}).serialize() + headers(1, Encoder(), flags=["END_HEADERS", "END_STREAM"]))
    s.data_to_send()
    s.response_head(1, ResponseHead(200, []))
    assert sum(len(f.data) for f in of_type(s.data(1, b"y" * 300), DataFrame)) == 100
    s.feed(SettingsFrame(0, settings={0x4: 50}).serialize())  # window: 50 - 100 = -50
    assert not of_type(s.data_to_send(), DataFrame) and s.send_window(1) == 0
    s.feed(WindowUpdateFrame(1, 60).serialize())  # -50 + 60 = 10
    assert [len(f.data) for f in of_type(s.data_to_send(), DataFrame)] == [10]
    evs = s.feed(SettingsFrame(0, settings={0x4: 1000}).serialize())  # +950: the rest goes, the stream has room
    assert sum(len(f.data) for f in of_type(s.data_to_send(), DataFrame)) == 190
    assert evs == [WindowUpdated(1)]


# ---------------------------------------------------------------- flow control
def test_window_update_past_2_31_is_fatal_on_the_connection_and_a_reset_on_a_stream():
    fatal(server(), raw(0x8, 0, 0, struct.pack(">L", (1 << 31) - 1)), FLOW_CONTROL_ERROR)
    s = server()
    s.feed(headers(1, Encoder()))
    (r,) = s.feed(raw(0x8, 0, 1, struct.pack(">L", (1 << 31) - 1)))
    assert isinstance(r, H2Reset) and r.error_code == FLOW_CONTROL_ERROR and s.open_streams == 0
    assert of_type(s.data_to_send(), RstStreamFrame)[0].error_code == FLOW_CONTROL_ERROR


def test_window_update_of_zero():
    fatal(server(), raw(0x8, 0, 0, b"\0" * 4), PROTOCOL_ERROR)
    s = server()
    s.feed(headers(1, Encoder()))
    (r,) = s.feed(raw(0x8, 0, 1, b"\0" * 4))
    assert isinstance(r, H2Reset) and r.error_code == PROTOCOL_ERROR


def test_data_past_our_windows_is_a_flow_control_error():
    lim = H2Limits(initial_window_size=65535, connection_window=65535)
    s = server(lim)
    s.feed(headers(1, Encoder()))
    for _ in range(3):
        s.feed(DataFrame(1, b"z" * 16384).serialize())
    s.feed(DataFrame(1, b"z" * 16383).serialize())  # 65,535: the window is full
    fatal(s, DataFrame(1, b"z").serialize(), FLOW_CONTROL_ERROR)


def test_data_for_a_stream_we_reset_is_dropped_and_its_window_given_back():
    lim = H2Limits(initial_window_size=65535, connection_window=65535)
    s = server(lim)
    s.feed(headers(1, Encoder()))
    s.reset(1)
    for _ in range(20):  # 320 KB through a 64 KB connection window: the codec acks it
        assert s.feed(DataFrame(1, b"q" * 16384).serialize()) == []
        out = s.data_to_send()
        assert not of_type(out, RstStreamFrame) and not of_type(out, GoAwayFrame)


def test_data_after_the_stream_ended_is_a_stream_closed_error():
    s = server()
    s.feed(headers(1, Encoder(), flags=["END_HEADERS", "END_STREAM"]))
    s.data_to_send()
    (r,) = s.feed(DataFrame(1, b"late").serialize())  # half-closed (remote)
    assert isinstance(r, H2Reset) and r.error_code == STREAM_CLOSED
    assert of_type(s.data_to_send(), RstStreamFrame)[0].error_code == STREAM_CLOSED


# ---------------------------------------------------------------- content-length
def test_body_longer_or_shorter_than_its_content_length_resets_the_stream():
    enc = Encoder()
    s = server()
    s.feed(headers(1, enc, REQUEST + [("content-length", "3")]))
    (r,) = s.feed(DataFrame(1, b"toolong").serialize())  # the bytes are not passed on
    assert isinstance(r, H2Reset) and r.error_code == PROTOCOL_ERROR
    s.feed(headers(3, enc, REQUEST + [("content-length", "3")]))
    evs = s.feed(DataFrame(3, b"ab", flags=["END_STREAM"]).serialize())
    assert evs[0] == Data(b"ab", 3) and isinstance(evs[1], H2Reset) and not any(
        isinstance(e, EndOfMessage) for e in evs)
    s.feed(headers(5, enc, REQUEST + [("content-length", "3")]))
    assert s.feed(DataFrame(5, b"abc", flags=["END_STREAM"]).serialize()) == [Data(b"abc", 5), EndOfMessage([], 5)]
    fatal(s, headers(7, enc, REQUEST + [("content-length", "x")]), PROTOCOL_ERROR)


def test_a_response_to_head_may_announce_a_length_it_does_not_carry():
    c = H2Client()
    c.initiate()
    c.feed(SettingsFrame(0).serialize())
    sid, _ = c.request(RequestHead("HEAD", "/", [], authority="a", path="/"), end_stream=True)
    evs = c.feed(HeadersFrame(sid, Encoder().encode([(":status", "200"), ("content-length", "10")]),
                              flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert isinstance(evs[0], ResponseHead) and isinstance(evs[1], EndOfMessage)


# ---------------------------------------------------------------- hostile bytes
@pytest.mark.parametrize("block", [b"\x00", b"\x40", b"\x0f", b"\x10", b"\x80"])
def test_a_truncated_or_bad_header_block_is_a_compression_error_on_both_sides(block, capfd):
    # jh2's native decoder panics on truncated literals, and Rust prints each panic to
    # stderr: such a block is refused before the decoder sees it (a peer must not write
    # to our stderr), and comes out as the codec's ProtocolError, never a BaseException
    fatal(server(), HeadersFrame(1, block, flags=["END_HEADERS"]).serialize(), 0x9)
    c = H2Client()
    c.initiate()
    c.feed(SettingsFrame(0).serialize())
    sid, _ = c.request(RequestHead("GET", "/", [], authority="a", path="/"), end_stream=True)
    c.data_to_send()
    fatal(c, HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize(), 0x9)
    assert "panicked" not in capfd.readouterr().err


def test_random_frames_end_in_events_or_protocol_error_never_another_exception():
    import random

    rnd = random.Random(12)
    good = Encoder().encode(REQUEST)
    for _ in range(400):
        is_server = rnd.random() < 0.5
        if is_server:
            codec: H2Server | H2Client = server()
        else:
            codec = H2Client()
            codec.initiate()
            codec.feed(SettingsFrame(0).serialize())
            codec.request(RequestHead("GET", "/", [], authority="a", path="/"), end_stream=rnd.random() < 0.5)
            codec.data_to_send()
        answered: set[int] = set()
        try:
            for _ in range(rnd.randint(1, 6)):
                payload = rnd.randbytes(rnd.choice([0, 1, 2, 4, 5, 6, 8, 9, 12, 20]))
                ftype = rnd.choice([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
                if ftype == 1 and rnd.random() < 0.5:
                    payload = good[: rnd.randint(0, len(good))]
                wire = raw(ftype, rnd.randint(0, 255), rnd.choice([0, 1, 1, 2, 3, 5, (1 << 31) - 1]), payload)
                codec.feed(wire[: rnd.randint(0, len(wire))] if rnd.random() < 0.1 else wire)
                if isinstance(codec, H2Server):
                    for sid in {1, 3} - answered:  # the app answers what it was asked (no-ops otherwise)
                        answered.add(sid)
                        codec.response_head(sid, ResponseHead(200, []))
                        codec.data(sid, b"x" * rnd.randint(0, 3), end_stream=True)
                codec.data_to_send()
        except ProtocolError:
            assert codec.closed and of_type(codec.data_to_send(), GoAwayFrame)


# ---------------------------------------------------------------- HPACK rules (RFC 7541) for untrusted clients
def _huffman_request(value: str) -> tuple[bytes, int]:
    """A request block whose last field's value is Huffman-coded: (block, padding bits)."""
    from hpack.huffman_constants import REQUEST_CODES_LENGTH

    block = Encoder().encode(REQUEST + [("x-v", value)], huffman=True)
    return block, -sum(REQUEST_CODES_LENGTH[c] for c in value.encode()) % 8


def test_huffman_padding_longer_than_7_bits_or_not_ones_is_a_compression_error():
    block, pad = _huffman_request("www.example.com")
    assert pad and block[-13] == 0x80 | 12  # the value: 12 Huffman-coded bytes
    (head,) = server().feed(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
    assert head.headers == [("x-v", "www.example.com")]
    too_long = block[:-13] + bytes([0x80 | 13]) + block[-12:] + b"\xff"
    fatal(server(), HeadersFrame(1, too_long, flags=["END_HEADERS"]).serialize(), 0x9)
    zeros = block[:-1] + bytes([block[-1] & ~((1 << pad) - 1) & 0xFF])
    fatal(server(), HeadersFrame(1, zeros, flags=["END_HEADERS"]).serialize(), 0x9)


def test_a_table_size_update_after_the_first_field_is_a_compression_error():
    block = Encoder().encode(REQUEST)
    first = server()
    (head,) = first.feed(HeadersFrame(1, b"\x3f\xe1\x1f" + block, flags=["END_HEADERS"]).serialize())
    assert head.path == "/"  # at the start of a block: allowed (RFC 7541 4.2)
    fatal(server(), HeadersFrame(1, block[:1] + b"\x3f\xe1\x1f" + block[1:], flags=["END_HEADERS"]).serialize(), 0x9)


def test_a_block_seen_before_decodes_against_the_dynamic_table_as_it_is_now():
    # the codec keeps blocks that leave the HPACK table unchanged decoded; a block that
    # changes the table (an entry added) must make a repeated block decode afresh
    prefix = b"\x83\x86\x84" + b"\x01\x01a"  # :method POST, :scheme http, :path /; :authority a, not indexed
    add_a = prefix + b"\x40\x03x-a\x011"  # x-a: 1, with incremental indexing: dynamic entry 62
    add_b = prefix + b"\x40\x03x-b\x012"  # x-b: 2 becomes entry 62, x-a: 1 moves to 63
    newest = prefix + b"\xbe"  # indexed: entry 62, whatever it is now
    s = server()
    seen = []
    for sid, block in ((1, add_a), (3, newest), (5, newest), (7, add_b), (9, newest)):
        (head, _end) = s.feed(HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        seen.append(head.headers[-1])
    assert seen == [("x-a", "1"), ("x-a", "1"), ("x-a", "1"), ("x-b", "2"), ("x-b", "2")]


def test_requests_from_one_repeated_block_get_headers_of_their_own():
    # a stage that edits one request's headers (adds x-request-id, say) must not edit the next's
    enc = Encoder()
    fields = REQUEST + [("x-a", "1")]
    s = server()
    first, _ = s.feed(headers(1, enc, fields, flags=("END_HEADERS", "END_STREAM")))
    block = enc.encode(fields)  # the same fields again: all indexed now, the same bytes each time
    second, _ = s.feed(HeadersFrame(3, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    second.headers.append(("x-request-id", "r2"))
    third, _ = s.feed(HeadersFrame(5, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert first.headers == [("x-a", "1")]
    assert third.headers == [("x-a", "1")] and third.path == "/" and third.stream_id == 5
    assert second.headers == [("x-a", "1"), ("x-request-id", "r2")]
