"""A codec released when its connection ends (http1._HeadCollector.release) is freed by
reference counting alone, and refuses bytes fed after it; one not released is still
freed by the cyclic GC (llhttp's parser holds the codec's bound methods: a cycle)."""

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


def _alive(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


@pytest.mark.parametrize("make", [_server_exchange, _client_exchange])
def test_a_released_codec_is_freed_without_the_cyclic_gc(make):
    cls = type(make())
    gc.collect()
    base = _alive(cls)
    gc.disable()
    try:
        codec = make()
        codec.release()
        del codec
        assert _alive(cls) == base  # gone with its last reference
        assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("make", [_server_exchange, _client_exchange])
def test_a_codec_not_released_is_still_freed_by_the_cyclic_gc(make):
    # (compiled: an attribute visited twice in the class's GC traversal made this cycle
    # one the collector never freed: see _HeadCollector._parser)
    cls = type(make())
    gc.collect()
    base = _alive(cls)
    gc.disable()
    try:
        codec = make()
        del codec
        assert _alive(cls) == base + 1  # the parser <-> codec cycle keeps it
        assert gc.collect() > 0
        assert _alive(cls) == base
    finally:
        gc.enable()


@pytest.mark.parametrize("make", [_server_exchange, _client_exchange])
def test_a_released_codec_refuses_bytes_fed_to_it(make):
    codec = make()
    codec.release()
    with pytest.raises(ProtocolError, match="released"):
        codec.feed(REQUEST if isinstance(codec, H1Server) else RESPONSE)
