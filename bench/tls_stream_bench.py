"""What the TLS stream itself costs: a ping-pong of small messages between two streams.

Two stream.FastSocketStream ends of a loopback TCP connection in one trio
process, plain or with mutual TLS on them (stream.TLSSocketStream, the
sidecars' certificates from bench/pair_hop_bench.py's CA); one side echoes
what the other sends, 120 bytes at a time, as an HTTP/1.1 request and its
answer cross a sidecar-to-sidecar leg. Reported: process CPU µs per round trip
(both ends: two sends and two receives), plain and TLS, best of interleaved
rounds, and the user-space part. No HTTP and no proxy: the difference is the
TLS stream's Python and OpenSSL's per-record work (and its extra read() per
record). For an A/B, run it with each checkout's python, one after the other.

    python bench/tls_stream_bench.py [round-trips] [--rounds N] [--only plain|tls]

``--only`` runs one mode (for callgrind: two runs at different round-trip
counts, difference of the totals over the difference of round trips).
"""

from __future__ import annotations

import json
import resource
import socket
import sys

import trio

from meshctl.proxy.stream import FastSocketStream, start_tls

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pair_hop_bench import _holders  # noqa: E402  (the CA and the two sidecars' certificates)

MSG = b"x" * 120


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    lst.close()
    return s, c


async def run(n: int, holders) -> tuple[float, float]:
    a, b = _tcp_pair()
    s, c = FastSocketStream(a), FastSocketStream(b)
    if holders:
        s = start_tls(s, holders[0].server, server_side=True)  # type: ignore[assignment]
        c = start_tls(c, holders[1].client, server_side=False)  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.do_handshake)  # type: ignore[attr-defined]
            nursery.start_soon(c.do_handshake)  # type: ignore[attr-defined]

    async def echo() -> None:
        while True:
            data = await s.receive_some()
            if not data:
                return
            await s.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for _ in range(200):  # warm-up (and the session ticket)
            await c.send_all(MSG)
            await c.receive_some()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(n):
            await c.send_all(MSG)
            await c.receive_some()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        nursery.cancel_scope.cancel()
    user = r1.ru_utime - r0.ru_utime
    return (user + r1.ru_stime - r0.ru_stime) / n * 1e6, user / n * 1e6


def main() -> None:
    args = [a for i, a in enumerate(sys.argv[1:], 1)
            if not a.startswith("--") and sys.argv[i - 1] not in ("--rounds", "--only")]
    n = int(args[0]) if args else 10000
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    holders = _holders()
    if "--only" in sys.argv:
        mode = sys.argv[sys.argv.index("--only") + 1]
        print(trio.run(run, n, holders if mode == "tls" else None))
        return
    got: dict[str, list[tuple[float, float]]] = {"plain": [], "tls": []}
    for _ in range(rounds):
        for mode in ("plain", "tls"):
            got[mode].append(trio.run(run, n, holders if mode == "tls" else None))
    best = {k: min(x[0] for x in v) for k, v in got.items()}
    user = {k: min(x[1] for x in v) for k, v in got.items()}
    res = {"bench": "tls-stream", "plain_us": round(best["plain"], 2), "tls_us": round(best["tls"], 2),
           "tls_extra_us": round(best["tls"] - best["plain"], 2), "plain_user_us": round(user["plain"], 2),
           "tls_user_us": round(user["tls"], 2)}
    print(f"# 120-byte round trip, CPU: plain {res['plain_us']} µs, TLS {res['tls_us']} µs "
          f"(+{res['tls_extra_us']}); user space {res['plain_user_us']} / {res['tls_user_us']} µs")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
