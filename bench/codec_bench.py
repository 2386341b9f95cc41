"""Micro benchmark of the HTTP/1.1 codec: one proxy hop's codec work per request.

Per request: H1Server parses a typical keep-alive GET, H1Client serializes it
upstream, H1Client parses a 12-byte response with content-length, H1Server
serializes it downstream. Also reported: parse-only, and the same hop with h11
when it is installed (interleaved A B A B runs; take the best of each).

    /tmp/venv/bin/python bench/codec_bench.py [seconds]
"""

from __future__ import annotations

import sys
import time

from meshctl.protocol.events import RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server

REQUEST = (
    b"GET /reviews/0?x=1 HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: wrk/4.2\r\n"
    b"Accept: */*\r\nX-Request-Id: 0b9e8f12-2a5c-4b6e-9a43-5b3c0f2a7d11\r\n"
    b"X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"
BATCH = 1000


def hop_meshctl(n: int) -> None:
    server, client = H1Server(), H1Client()
    for _ in range(n):
        evs = server.feed(REQUEST)
        head = evs[0]
        up = RequestHead(head.method, head.target, head.headers, authority=head.authority, path=head.path)
        client.request_head(up, end_stream=True)
        revs = client.feed(RESPONSE)
        rh = revs[0]
        out = [server.response_head(ResponseHead(rh.status, rh.headers, rh.reason))]
        out.append(server.data(revs[1].data))
        out.append(server.end())
        b"".join(out)
        client.reset_for_next()


def parse_only_meshctl(n: int) -> None:
    server = H1Server()
    pipelined = REQUEST * 10
    for _ in range(n // 10):
        server.feed(pipelined)
        for _ in range(10):
            server.response_head(ResponseHead(204, []), end_stream=True)


def hop_h11(n: int) -> None:
    import h11

    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    for _ in range(n):
        server.receive_data(REQUEST)
        req = server.next_event()
        server.next_event()  # EndOfMessage
        client.send(h11.Request(method=req.method, target=req.target, headers=list(req.headers)))
        client.send(h11.EndOfMessage())
        client.receive_data(RESPONSE)
        resp = client.next_event()
        data = client.next_event()
        client.next_event()
        out = [server.send(h11.Response(status_code=resp.status_code, headers=list(resp.headers)))]
        out.append(server.send(h11.Data(data=data.data)))
        out.append(server.send(h11.EndOfMessage()))
        b"".join(out)
        server.start_next_cycle()
        client.start_next_cycle()


def rate(fn, seconds: float) -> float:
    done = 0
    t0 = time.perf_counter()
    while True:
        fn(BATCH)
        done += BATCH
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    total = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    try:
        import h11  # noqa: F401

        contenders = {"meshctl hop": hop_meshctl, "h11 hop": hop_h11, "meshctl parse-only": parse_only_meshctl}
    except ImportError:
        contenders = {"meshctl hop": hop_meshctl, "meshctl parse-only": parse_only_meshctl}
    best: dict[str, float] = {}
    rounds = 2
    per = total / (rounds * len(contenders))
    for _ in range(rounds):  # interleaved: A B A B
        for name, fn in contenders.items():
            best[name] = max(best.get(name, 0.0), rate(fn, per))
    for name, r in best.items():
        print(f"{name:20s} {r:>10,.0f} requests/s  ({1e6 / r:.2f} us/request)")
    if "h11 hop" in best:
        print(f"meshctl hop / h11 hop: {best['meshctl hop'] / best['h11 hop']:.1f}x")


if __name__ == "__main__":
    main()
