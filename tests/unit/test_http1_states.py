"""The HTTP/1.1 codec's per-side states and their one transition table (protocol/http1.py):
each side of an exchange moves through named states, and a move the table does not
list is refused rather than silently taken."""

from __future__ import annotations

import pytest

from meshctl.protocol import http1 as h
from meshctl.protocol.events import ProtocolError, RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def names(codec) -> tuple[str, str]:
    return h._STATE_NAMES[codec._rx], h._STATE_NAMES[codec._tx]


def test_a_kept_alive_server_exchange_walks_idle_head_body_and_back():
    s = H1Server()
    assert names(s) == ("IDLE", "WAIT")
    s.feed(GET[:10])
    assert names(s) == ("HEAD", "WAIT") and s.receiving_head
    s.feed(GET[10:])
    assert names(s) == ("IDLE", "WAIT")  # request complete, its answer not begun
    s.response_head(ResponseHead(200, [("content-length", "2")]))
    assert names(s) == ("IDLE", "BODY")
    s.data(b"hi")
    s.end()
    assert names(s) == ("IDLE", "DONE") and s.keep_alive


def test_connection_close_ends_the_receive_side_and_a_half_read_request_is_abandoned():
    s = H1Server()
    s.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert names(s)[0] == "CLOSED"
    assert s.feed(GET) == []  # ignored
    s2 = H1Server()
    s2.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    s2.response_head(ResponseHead(413, []), end_stream=True)  # answered before the body was read
    assert names(s2)[0] == "ABANDONED" and not s2.keep_alive
    assert [type(e).__name__ for e in s2.feed_eof()] == ["Reset"]


def test_an_upgrade_request_holds_its_bytes_until_the_response_decides():
    s = H1Server()
    s.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nearly")
    assert names(s)[0] == "HOLD"
    s.response_head(ResponseHead(101, [("upgrade", "websocket")]))
    assert names(s)[1] == "SWITCHING"
    assert s.upgrade_accepted() == b"early"
    assert names(s) == ("SWITCHED", "SWITCHED")


def test_the_client_refuses_a_response_nobody_asked_for_and_stays_in_error():
    c = H1Client()
    with pytest.raises(ProtocolError) as err:
        c.feed(OK)
    assert err.value.status == 502 and names(c)[0] == "ERROR"
    with pytest.raises(ProtocolError):
        c.feed(b"more")


def test_a_client_exchange_walks_await_head_body_done_then_resets():
    c = H1Client()
    assert names(c) == ("IDLE", "IDLE")
    c.request_head(RequestHead("GET", "/", [], authority="a"), end_stream=True)
    assert names(c) == ("AWAIT", "DONE")
    c.feed(OK[:20])
    assert names(c)[0] == "HEAD"
    c.feed(OK[20:])
    assert names(c) == ("DONE", "DONE") and c.keep_alive
    c.reset_for_next()
    assert names(c) == ("IDLE", "IDLE")


def test_a_move_the_table_does_not_list_is_refused_by_name():
    with pytest.raises(RuntimeError, match="no transition from SWITCHED on BEGIN"):
        h._go(h._SERVER_RX, h.SWITCHED, h.E_BEGIN, "request")
    s = H1Server()
    with pytest.raises(RuntimeError, match="before a 101"):
        s.upgrade_accepted()
