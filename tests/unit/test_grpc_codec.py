"""gRPC wire helpers: message counting across chunk boundaries, grpc-timeout, status codes."""

from __future__ import annotations

import pytest

from meshctl.protocol.grpc import (
    GrpcError,
    MessageCounter,
    decode_grpc_message,
    encode_grpc_message,
    format_grpc_timeout,
    grpc_status_for_http,
    grpc_status_from,
    is_grpc,
    local_grpc_reply,
    parse_grpc_timeout,
)


def msg(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


STREAM = msg(b"hello") + msg(b"") + msg(b"x" * 70_000, flag=1) + msg(b"end")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 4096, 65536, len(STREAM)])
def test_counter_counts_complete_messages_for_any_chunking(size):
    c = MessageCounter()
    per_chunk = [c.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size)]
    assert sum(per_chunk) == 4 == c.messages
    assert not c.in_message


def test_counter_counts_a_message_only_when_its_last_byte_arrives():
    c = MessageCounter()
    data = msg(b"abcdef")
    assert c.feed(data[:4]) == 0 and c.in_message  # inside the prefix
    assert c.feed(data[4:8]) == 0 and c.in_message  # inside the payload
    assert c.feed(data[8:]) == 1 and not c.in_message
    assert c.feed(msg(b"a") + msg(b"b")[:3]) == 1 and c.in_message and c.messages == 2


def test_counter_refuses_a_declared_length_over_the_cap_before_the_payload():
    c = MessageCounter(max_message_size=1000)
    assert c.feed(msg(b"a" * 1000)) == 1
    with pytest.raises(GrpcError, match="1001 bytes, over the limit of 1000"):
        c.feed(b"\0" + (1001).to_bytes(4, "big"))


def test_counter_refuses_a_bad_flag_byte():
    with pytest.raises(GrpcError, match="compressed-flag"):
        MessageCounter().feed(b"\x07\0\0\0\0")


@pytest.mark.parametrize(
    "text,seconds",
    [("100m", 0.1), ("1S", 1.0), ("2M", 120.0), ("1H", 3600.0), ("250u", 250e-6), ("5n", 5e-9),
     ("99999999S", 99999999.0), ("0m", 0.0), ("00000010m", 0.01)],
)
def test_grpc_timeout_parses(text, seconds):
    assert parse_grpc_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "100", "m", "123456789m", "1.5S", "-1S", "10s", "10 m", "1x", "١m"])
def test_grpc_timeout_refuses(text):
    with pytest.raises(GrpcError, match="invalid grpc-timeout"):
        parse_grpc_timeout(text)


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 0.1, 1.0, 2.5, 61.0, 3600.0, 86400.0 * 365])
def test_grpc_timeout_formats_within_8_digits_and_round_trips_without_shortening(seconds):
    text = format_grpc_timeout(seconds)
    assert len(text) <= 9
    back = parse_grpc_timeout(text)
    assert back >= seconds - 1e-12 and back <= seconds * 1.000001 + 1e-9


def test_grpc_timeout_format_examples():
    assert format_grpc_timeout(0.0) == "0n"
    assert format_grpc_timeout(0.05) == "50000000n"
    assert format_grpc_timeout(1.0) == "1000000u"
    assert format_grpc_timeout(float("inf")) == "99999999H"
    with pytest.raises(GrpcError):
        format_grpc_timeout(-1.0)


def test_grpc_status_and_content_type():
    assert grpc_status_from([("grpc-status", "14"), ("grpc-message", "x")]) == 14
    assert grpc_status_from([("content-type", "application/grpc")]) is None
    assert grpc_status_from([("grpc-status", "oops")]) == 2
    assert is_grpc([("content-type", "application/grpc")])
    assert is_grpc([("content-type", "application/grpc+proto")])
    assert is_grpc([("content-type", "Application/GRPC; charset=utf-8")])
    assert not is_grpc([("content-type", "application/grpc-web")])
    assert not is_grpc([("content-type", "application/json")])
    assert not is_grpc([])


@pytest.mark.parametrize(
    "http,code", [(200, 0), (400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (502, 14), (503, 14),
                  (504, 14), (500, 2), (418, 2)],
)
def test_http_status_maps_to_grpc_code_as_grpc_documents(http, code):
    assert grpc_status_for_http(http) == code


def test_local_reply_is_trailers_only_with_an_encoded_message():
    head, trailers = local_grpc_reply(14, "no healthy upstream: 100% down")
    assert head.status == 200 and trailers == []
    assert ("content-type", "application/grpc") in head.headers
    assert grpc_status_from(head.headers) == 14
    raw = dict(head.headers)["grpc-message"]
    assert raw == "no healthy upstream: 100%25 down"
    assert decode_grpc_message(raw) == "no healthy upstream: 100% down"
    assert decode_grpc_message(encode_grpc_message("délai dépassé")) == "délai dépassé"
    assert encode_grpc_message("délai").isascii()
    with pytest.raises(ValueError):
        local_grpc_reply(17, "x")
