"""Python-side cost of one HTTP/1.1 proxy hop, in one process, without the kernel.

An inbound sidecar (the server side of bench/pair.sh: listener → stages →
forwarder → keep-alive pool) runs in one process with its clients and its app
(loopback sockets through the production backend, or ``--memory``: the memory
backend of proxy/testing.py), in front of an app answering 12 bytes; 16 client
connections send keep-alive GETs through it. Reported: process CPU µs per
request through the proxy, minus the same clients talking to the app directly
(the peers' own cost), i.e. what the proxy adds per request (its Python and
its own syscalls). Steadier for A/B on a noisy machine than the pair: it is
CPU time, not wall time, with no scheduler hand-offs between processes.

    python bench/hop_bench.py [requests-per-connection] [--profile] [--memory] [--toy] [--outbound]
    python bench/hop_bench.py N --once [--outbound] [--toy] [--conns 1]   # one run through the proxy, no timing

``--from-sidecar`` sends what bench/pair.sh's server-side sidecar gets: the request as
the client-side sidecar forwards it (x-forwarded-for, x-request-id, the source's
x-meshctl-source-* headers), so the inbound side does the work it does there.

``--once`` is for instruction counts (as in bench/pair_hop_bench.py): run it under
``valgrind --tool=callgrind`` at two request counts; (difference of the totals) /
(difference of requests) is the instructions per request through the proxy, start-up
excluded (the clients' and the app's share included: compare builds, not absolutes).
It leaves out the runtime's periodic work, which runs by wall time; ``--conns 1``
(one request at a time) makes the count repeatable.

``--outbound`` measures the client side instead (an outbound listener routing
``Host: backend`` through a route table to a cluster, as bench/pair.sh's).

``--toy`` measures a hop without HTTP instead (same sockets and trio, bytes
relayed as they come): the floor this architecture puts under the proxy.

Ends with one JSON line. ``--profile`` prints cProfile's top functions.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import resource
import sys
from functools import partial

import trio

from meshctl.model.base import FrozenDict
from meshctl.model.istio import Destination, HTTPRoute, HTTPRouteDestination, PortSelector
from meshctl.model.proxyconfig import (Cluster, Endpoint, Listener, ProxyConfig, RouteTable, VirtualHost, Workload,
                                       cluster_name)
from meshctl.proxy.runtime import ProxyRuntime
from meshctl.proxy.backend import SocketBackend
from meshctl.proxy.testing import MemoryBackend, request_heads

APP = ("127.0.0.1", 8080)
PROXY = ("127.0.0.1", 15006)
CONNS = 16
OUTBOUND = "--outbound" in sys.argv
USER: list[float] = []  # user-space CPU µs per request of each run
REQUEST = (b"GET /reviews/0 HTTP/1.1\r\nHost: backend\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
if "--from-sidecar" in sys.argv:  # the request as bench/pair.sh's client-side sidecar forwards it
    REQUEST = (b"GET /reviews/0 HTTP/1.1\r\nhost: backend\r\nuser-agent: wrk\r\naccept: */*\r\n"
               b"x-forwarded-for: 127.0.0.1\r\nx-request-id: 0b5e7c9a-3f1d-4c2b-9e8a-6d4f2a1b0c3e\r\n"
               b"x-meshctl-source: workload=client;app=client;version=unknown;namespace=default;"
               b"principal=spiffe://cluster.local/ns/default/sa/client\r\n\r\n")
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"


async def app(stream) -> None:
    async for _ in request_heads(stream):
        await stream.send_all(RESPONSE)


async def client(backend: MemoryBackend, addr: tuple[str, int], n: int) -> None:
    stream = await backend.connect(*addr)
    for _ in range(n):
        await stream.send_all(REQUEST)
        buf = b""
        while not buf.endswith(b"hello world\n"):
            data = await stream.receive_some()
            assert data, "connection closed"
            buf += data
        assert buf.startswith(b"HTTP/1.1 200"), buf[:100]
    await stream.aclose()


def config() -> ProxyConfig:
    if OUTBOUND:  # the client side of bench/pair.sh: routed by Host through a route table
        host = "backend.default.svc.cluster.local"
        name = cluster_name(host, 80)
        vh = VirtualHost(name=f"{host}:80", domains=("backend", "backend:80", host, f"{host}:80"), routes=(
            HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=host, port=PortSelector(number=80))),)),))
        return ProxyConfig(
            version="bench", workload=Workload(name="client-0", service="client"),
            listeners=(Listener(name="outbound", direction="outbound", address=PROXY[0], port=PROXY[1],
                                route_table="outbound"),),
            route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(vh,))),
            clusters=FrozenDict({name: Cluster(name=name, service=host, port=80, endpoints=(
                Endpoint(address=APP[0], port=APP[1]),))}),
        )
    return ProxyConfig(
        version="bench",
        workload=Workload(name="backend-0", service="backend"),
        listeners=(Listener(name="inbound", direction="inbound", address=PROXY[0], port=PROXY[1],
                            app_address=APP[0], app_port=APP[1]),),
        route_tables=FrozenDict(), clusters=FrozenDict(),
    )


async def serve_app(backend, nursery) -> tuple[str, int]:
    lst = backend.listen(APP[0], 0)

    async def accept() -> None:
        while True:
            stream, _ = await lst.accept()
            nursery.start_soon(app, stream)

    nursery.start_soon(accept)
    return (APP[0], lst.bound_port)


async def toy_hop(backend, nursery, app_addr: tuple[str, int]) -> tuple[str, int]:
    """The floor of this architecture: the same raw-socket streams and trio, no HTTP
    (one read is taken to be one whole message), one upstream connection per client one."""
    lst = backend.listen("127.0.0.1", 0)

    async def conn(down) -> None:
        up = await backend.connect(*app_addr)
        while True:
            data = await down.receive_some()
            if not data:
                return
            await up.send_all(data)
            await down.send_all(await up.receive_some())

    async def accept() -> None:
        while True:
            stream, _ = await lst.accept()
            nursery.start_soon(conn, stream)

    nursery.start_soon(accept)
    return ("127.0.0.1", lst.bound_port)


async def run(n: int, through_proxy: bool, memory: bool = False, toy: bool = False) -> float:
    global APP, PROXY
    backend = MemoryBackend() if memory else SocketBackend()
    rt = ProxyRuntime(backend=backend)
    async with trio.open_nursery() as nursery:
        if memory:
            backend.serve(*APP, app, nursery)
        else:
            APP = await serve_app(backend, nursery)
            PROXY = (PROXY[0], 0)
        await nursery.start(partial(rt.run, config(), handle_signals=False))
        if not memory:
            PROXY = (PROXY[0], rt.listeners["outbound" if OUTBOUND else "inbound"].bound_port)
        addr = PROXY if through_proxy else APP
        if toy:
            addr = await toy_hop(backend, nursery, APP)
        async with trio.open_nursery() as warm:
            for _ in range(CONNS):
                warm.start_soon(client, backend, addr, 20)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        async with trio.open_nursery() as clients:
            for _ in range(CONNS):
                clients.start_soon(client, backend, addr, n)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        USER.append((r1.ru_utime - r0.ru_utime) / (n * CONNS) * 1e6)
        t = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        rt.drain(0)
        nursery.cancel_scope.cancel()
    return t / (n * CONNS) * 1e6


def main() -> None:
    global CONNS
    args = [a for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("--") and sys.argv[i - 1] != "--conns"]
    n = int(args[0]) if args else 500
    if "--conns" in sys.argv:
        CONNS = int(sys.argv[sys.argv.index("--conns") + 1])
    if "--once" in sys.argv:
        async def no_housekeeping(self, handle_signals: bool) -> None:  # wall-time work, stretched by valgrind
            await trio.sleep_forever()

        ProxyRuntime._housekeeping = no_housekeeping  # type: ignore[method-assign]
        trio.run(run, n, True, "--memory" in sys.argv, "--toy" in sys.argv)
        return
    if "--profile" in sys.argv:
        prof = cProfile.Profile()
        prof.enable()
        trio.run(run, n, True, "--memory" in sys.argv)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        return
    proxied, direct, pu, du = [], [], [], []
    for _ in range(5):  # interleaved, best of each
        direct.append(trio.run(run, n, False, "--memory" in sys.argv))
        du.append(USER[-1])
        proxied.append(trio.run(run, n, True, "--memory" in sys.argv, "--toy" in sys.argv))
        pu.append(USER[-1])
    import meshctl._build as b
    res = {"bench": "toy-hop" if "--toy" in sys.argv else "hop-outbound" if OUTBOUND else "hop", "compiled": bool(b.COMPILED), "direct_us": round(min(direct), 1),
           "proxied_us": round(min(proxied), 1), "proxy_us_per_request": round(min(proxied) - min(direct), 1),
           "proxy_user_us_per_request": round(min(pu) - min(du), 1)}
    print(f"# proxy hop: {res['proxy_us_per_request']} µs Python CPU per request "
          f"(through {res['proxied_us']} - direct {res['direct_us']}), of which user space "
          f"{res['proxy_user_us_per_request']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
