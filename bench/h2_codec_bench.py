"""Micro benchmark of the HTTP/2 codec: requests/s through an H2Client and an
H2Server joined in memory (no sockets).

Per request: H2Client.request (a typical GET), H2Server.feed -> RequestHead +
EndOfMessage, H2Server.response_head + data (12 bytes, END_STREAM),
H2Client.feed -> ResponseHead + Data + EndOfMessage, ack_received. Reported:
  sequential   one stream at a time
  multiplexed  batches of 10 concurrent streams per feed (as h2load -m 10)
  grpc unary   one gRPC unary call as a sidecar's two connections see it: a
               request HEADERS + DATA (a 17-byte message) + END_STREAM, the
               response HEADERS + DATA + trailers (grpc-status), acks both ways
  h1 pair      the same exchange through H1Client + H1Server, for the ratio
Runs interleaved (A B C A B C ...), best of each is printed.

The h2 cases run against the codec as installed (protocol/http2.py) and,
with ``--baseline REV``, against that git revision's protocol/http2.py too
(loaded from ``git show``; e.g. the jh2-based wrapper before the lean codec:
``--baseline daef9be``), interleaved in the same run, so a change is measured
A/B. Ends with one JSON line of the figures.

    .venv/bin/python bench/h2_codec_bench.py [seconds] [--baseline REV]
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
import types

from meshctl.protocol.events import RequestHead, ResponseHead
from meshctl.protocol.http1 import H1Client, H1Server
from meshctl.protocol import http2 as codec_mod


def _baseline(rev: str) -> types.ModuleType:
    """protocol/http2.py as it was at git revision ``rev``, as a module of its own."""
    root = pathlib.Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:meshctl/protocol/http2.py"],
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("meshctl.protocol._http2_baseline")
    mod.__package__ = "meshctl.protocol"
    mod.__file__ = f"{rev}:meshctl/protocol/http2.py"
    sys.modules[mod.__name__] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


H2Client, H2Server = codec_mod.H2Client, codec_mod.H2Server

HEADERS = [
    ("user-agent", "h2load/1.52"),
    ("accept", "*/*"),
    ("x-request-id", "0b9e8f12-2a5c-4b6e-9a43-5b3c0f2a7d11"),
    ("x-b3-traceid", "463ac35c9f6413ad"),
    ("x-b3-spanid", "a2fb4a1d1a96d312"),
]
RESP_HEADERS = [("server", "nginx"), ("content-type", "text/plain"), ("content-length", "12")]
BODY = b"hello world\n"


def connected(codec=codec_mod):
    c, s = codec.H2Client(), codec.H2Server()
    s.feed(c.initiate())
    c.feed(s.initiate() + s.data_to_send())
    s.feed(c.data_to_send())
    c.feed(s.data_to_send())
    return c, s


def run_h2(n: int, batch: int, codec=codec_mod) -> None:
    c, s = connected(codec)
    head = RequestHead("GET", "/reviews/0?x=1", HEADERS, authority="reviews:9080", path="/reviews/0?x=1")
    resp = ResponseHead(200, RESP_HEADERS)
    done = 0
    while done < n:
        wire = bytearray()
        for _ in range(batch):
            _, out = c.request(head, end_stream=True)
            wire += out
        back = bytearray()
        for ev in s.feed(bytes(wire)):
            if type(ev) is RequestHead:
                sid = ev.stream_id
                back += s.response_head(sid, resp)
                back += s.data(sid, BODY, end_stream=True)
        back += s.data_to_send()
        acks = bytearray()
        got = 0
        for ev in c.feed(bytes(back)):
            if type(ev).__name__ == "Data":
                acks += c.ack_received(ev.stream_id, len(ev.data))
            elif type(ev).__name__ == "EndOfMessage":
                got += 1
        acks += c.data_to_send()
        if acks:
            s.feed(bytes(acks))
            s.data_to_send()
        assert got == batch, got
        done += batch


GRPC_HEADERS = [("content-type", "application/grpc"), ("user-agent", "grpc-go/1.60.1"), ("te", "trailers"),
                ("grpc-timeout", "9999m"), ("x-request-id", "0b9e8f12-2a5c-4b6e-9a43-5b3c0f2a7d11")]
GRPC_MSG = b"\0\0\0\0\x0c" + b"x" * 12


def run_grpc(n: int, codec=codec_mod) -> None:
    c, s = connected(codec)
    head = RequestHead("POST", "/fgrpc.PingServer/Ping", GRPC_HEADERS, authority="ping:8079",
                       path="/fgrpc.PingServer/Ping", scheme="http")
    resp = ResponseHead(200, [("content-type", "application/grpc")])
    trailers = [("grpc-status", "0"), ("grpc-message", "")]
    for _ in range(n):
        sid, out = c.request(head)
        out += c.data(sid, GRPC_MSG) + c.end(sid)
        back = b""
        for ev in s.feed(out):
            name = type(ev).__name__
            if name == "Data":
                back += s.ack_received(ev.stream_id, len(ev.data))
            elif name == "EndOfMessage":
                back += s.response_head(ev.stream_id, resp) + s.data(ev.stream_id, GRPC_MSG) + s.end(ev.stream_id, trailers)
        back += s.data_to_send()
        acks = b""
        ended = False
        for ev in c.feed(back):
            name = type(ev).__name__
            if name == "Data":
                acks += c.ack_received(ev.stream_id, len(ev.data))
            elif name == "EndOfMessage":
                ended = ev.trailers == trailers
        assert ended
        acks += c.data_to_send()
        if acks:
            s.feed(acks)
            s.data_to_send()


def run_h1(n: int) -> None:
    server, client = H1Server(), H1Client()
    head = RequestHead("GET", "/reviews/0?x=1", HEADERS, authority="reviews:9080", path="/reviews/0?x=1")
    resp = ResponseHead(200, RESP_HEADERS)
    for _ in range(n):
        wire = client.request_head(head, end_stream=True)
        server.feed(wire)
        out = server.response_head(resp) + server.data(BODY) + server.end()
        evs = client.feed(out)
        assert len(evs) == 3
        client.reset_for_next()


def measure(fn, n: int) -> float:
    # CPU time of this process, not wall time: on a shared machine the other
    # processes' share of the cores is not ours to count
    t0 = time.process_time()
    fn(n)
    return n / (time.process_time() - t0)


def main() -> None:
    args = sys.argv[1:]
    baseline = None
    if "--baseline" in args:
        i = args.index("--baseline")
        baseline = _baseline(args[i + 1])
        del args[i:i + 2]
    seconds = float(args[0]) if args else 6.0
    cases = {
        "sequential": lambda n: run_h2(n, 1),
        "multiplexed x10": lambda n: run_h2(n, 10),
        "grpc unary": run_grpc,
        "h1 pair (reference)": run_h1,
    }
    if baseline is not None:
        cases["baseline sequential"] = lambda n: run_h2(n, 1, baseline)
        cases["baseline multiplexed x10"] = lambda n: run_h2(n, 10, baseline)
        cases["baseline grpc unary"] = lambda n: run_grpc(n, baseline)
    best = {k: 0.0 for k in cases}
    n = 2000
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, fn in cases.items():
            best[name] = max(best[name], measure(fn, n))
    for name, rps in best.items():
        print(f"{name:26s} {rps:10,.0f} requests per CPU-second  (client+server codecs, in memory)")
    figures: dict[str, object] = {"bench": "h2_codec",
                                  **{k.replace(" ", "_"): round(v) for k, v in best.items()}}
    if baseline is not None:
        for k in ("sequential", "multiplexed x10", "grpc unary"):
            figures[f"speedup_{k.replace(' ', '_')}"] = round(best[k] / best[f"baseline {k}"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
