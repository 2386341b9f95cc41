"""What the codec refuses, and with which status, before the request is seen.

Each row is raw bytes a client (or upstream) could send; the codec must raise
ProtocolError with the status Envoy would answer, and produce no event for
the offending message.
"""

from __future__ import annotations

import pytest

from meshctl.protocol.events import EndOfMessage, ProtocolError, RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server, Limits

H = b"Host: a\r\n"

REQUESTS = [
    # (case, raw request, status)
    ("content-length with transfer-encoding",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("transfer-encoding then content-length",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("duplicate content-length, different", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("duplicate content-length, identical", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("content-length list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("negative content-length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("non-numeric content-length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1x\r\n\r\n", 400),
    ("plus-signed content-length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\nx", 400),
    ("empty content-length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    ("overflowing content-length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("obs-fold with space", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold with tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n", 400),
    ("space before the first header", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    ("bad chunk size hex", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk longer than its size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    ("header name with parenthesis", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n", 400),
    ("header name with @", b"GET / HTTP/1.1\r\n" + H + b"X@A: b\r\n\r\n", 400),
    ("empty header name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    ("header line without colon", b"GET / HTTP/1.1\r\n" + H + b"XAb\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n", 400),
    ("bare LF line end", b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", 400),
    ("CTL 0x01 in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n", 400),
    ("request-line garbage", b"GARBAGE\r\n\r\n", 400),
    ("lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad version", b"GET / HTTP/1.x\r\n" + H + b"\r\n", 400),
    ("space inside target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("CTL inside target", b"GET /a\x01 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target neither origin nor absolute form", b"GET abc HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    ("tab before colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("CONNECT with a body", b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\nab", 400),
    ("transfer-encoding gzip, chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("transfer-encoding identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 501),
    ("transfer-encoding chunked, gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 501),
    ("transfer-encoding gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("transfer-encoding twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/0.9 request line", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    ("header block too big", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n", 431),
    ("target too big", b"GET /" + b"a" * (61 * 1024) + b" HTTP/1.1\r\n" + H + b"\r\n", 431),
    ("too many headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
]


@pytest.mark.parametrize("raw,status", [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_server_refuses(raw, status):
    server = H1Server()
    with pytest.raises(ProtocolError) as err:
        events = server.feed(raw)
        # a body error may come after the head: then it must be raised next
        assert not events or not isinstance(events[-1], EndOfMessage), events
        server.feed(b"")
    assert err.value.status == status, str(err.value)
    assert str(err.value)  # names the cause
    assert not server.keep_alive
    with pytest.raises(ProtocolError):  # the codec stays failed
        server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("raw,status", [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_server_refuses_when_fed_byte_by_byte(raw, status):
    server = H1Server()
    with pytest.raises(ProtocolError) as err:
        for i in range(len(raw)):
            server.feed(raw[i : i + 1])
    assert err.value.status == status


def test_head_errors_are_raised_before_the_request_head_event():
    for case, raw, status in REQUESTS:
        server = H1Server()
        head_end = raw.index(b"\r\n\r\n") + 4
        events = []
        with pytest.raises(ProtocolError):
            events += server.feed(raw[:head_end])
            events += server.feed(raw[head_end:])
        if "chunk" not in case:
            assert not any(isinstance(e, RequestHead) for e in events), case


ACCEPTED = [
    ("tab inside value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\tc\r\n\r\n"),
    ("obs-text in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xe9\r\n\r\n"),
    ("empty value", b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n"),
    ("chunk extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\n\r\n"),
    ("Chunked in capitals", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"),
    ("leading empty line", b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n"),
    ("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n"),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n"),
    ("exactly 100 headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n"),
]


@pytest.mark.parametrize("raw", [r[1] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_server_accepts(raw):
    events = H1Server().feed(raw)
    assert isinstance(events[0], RequestHead) and isinstance(events[-1], EndOfMessage)


def test_values_lose_trailing_whitespace_and_keep_inner():
    ev = H1Server().feed(b"GET / HTTP/1.1\r\nHost: a  \r\nX:   b c \t \r\n\r\n")[0]
    assert ev.headers == [("host", "a"), ("x", "b c")] and ev.authority == "a"


def test_custom_limits():
    limits = Limits(max_header_bytes=200, max_headers=3)
    ok = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n"
    assert isinstance(H1Server(limits).feed(ok)[0], RequestHead)
    with pytest.raises(ProtocolError) as err:
        H1Server(limits).feed(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert err.value.status == 431
    with pytest.raises(ProtocolError) as err:
        H1Server(limits).feed(b"GET / HTTP/1.1\r\nHost: a\r\nA: " + b"x" * 200 + b"\r\n\r\n")
    assert err.value.status == 431


def test_endless_header_line_dribbled_in_is_refused():
    server = H1Server(Limits(max_header_bytes=1024))
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    with pytest.raises(ProtocolError) as err:
        for _ in range(100):
            server.feed(b"a" * 100)
    assert err.value.status == 431


def test_bad_request_behind_a_good_one_in_one_feed():
    server = H1Server()
    events = server.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\nX: y\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert events[0].path == "/ok"
    assert not server.keep_alive  # no further request may follow
    out = server.response_head(ResponseHead(200, []), end_stream=True)
    assert b"connection: close\r\n" in out
    with pytest.raises(ProtocolError) as err:
        server.feed(b"")
    assert err.value.status == 400 and "Host" in str(err.value)


def test_error_response_can_be_written_after_a_refusal():
    server = H1Server()
    with pytest.raises(ProtocolError) as err:
        server.feed(b"GARBAGE\r\n\r\n")
    out = server.response_head(ResponseHead(err.value.status, [("content-length", "0")]))
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close\r\n" in out


RESPONSES = [
    ("content-length with transfer-encoding",
     b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("transfer-encoding gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("bad status code", b"HTTP/1.1 2000 OK\r\n\r\n"),
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n"),
    ("NUL in value", b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n"),
    ("bad chunk framing", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"),
    ("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("head too big", b"HTTP/1.1 200 OK\r\nX: " + b"a" * (61 * 1024) + b"\r\n\r\n"),
    ("bare LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
]


@pytest.mark.parametrize("raw", [r[1] for r in RESPONSES], ids=[r[0] for r in RESPONSES])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_client_refuses_malformed_upstream_response_with_502(raw, method):
    client = H1Client()
    client.request_head(RequestHead(method, "/", [], authority="a"), end_stream=True)
    with pytest.raises(ProtocolError) as err:
        client.feed(raw)
    assert err.value.status == 502, str(err.value)
    assert not client.keep_alive


def test_client_refuses_unrequested_switch_of_protocols():
    client = H1Client()
    client.request_head(RequestHead("GET", "/", [], authority="a"), end_stream=True)
    with pytest.raises(ProtocolError) as err:
        client.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    assert err.value.status == 502 and "101" in str(err.value)


def test_mutated_input_only_ever_raises_protocol_error():
    import random

    rng = random.Random(1234)
    seeds = [r[1] for r in REQUESTS[:30]] + [r[1] for r in ACCEPTED]
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(raw))
            op = rng.randrange(3)
            if op == 0:
                raw[i] = rng.randrange(256)
            elif op == 1:
                del raw[i]
            else:
                raw.insert(i, rng.choice(b"\r\n :\t\x00aZ0;"))
        server = H1Server()
        cut = rng.randrange(len(raw) + 1)
        try:
            server.feed(bytes(raw[:cut]))
            server.feed(bytes(raw[cut:]))
            server.feed_eof()
        except ProtocolError as err:
            assert err.status in (400, 431, 501, 505)
    responses = [r[1] for r in RESPONSES] + [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]
    for _ in range(2000):
        raw = bytearray(rng.choice(responses))
        i = rng.randrange(len(raw))
        raw[i] = rng.randrange(256)
        client = H1Client()
        client.request_head(RequestHead(rng.choice(["GET", "HEAD"]), "/", [], authority="a"), end_stream=True)
        try:
            client.feed(bytes(raw))
            client.feed_eof()
        except ProtocolError as err:
            assert err.status == 502


@pytest.mark.parametrize("headers, path", [
    ([("x-a", "v\nx-evil: 1")], "/"),  # bare LF in a value
    ([("x-a", "v\rx-evil: 1")], "/"),  # bare CR in a value
    ([("x-a\r\nx-evil", "1")], "/"),  # CRLF in a name
    ([("x-a", "v")], "/p\r\nx-evil: 1"),  # CRLF in the target
])
def test_request_serializer_refuses_cr_or_lf_anywhere_in_the_head(headers, path):
    client = H1Client()
    head = RequestHead("GET", path, [("host", "a")] + headers, path=path, authority="a")
    with pytest.raises(ValueError, match="CR or LF"):
        client.request_head(head, end_stream=True)


def test_trailer_serializer_refuses_cr_or_lf_and_ends_the_body():
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    server.response_head(ResponseHead(200, []))
    with pytest.raises(ValueError, match="CR or LF"):
        server.end([("grpc-status", "0\r\nx-evil: 1")])
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(200, [("x-a", "1")]))
    assert out == b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    assert server.end([("grpc-status", "0")]) == b"0\r\ngrpc-status: 0\r\n\r\n"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_version_is_the_same_wherever_the_bytes_are_split(version):
    # (read from the first line as fed when it is there whole, else from llhttp)
    wire = f"\r\nGET /a?b HTTP/{version}\r\nHost: a\r\n\r\n".encode()
    for start in (0, 2):
        for cut in range(start + 1, len(wire)):
            server = H1Server()
            events = server.feed(wire[start:cut]) + server.feed(wire[cut:])
            assert events[0].http_version == version
    back = f"HTTP/{version} 200 OK\r\nContent-Length: 0\r\n\r\n".encode()
    for cut in range(1, len(back)):
        client = H1Client()
        client.request_head(RequestHead("GET", "/", [("host", "a")], authority="a"), end_stream=True)
        events = client.feed(back[:cut]) + client.feed(back[cut:])
        assert events[0].http_version == version


def test_other_versions_are_still_refused_with_505():
    with pytest.raises(ProtocolError) as err:
        H1Server().feed(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert err.value.status == 505 and "2.0" in str(err.value)


@pytest.mark.parametrize("upgrade_request", [
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",  # a token not honoured
    b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc",
])
@pytest.mark.parametrize("bad, status, says", [
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "version"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "Transfer-Encoding"),
])
def test_errors_behind_an_upgrade_request_served_as_http_keep_their_status(upgrade_request, bad, status, says):
    server = H1Server()
    with pytest.raises(ProtocolError) as err:
        server.feed(upgrade_request + bad)
        server.feed(b"")
    assert err.value.status == status and says in str(err.value)
