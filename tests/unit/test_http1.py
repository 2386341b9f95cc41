"""Round trips through the HTTP/1.1 codec: what a client and a server would see."""

from __future__ import annotations

import pytest

from meshctl.protocol.events import (
    Data,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Upgraded,
)
from meshctl.protocol.http1 import H1Client, H1Server


def merged(events):
    """Events with consecutive Data joined (how they are split is not behaviour)."""
    out = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def req(method="GET", path="/", headers=(), authority="reviews:9080"):
    return RequestHead(method, path, list(headers), authority=authority, path=path)


PIPELINE = (
    b"GET /a?x=1 HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: t\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n"
    b"POST /upload HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nGrpc-Status: 0\r\nX-Sum: abc\r\n\r\n"
    b"PUT /p HTTP/1.1\r\nHost: ratings\r\nContent-Length: 3\r\n\r\nxyz"
)


def test_pipelined_requests_in_one_feed_come_out_in_order():
    events = H1Server().feed(PIPELINE)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "RequestHead", "EndOfMessage",
        "RequestHead", "Data", "Data", "EndOfMessage",
        "RequestHead", "Data", "EndOfMessage",
    ]
    get, post, put = events[0], events[2], events[6]
    assert (get.method, get.target, get.path, get.authority) == ("GET", "/a?x=1", "/a?x=1", "reviews:9080")
    assert get.headers == [("host", "reviews:9080"), ("user-agent", "t"), ("x-dup", "1"), ("x-dup", "2")]
    assert get.http_version == "1.1" and get.keep_alive and get.scheme == "http"
    assert b"".join(e.data for e in events[3:5]) == b"hello world"
    assert events[5].trailers == [("grpc-status", "0"), ("x-sum", "abc")]
    assert post.method == "POST" and put.authority == "ratings"
    assert events[7].data == b"xyz"


def test_request_split_at_every_byte_boundary_parses_the_same():
    whole = merged(H1Server().feed(PIPELINE))
    for cut in range(1, len(PIPELINE)):
        s = H1Server()
        got = s.feed(PIPELINE[:cut]) + s.feed(PIPELINE[cut:])
        assert merged(got) == whole, cut
    s = H1Server()
    one_by_one = []
    for i in range(len(PIPELINE)):
        one_by_one += s.feed(PIPELINE[i : i + 1])
    assert merged(one_by_one) == whole


def test_content_length_round_trip_client_to_server_and_back():
    client, server = H1Client(), H1Server()
    wire = client.request_head(req("POST", "/r", [("content-length", "4"), ("x-a", "b")]))
    wire += client.data(b"da") + client.data(b"ta") + client.end()
    events = merged(server.feed(wire))
    assert [type(e) for e in events] == [RequestHead, Data, EndOfMessage]
    assert events[0].headers == [("host", "reviews:9080"), ("x-a", "b"), ("content-length", "4")]
    assert events[1].data == b"data"
    back = server.response_head(ResponseHead(201, [("content-length", "2")])) + server.data(b"ok") + server.end()
    assert back == b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    rsp = merged(client.feed(back))
    assert rsp[0].status == 201 and rsp[0].reason == "Created" and rsp[1].data == b"ok"
    assert isinstance(rsp[2], EndOfMessage)
    assert client.keep_alive and server.keep_alive


def test_chunked_round_trip_with_trailers_both_ways():
    client, server = H1Client(), H1Server()
    wire = client.request_head(req("POST", "/grpc", [("te", "trailers")]))
    assert b"transfer-encoding: chunked\r\n" in wire
    wire += client.data(b"abc") + client.data(b"") + client.end([("x-req-trailer", "1")])
    events = merged(server.feed(wire))
    assert events[1].data == b"abc"
    assert events[2].trailers == [("x-req-trailer", "1")]
    back = server.response_head(ResponseHead(200, [("content-type", "application/grpc")]))
    assert b"transfer-encoding: chunked" in back
    back += server.data(b"0123456789abcdef!") + server.end([("grpc-status", "0"), ("grpc-message", "ok")])
    rsp = merged(client.feed(back))
    assert rsp[1].data == b"0123456789abcdef!"
    assert rsp[2].trailers == [("grpc-status", "0"), ("grpc-message", "ok")]
    assert client.keep_alive


def test_end_stream_request_has_no_body_framing_and_end_stream_response_gets_length_zero():
    client, server = H1Client(), H1Server()
    wire = client.request_head(req("POST", "/empty"), end_stream=True)
    assert b"transfer-encoding" not in wire and b"content-length" not in wire
    events = server.feed(wire)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    back = server.response_head(ResponseHead(200, []), end_stream=True)
    assert b"content-length: 0\r\n" in back
    assert [type(e) for e in client.feed(back)] == [ResponseHead, EndOfMessage]


def test_get_without_end_stream_sends_no_body_framing_and_refuses_unframed_body():
    client = H1Client()
    wire = client.request_head(req("GET", "/"))
    assert b"transfer-encoding" not in wire
    with pytest.raises(ValueError, match="without body framing"):
        client.data(b"x")


def test_client_keeps_callers_host_header_and_writes_origin_form():
    client = H1Client()
    wire = client.request_head(
        RequestHead("GET", "http://reviews:9080/x?y", [("host", "override")], authority="reviews:9080", path="/x?y"),
        end_stream=True,
    )
    assert wire.startswith(b"GET /x?y HTTP/1.1\r\nhost: override\r\n")
    assert wire.count(b"host:") == 1


def test_absolute_form_target_from_http_proxy_clients():
    ev = H1Server().feed(b"GET http://reviews:9080/x?y=1 HTTP/1.1\r\nHost: other\r\n\r\n")[0]
    assert (ev.scheme, ev.authority, ev.path, ev.target) == ("http", "reviews:9080", "/x?y=1", "http://reviews:9080/x?y=1")
    ev = H1Server().feed(b"GET http://ratings HTTP/1.1\r\nHost: ratings\r\n\r\n")[0]
    assert (ev.authority, ev.path) == ("ratings", "/")


def test_head_response_has_no_body_on_either_side():
    server = H1Server()
    server.feed(b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(200, [("content-length", "1000")]))
    out += server.data(b"ignored body") + server.end()
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    assert server.keep_alive
    # chunked-eligible HEAD response: still no framing
    server.feed(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(200, []))
    assert b"transfer-encoding" not in out and server.end() == b""

    client = H1Client()
    client.request_head(req("HEAD", "/big"), end_stream=True)
    events = client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert client.keep_alive
    client.reset_for_next()
    client.request_head(req("GET", "/next"), end_stream=True)
    events = merged(client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
    assert events[1].data == b"hi" and isinstance(events[2], EndOfMessage)


def test_head_response_and_next_response_in_one_feed_and_split_head():
    client = H1Client()
    client.request_head(req("HEAD", "/"), end_stream=True)
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n"
    got = []
    for i in range(len(raw)):
        got += client.feed(raw[i : i + 1])
    assert [type(e) for e in got] == [ResponseHead, EndOfMessage]
    assert got[0].headers == [("content-length", "5"), ("x", "y")]
    # a response arriving with nothing outstanding is an upstream protocol error
    with pytest.raises(ProtocolError) as err:
        client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert err.value.status == 502


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status):
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(status, [("etag", "x")]))
    out += server.data(b"nope") + server.end()
    assert b"transfer-encoding" not in out and not out.endswith(b"nope")
    assert out.endswith(b"\r\n\r\n")
    client = H1Client()
    client.request_head(req(), end_stream=True)
    events = client.feed(f"HTTP/1.1 {status} X\r\nContent-Length: 9\r\n\r\n".encode())
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert client.keep_alive


def test_interim_responses_then_final():
    client = H1Client()
    client.request_head(req("POST", "/", [("expect", "100-continue"), ("content-length", "2")]))
    events = client.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk"
    )
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [100, 103, 200]
    assert events[1].headers == [("link", "</s.css>")]
    assert isinstance(events[-1], EndOfMessage)
    assert not client.keep_alive  # the request body was never finished
    client.data(b"ab")
    client.end()
    assert client.keep_alive


def test_expect_100_continue_on_the_server():
    server = H1Server()
    events = server.feed(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert events[0].expect_continue and len(events) == 1
    assert server.informational(ResponseHead(100, [])) == b"HTTP/1.1 100 Continue\r\n\r\n"
    events = server.feed(b"abc")
    assert merged(events) == [Data(b"abc"), EndOfMessage([])]
    # HTTP/1.0 clients never get interim responses
    server10 = H1Server()
    server10.feed(b"PUT /f HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
    assert server10.informational(ResponseHead(100, [])) == b""


def test_websocket_upgrade_with_leftover_bytes_on_both_sides():
    server = H1Server()
    events = server.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n\x81\x05hello"
    )
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert events[0].upgrade == "websocket"
    assert server.feed(b"\x81\x02hi") == []  # held until the response decides
    out = server.response_head(ResponseHead(101, [("connection", "Upgrade"), ("upgrade", "websocket")]))
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"connection: Upgrade\r\n" in out and b"upgrade: websocket\r\n" in out
    assert b"content-length" not in out and b"transfer-encoding" not in out
    assert server.upgrade_accepted() == b"\x81\x05hello\x81\x02hi"
    assert not server.keep_alive

    client = H1Client()
    wire = client.request_head(req("GET", "/ws", [("connection", "upgrade"), ("upgrade", "websocket")]), end_stream=True)
    assert b"connection: upgrade\r\n" in wire
    events = client.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x01x")
    assert [type(e) for e in events] == [ResponseHead, Upgraded]
    assert events[0].status == 101 and events[1].leftover == b"\x81\x01x"
    assert not client.keep_alive


def test_upgrade_decided_by_feed_after_101():
    server = H1Server()
    server.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nAB")
    server.response_head(ResponseHead(101, [("upgrade", "websocket")]))
    assert server.feed(b"CD") == [Upgraded(b"ABCD")]


def test_refused_upgrade_goes_on_as_http():
    server = H1Server()
    events = server.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert events[0].upgrade == "websocket"
    server.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")  # held meanwhile
    out = server.response_head(ResponseHead(400, []), end_stream=True)
    assert b"connection: close" not in out and server.keep_alive
    events = server.feed(b"")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert events[0].path == "/next"


def test_upgrade_request_with_a_body_is_served_as_a_plain_request():
    raw = (
        b"POST /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    for cut in (len(raw), 120, 145, 150):
        server = H1Server()
        events = merged(server.feed(raw[:cut]) + server.feed(raw[cut:]))
        assert [type(e) for e in events] == [RequestHead, Data, EndOfMessage, RequestHead, EndOfMessage], cut
        assert events[0].upgrade is None and events[1].data == b"hello"
        assert events[3].path == "/after"


def test_connect_tunnel():
    server = H1Server()
    events = server.feed(b"CONNECT ratings:443 HTTP/1.1\r\nHost: ratings:443\r\n\r\n\x16\x03\x01")
    head = events[0]
    assert head.method == "CONNECT" and head.upgrade == "connect" and head.authority == "ratings:443"
    out = server.response_head(ResponseHead(200, []))
    assert b"content-length" not in out and b"transfer-encoding" not in out
    assert server.upgrade_accepted() == b"\x16\x03\x01"

    client = H1Client()
    wire = client.request_head(RequestHead("CONNECT", "ratings:443", [], authority="ratings:443"), end_stream=True)
    assert wire.startswith(b"CONNECT ratings:443 HTTP/1.1\r\n")
    events = client.feed(b"HTTP/1.1 200 Connection established\r\n\r\nTLSBYTES")
    assert [type(e) for e in events] == [ResponseHead, Upgraded]
    assert events[1].leftover == b"TLSBYTES"


def test_refused_connect_keeps_the_response_body_and_closes():
    client = H1Client()
    client.request_head(RequestHead("CONNECT", "x:1", [], authority="x:1"), end_stream=True)
    events = merged(client.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"))
    assert [type(e) for e in events] == [ResponseHead, Data, EndOfMessage]
    server = H1Server()
    server.feed(b"CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n")
    out = server.response_head(ResponseHead(403, [("content-length", "0")]))
    assert b"connection: close\r\n" in out and not server.keep_alive


def test_http10_client_gets_close_delimited_body():
    server = H1Server()
    events = server.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert events[0].http_version == "1.0" and not events[0].keep_alive and events[0].authority == ""
    out = server.response_head(ResponseHead(200, []))
    assert b"transfer-encoding" not in out and b"connection: close\r\n" in out
    assert server.data(b"body") == b"body" and server.end() == b""
    assert not server.keep_alive
    # further input on a closing connection is ignored
    assert server.feed(b"GET / HTTP/1.0\r\n\r\n") == []


def test_http10_keep_alive_client_with_length():
    server = H1Server()
    events = server.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert events[0].keep_alive
    out = server.response_head(ResponseHead(200, [("content-length", "0")]))
    assert b"connection: keep-alive\r\n" in out
    server.end()
    assert server.keep_alive


def test_close_delimited_upstream_response_ends_at_eof():
    client = H1Client()
    client.request_head(req(), end_stream=True)
    events = client.feed(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\npart one, ")
    assert events[0].http_version == "1.0" and not events[0].keep_alive
    events += client.feed(b"part two")
    assert client.feed_eof() == [EndOfMessage([])]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"part one, part two"
    assert not client.keep_alive


def test_truncated_upstream_response_is_a_reset():
    client = H1Client()
    client.request_head(req(), end_stream=True)
    client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    [ev] = client.feed_eof()
    assert isinstance(ev, Reset) and "middle" in ev.reason
    client = H1Client()
    client.request_head(req(), end_stream=True)
    [ev] = client.feed_eof()
    assert isinstance(ev, Reset) and "before responding" in ev.reason


def test_client_eof_mid_request_is_a_reset_and_between_requests_is_not():
    server = H1Server()
    server.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    [ev] = server.feed_eof()
    assert isinstance(ev, Reset)
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert server.feed_eof() == []


def test_keep_alive_decisions():
    # Connection: close from the client: response says close, no further requests
    server = H1Server()
    events = server.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert not events[0].keep_alive and not server.keep_alive
    assert b"connection: close\r\n" in server.response_head(ResponseHead(200, []), end_stream=True)
    # the application asks to close
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(200, [("connection", "close"), ("content-length", "0")]))
    assert out.count(b"connection") == 1 and not server.keep_alive
    # responding before the request body was read forces a close
    server = H1Server()
    server.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\npartial")
    server.response_head(ResponseHead(413, []), end_stream=True)
    assert not server.keep_alive
    # upstream Connection: close
    client = H1Client()
    client.request_head(req(), end_stream=True)
    events = client.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not events[0].keep_alive and not client.keep_alive
    with pytest.raises(RuntimeError):
        client.reset_for_next()


def test_kept_alive_client_serves_consecutive_exchanges():
    client = H1Client()
    for i in range(3):
        client.request_head(req("GET", f"/{i}"), end_stream=True)
        events = merged(client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + str(i).encode()))
        assert events[1].data == str(i).encode()
        assert client.keep_alive
    client.request_head(req("GET", "/x"), end_stream=True)
    with pytest.raises(RuntimeError, match="not finished"):
        client.request_head(req("GET", "/y"), end_stream=True)


def test_response_serializer_refuses_header_injection_and_wrong_lengths():
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(ValueError, match="CR or LF"):
        server.response_head(ResponseHead(200, [("x", "a\r\nset-cookie: evil")]))
    server.response_head(ResponseHead(200, [("content-length", "3")]))
    with pytest.raises(ValueError, match="longer"):
        server.data(b"abcd")


def test_pipelined_responses_follow_request_methods_in_order():
    server = H1Server()
    server.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    first = server.response_head(ResponseHead(200, [("content-length", "5")])) + server.data(b"12345") + server.end()
    second = server.response_head(ResponseHead(200, [("content-length", "5")])) + server.data(b"12345") + server.end()
    assert not first.endswith(b"12345") and second.endswith(b"12345")


def test_response_head_keep_alive_false_closes_the_connection():
    server = H1Server()
    server.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = server.response_head(ResponseHead(200, [("content-length", "0")], keep_alive=False))
    assert b"connection: close\r\n" in out and not server.keep_alive


def test_keep_alive_follows_the_exchange_being_answered_when_pipelined():
    server = H1Server()
    events = server.feed(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert [e.keep_alive for e in events if isinstance(e, RequestHead)] == [True, False]
    assert server.keep_alive  # /1 may be followed by /2
    out = server.response_head(ResponseHead(200, []), end_stream=True)
    assert b"connection: close" not in out and server.keep_alive
    out = server.response_head(ResponseHead(200, []), end_stream=True)
    assert b"connection: close\r\n" in out and not server.keep_alive


def test_header_names_are_lower_cased_however_spelt_and_the_spellings_kept_stay_bounded():
    from meshctl.protocol import http1

    server = H1Server()
    for spelling in ("X-Trace", "x-trace", "X-TRACE", "x-TrAcE"):
        (head, _eom) = server.feed(f"GET / HTTP/1.1\r\nHost: a\r\n{spelling}: 1 \r\n\r\n".encode())
        assert head.headers == [("host", "a"), ("x-trace", "1")]
        server.response_head(ResponseHead(200, [("content-length", "0")]))
    # a peer inventing names cannot grow the per-process cache of spellings without bound
    for i in range(0, 2 * http1._NAMES_MAX, 50):
        names = "".join(f"X-Made-Up-{j}: v\r\n" for j in range(i, i + 50))
        (head, _eom) = server.feed(f"GET / HTTP/1.1\r\nHost: a\r\n{names}\r\n".encode())
        assert head.headers[1] == (f"x-made-up-{i}", "v")
        server.response_head(ResponseHead(200, [("content-length", "0")]))
    assert len(http1._NAMES) <= http1._NAMES_MAX
