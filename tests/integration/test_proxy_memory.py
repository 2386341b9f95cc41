"""The HTTP pipeline over trio.testing memory streams: local decisions need no sockets."""

from __future__ import annotations

import trio
import trio.testing

from meshctl.model.istio import HTTPDirectResponse, HTTPBody, HTTPRedirect, HTTPRoute, HTTPMatchRequest, StringMatch
from meshctl.proxy.http import serve_http_connection
from meshctl.proxy.pool import UpstreamPool
from meshctl.proxy.runtime import ActiveListener, ProxyRuntime
from meshctl.proxy.snapshot import Snapshot

from proxy_testkit import config, outbound_listener, registry_only, vhost


def _runtime(routes):
    lst = outbound_listener(1)
    cfg = registry_only(config(listeners=[lst], vhosts=[vhost("web", 80, tuple(routes))]))
    rt = ProxyRuntime()
    rt.snapshot = Snapshot(cfg, rt.stats)
    rt.pool = UpstreamPool(limits=rt.snapshot.limits)
    al = ActiveListener(lst, None, rt.snapshot)
    return rt, al


async def _exchange(rt, al, raw: bytes) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    out = b""
    async with trio.open_nursery() as n:
        n.start_soon(serve_http_connection, rt, al, server, "10.1.2.3")
        await client.send_all(raw)
        await client.send_eof()
        with trio.fail_after(5):
            while True:
                d = await client.receive_some()
                if not d:
                    break
                out += d
    return out


async def test_direct_response_redirect_and_no_route_are_answered_locally():
    routes = [
        HTTPRoute(match=(HTTPMatchRequest(uri=StringMatch(exact="/health")),),
                  direct_response=HTTPDirectResponse(status=200, body=HTTPBody(string="ok"))),
        HTTPRoute(match=(HTTPMatchRequest(uri=StringMatch(prefix="/old")),),
                  redirect=HTTPRedirect(uri="/new")),
    ]
    rt, al = _runtime(routes)
    out = await _exchange(
        rt, al,
        b"GET http://web/health HTTP/1.1\r\nhost: web\r\n\r\n"
        b"GET http://web/old/x HTTP/1.1\r\nhost: web\r\n\r\n"
        b"GET http://web/other HTTP/1.1\r\nhost: web\r\n\r\n"
        b"GET http://elsewhere/ HTTP/1.1\r\nhost: elsewhere\r\n\r\n",
    )
    responses = out.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"301", b"404", b"502"]  # unknown host: REGISTRY_ONLY
    assert responses[0].endswith(b"\r\n\r\nok")
    assert b"location: http://web/new" in responses[1].lower() or b"location: /new" in responses[1].lower()
    assert b"x-meshctl-reason: no route" in responses[3].lower()
    # all four on one kept-alive connection, each with a request id
    assert out.lower().count(b"x-request-id: ") == 4
    assert rt.stats.flags["NR"] == 2


async def test_malformed_request_gets_its_status_and_a_close_without_routing():
    rt, al = _runtime([])
    out = await _exchange(rt, al, b"GET / HTTP/1.1\r\nhost: web\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in out.lower()
    assert rt.stats.flags["DPE"] == 1
