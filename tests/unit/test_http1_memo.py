"""A codec reuses the fields of a connection's last head (http1._MEMO_FIELDS): every head
must come out exactly as a fresh codec, which remembers nothing, decodes it alone."""

from __future__ import annotations

import random

import pytest

from meshctl.protocol.events import EndOfMessage, ProtocolError, RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server, Limits


def _request(fields: list[tuple[str, str]], method: str = "GET", target: str = "/x") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _head_view(ev: RequestHead) -> tuple:
    return (ev.method, ev.target, ev.headers, ev.http_version, ev.authority, ev.path, ev.keep_alive,
            ev.expect_continue, ev.upgrade)


def _alone(data: bytes, limits: Limits | None = None) -> object:
    """What a fresh server codec makes of one request: its head, or the error's status."""
    try:
        events = H1Server(limits or Limits()).feed(data)
    except ProtocolError as exc:
        return ("error", exc.status)
    return _head_view(events[0])


def _on_one_connection(heads: list[bytes], limits: Limits | None = None) -> list[object]:
    """The same requests one after another on one connection (each answered first)."""
    server = H1Server(limits or Limits())
    out: list[object] = []
    for data in heads:
        try:
            events = server.feed(data)
        except ProtocolError as exc:
            out.append(("error", exc.status))
            server = H1Server(limits or Limits())  # (that connection is closed)
            continue
        head = events[0]
        assert isinstance(head, RequestHead) and isinstance(events[-1], EndOfMessage)
        out.append(_head_view(head))
        server.response_head(ResponseHead(200, [("content-length", "0")]), end_stream=True)
        if not server.keep_alive:
            server = H1Server(limits or Limits())
    return out


BASE = [("Host", "backend"), ("User-Agent", "fortio.org/fortio-1.66.5"), ("Accept", "*/*"),
        ("X-Forwarded-For", "127.0.0.1"), ("X-Request-Id", "a-1"), ("x-meshctl-source-workload", "client")]


def test_same_heads_and_changed_values_decode_as_alone():
    heads = [
        _request(BASE),
        _request(BASE),
        _request([*BASE[:4], ("X-Request-Id", "a-2"), BASE[5]]),  # one value changed
        _request([("host", "backend"), *BASE[1:]]),  # a name spelled differently
        _request([*BASE[:2], ("Accept", "*/*  "), *BASE[3:]]),  # trailing whitespace: stripped
        _request([*BASE[:2], ("Accept", "*/*"), *BASE[3:]]),
        _request([*BASE[:2], ("Accept", ""), *BASE[3:]]),  # empty value
        _request([*BASE[:2], ("Accept", "caf\xe9"), *BASE[3:]]),  # latin-1
        _request([*BASE[:2], ("X-Extra", "1"), *BASE[2:]]),  # fields shifted
        _request(BASE[:3]),  # fewer fields
        _request(BASE, method="POST"),
        _request(BASE, method="DELETE"),
        _request(BASE),
    ]
    assert _on_one_connection(heads) == [_alone(h) for h in heads]


def test_same_bytes_under_another_name_or_value_position():
    # the same value bytes under another name, the same name with another value
    heads = [
        _request([("Host", "a"), ("X-A", "v"), ("X-B", "w")]),
        _request([("Host", "a"), ("X-B", "v"), ("X-A", "w")]),
        _request([("Host", "a"), ("X-A", "w"), ("X-B", "v")]),
        _request([("Host", "a"), ("X-A", "v"), ("X-B", "w")]),
    ]
    assert _on_one_connection(heads) == [_alone(h) for h in heads]


def test_framing_fields_through_remembered_positions():
    # Host, Content-Length, Connection, Expect, Upgrade seen before at the same position:
    # the framing view (and the refusals it drives) must be the same as decoding alone
    post = [("Host", "a"), ("Content-Length", "0"), ("Expect", "100-continue")]
    heads = [
        _request(post, method="POST"),
        _request(post, method="POST"),
        _request([("Host", "a"), ("Host", "a")]),  # two Host headers: 400
        _request([("Host", "a"), ("Connection", "close")]),
        _request([("Host", "a"), ("Connection", "close")]),
        _request([("Host", "a"), ("Connection", "upgrade"), ("Upgrade", "websocket")]),
        _request([("Host", "a"), ("Connection", "upgrade"), ("Upgrade", "h2c")]),
        _request([("Host", "a"), ("Transfer-Encoding", "gzip")]),  # 501
        _request([("X-A", "1")]),  # HTTP/1.1 without Host: 400
    ]
    got = _on_one_connection(heads)
    assert got == [_alone(h) for h in heads]
    assert ("error", 400) in got and ("error", 501) in got


def test_repeated_framing_field_found_through_a_remembered_one():
    server = H1Server()
    first = _request([("Host", "a"), ("X-A", "1")])
    server.feed(first)
    server.response_head(ResponseHead(200, [("content-length", "0")]), end_stream=True)
    with pytest.raises(ProtocolError) as err:
        server.feed(_request([("Host", "a"), ("Host", "b")]))  # position 0 remembered, 1 is new
    assert err.value.status == 400


def test_long_values_and_many_fields():
    many = [("Host", "a")] + [(f"X-F{i}", f"v{i}") for i in range(60)]
    long_value = [("Host", "a"), ("Cookie", "c" * 1000), ("X-After", "1")]
    heads = [_request(many), _request(many), _request(long_value), _request(long_value),
             _request([("Host", "a"), ("Cookie", "c" * 999 + "d"), ("X-After", "1")]), _request(many)]
    assert _on_one_connection(heads) == [_alone(h) for h in heads]


def test_header_count_and_size_limits_as_alone():
    limits = Limits(max_header_bytes=300, max_headers=8)
    heads = [
        _request([("Host", "a")] + [(f"X-F{i}", "v") for i in range(6)]),
        _request([("Host", "a")] + [(f"X-F{i}", "v") for i in range(8)]),  # 9 fields: 431
        _request([("Host", "a"), ("X-Big", "b" * 200)]),
        _request([("Host", "a"), ("X-Big", "b" * 200 + "   ")]),  # counted with its whitespace
        _request([("Host", "a"), ("X-Big", "b" * 300)]),  # 431
    ]
    got = _on_one_connection(heads, limits)
    assert got == [_alone(h, limits) for h in heads]
    assert got.count(("error", 431)) == 2


def test_random_heads_on_one_connection():
    rnd = random.Random(12)
    names = ["Host", "host", "Accept", "X-A", "x-a", "X-B", "Content-Type", "X-Request-Id", "User-Agent"]
    values = ["backend", "a", "", "*/*", "v ", "v", "text/plain", "1", "2", "caf\xe9"]
    heads = []
    for _ in range(300):
        fields = [("Host", rnd.choice(["a", "b"]))]
        for _ in range(rnd.randrange(0, 6)):
            fields.append((rnd.choice(names[2:]), rnd.choice(values)))
        heads.append(_request(fields, method=rnd.choice(["GET", "POST", "PUT", "HEAD"])))
    assert _on_one_connection(heads) == [_alone(h) for h in heads]


def test_pipelined_requests_and_trailers_after_remembered_heads():
    head = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nHost: trailer\r\n\r\n"
    server = H1Server()
    events = server.feed(head + body + b"GET /g HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n")
    assert [type(e).__name__ for e in events] == ["RequestHead", "Data", "EndOfMessage", "RequestHead",
                                                  "EndOfMessage"]
    assert events[2].trailers == [("x-sum", "1"), ("host", "trailer")]
    assert events[0].headers == [("host", "a"), ("transfer-encoding", "chunked")]
    assert (events[3].method, events[3].headers) == ("GET", [("host", "a"), ("x-a", "1")])
    for _ in range(2):
        server.response_head(ResponseHead(200, [("content-length", "0")]), end_stream=True)
    events = server.feed(head + body)
    assert events[0].headers == [("host", "a"), ("transfer-encoding", "chunked")]
    assert events[2].trailers == [("x-sum", "1"), ("host", "trailer")]


def test_responses_on_one_upstream_connection_decode_as_alone():
    def response(fields: list[tuple[str, str]], status: str = "200 OK") -> bytes:
        return ("\r\n".join([f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in fields]) + "\r\n\r\n").encode()

    bodies = [
        response([("Content-Type", "text/plain"), ("Content-Length", "0")]),
        response([("Content-Type", "text/plain"), ("Content-Length", "0")]),
        response([("Content-Type", "text/html"), ("Content-Length", "0")]),
        response([("Content-Type", "text/html"), ("Content-Length", "0"), ("Content-Length", "0")], "200 OK"),
        response([("Content-Type", "text/html"), ("Content-Length", "0")], "404 Not Found"),
    ]

    def view(client: H1Client, data: bytes) -> object:
        try:
            events = client.feed(data)
        except ProtocolError as exc:
            return ("error", exc.status)
        head = events[0]
        return (head.status, head.reason, head.headers, head.keep_alive)

    def fresh(data: bytes) -> object:
        client = H1Client()
        client.request_head(RequestHead("GET", "/", [("host", "a")], authority="a", path="/"), end_stream=True)
        return view(client, data)

    client = H1Client()
    got = []
    for data in bodies:
        if not client.keep_alive:
            client = H1Client()
        client.request_head(RequestHead("GET", "/", [("host", "a")], authority="a", path="/"), end_stream=True)
        got.append(view(client, data))
    assert got == [fresh(b) for b in bodies]
    assert ("error", 502) in got


def test_status_lines_follow_status_and_reason():
    out = []
    for status, reason in [(200, ""), (200, "OK"), (200, "Fine"), (200, ""), (404, ""), (299, ""), (299, "X")]:
        server = H1Server()
        server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = server.response_head(ResponseHead(status, [("content-length", "0")], reason=reason), end_stream=True)
        out.append(head.split(b"\r\n", 1)[0])
    assert out == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 Fine", b"HTTP/1.1 200 OK",
                   b"HTTP/1.1 404 Not Found", b"HTTP/1.1 299 ", b"HTTP/1.1 299 X"]


def _field_lists() -> list[list[tuple[str, str]]]:
    rnd = random.Random(7)
    names = ["host", "accept", "x-a", "x-b", "content-length", "connection", "transfer-encoding", "keep-alive",
             "user-agent", "", "x-request-id"]
    values = ["a", "b", "", "0", "keep-alive", "chunked", "*/*", "caf\xe9", "x" * 400]
    lists = [[("host", "a"), ("accept", "*/*"), ("x-request-id", str(i))] for i in range(3)]
    for _ in range(300):
        fields = [(rnd.choice(names), rnd.choice(values)) for _ in range(rnd.randrange(0, 7))]
        if rnd.random() < 0.3 and lists:
            fields = list(lists[-1])  # the same head again (equal fields, other tuples)
            if fields and rnd.random() < 0.5:
                fields[rnd.randrange(len(fields))] = ("x-a", rnd.choice(values))
        lists.append(fields)
    return lists


def _serialize_or_error(fn) -> object:
    try:
        return fn()
    except ValueError as exc:
        return ("error", str(exc))


def test_request_heads_on_one_connection_serialize_as_alone():
    def head(fields: list[tuple[str, str]]) -> RequestHead:
        return RequestHead("GET", "/p", list(fields), authority="auth", path="/p")

    client = H1Client()
    got = []
    for fields in _field_lists():
        def send(c: H1Client = client, f: list[tuple[str, str]] = fields) -> bytes:
            return c.request_head(head(f), end_stream=True)
        got.append(_serialize_or_error(send))
        client = H1Client()  # (a failed or finished exchange: the next request on a new connection)
    alone = [_serialize_or_error(lambda f=fields: H1Client().request_head(head(f), end_stream=True))
             for fields in _field_lists()]
    assert got == alone


def test_request_heads_on_one_kept_alive_connection_serialize_as_alone():
    client = H1Client()
    got, alone = [], []
    for fields in _field_lists():
        fields = [(k, v) for k, v in fields if k not in ("content-length", "connection", "transfer-encoding")]
        h = RequestHead("GET", "/p", fields, authority="auth", path="/p")
        got.append(_serialize_or_error(lambda: client.request_head(h, end_stream=True)))
        alone.append(_serialize_or_error(lambda: H1Client().request_head(h, end_stream=True)))
        client.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert client.keep_alive
    assert got == alone


def test_response_heads_on_one_connection_serialize_as_alone():
    server = H1Server()
    got, alone = [], []
    for fields in _field_lists():
        fields = [(k, v) for k, v in fields if k != "connection" and v != "x" * 400]
        resp = ResponseHead(200, fields)
        server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        got.append(_serialize_or_error(lambda: server.response_head(resp, end_stream=True)))
        fresh = H1Server()
        fresh.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        alone.append(_serialize_or_error(lambda: fresh.response_head(resp, end_stream=True)))
        if not server.keep_alive:
            server = H1Server()
    assert got == alone


def test_a_field_at_a_framing_fields_position_serializes_as_alone():
    heads = [[("content-length", "0"), ("x-a", "1")], [("", ""), ("x-a", "1")], [("", "v"), ("x-a", "1")]]
    server = H1Server()
    for fields in heads:
        server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        fresh = H1Server()
        fresh.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert server.response_head(ResponseHead(200, fields), end_stream=True) == fresh.response_head(
            ResponseHead(200, fields), end_stream=True)


def test_an_idle_connection_holds_a_bounded_share_of_its_last_heads():
    """However large a peer's fields, a codec remembers at most 2 KiB of names and values
    (http1._MEMO_BYTES), and of lines serialized, and the heads still come out as alone."""
    from meshctl.protocol import http1

    big = [("Host", "a")] + [(f"X-Big-{i}", chr(97 + i % 26) * 250) for i in range(31)]
    heads = [_request(big), _request(big), _request(big[:3] + [("Cookie", "c" * 4000)] + big[3:])]
    assert _on_one_connection(heads) == [_alone(h) for h in heads]
    server = H1Server()
    for data in heads:
        server.feed(data)
        server.response_head(ResponseHead(200, big[1:]), end_stream=True)
    held_in = sum(len(m.raw_name) + len(m.raw_value) + len(m.name) + len(m.value) for m in server._memo)
    held_out = sum(len(line) + len(f[0]) + len(f[1]) for line, f in zip(server._out_lines, server._out_fields))
    # the bytes and their decoded copies; the lines and the fields they came from: 2 KiB of each
    assert http1._MEMO_BYTES == 2048
    assert 0 < held_in <= 2 * 2048 and 0 < held_out <= 2 * 2048, (held_in, held_out)
