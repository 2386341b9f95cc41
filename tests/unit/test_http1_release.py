"""A codec released when its connection ends (http1._HeadCollector.release) is freed by
reference counting alone, and refuses bytes fed after it."""

from __future__ import annotations

import gc

import pytest

from meshctl.protocol.events import EndOfMessage, ProtocolError, RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server

REQUEST = b"GET /x HTTP/1.1\r\nhost: backend\r\nuser-agent: t\r\naccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


def _server_exchange() -> H1Server:
    server = H1Server()
    events = server.feed(REQUEST)
    assert isinstance(events[0], RequestHead) and isinstance(events[-1], EndOfMessage)
    server.response_head(ResponseHead(200, [("content-type", "text/plain"), ("content-length", "0")]), end_stream=True)
    return server


def _client_exchange() -> H1Client:
    client = H1Client()
    client.request_head(RequestHead("GET", "/x", [("host", "backend"), ("accept", "*/*")]), end_stream=True)
    events = client.feed(RESPONSE)
    assert isinstance(events[-1], EndOfMessage)
    return client


def _unreachable_after(make, release: bool) -> int:
    """Objects the cyclic GC finds once a codec that served one exchange is dropped."""
    gc.collect()
    gc.disable()
    try:
        codec = make()
        if release:
            codec.release()
        del codec
        return gc.collect()
    finally:
        gc.enable()


@pytest.mark.parametrize("make", [_server_exchange, _client_exchange])
def test_a_released_codec_is_freed_without_the_cyclic_gc(make):
    assert _unreachable_after(make, release=False) > 0  # the parser <-> codec cycle
    assert _unreachable_after(make, release=True) == 0


@pytest.mark.parametrize("make", [_server_exchange, _client_exchange])
def test_a_released_codec_refuses_bytes_fed_to_it(make):
    codec = make()
    codec.release()
    with pytest.raises(ProtocolError, match="released"):
        codec.feed(REQUEST if isinstance(codec, H1Server) else RESPONSE)
