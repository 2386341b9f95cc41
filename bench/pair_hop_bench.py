"""Python-side cost of a sidecar pair, plain and with mutual TLS between the two, in one process.

The structure of bench/pair_mtls.sh without the other processes: 16 keep-alive
clients → an outbound sidecar (routes ``Host: backend``) → an inbound sidecar →
an app answering 12 bytes, each sidecar a ``ProxyRuntime`` of its own, over
loopback sockets through the production backend, all in one trio process.
Between the sidecars either plaintext (``plain``) or mutual TLS (``mtls``: the
inbound listener STRICT, the outbound side's endpoint carries the server's
SPIFFE ID, so auto mTLS with the SPIFFE check; certificates from a CA made
here, with meshctl.citadel.ca, as a Citadel would sign them).

Reported per mode: the process's CPU µs per request through the pair minus the
same clients talking to the app directly, i.e. what the two sidecars add per
request (best of interleaved rounds), and the difference mtls - plain: what
mutual TLS adds to the pair per request (both ends of the TLS leg).

    python bench/pair_hop_bench.py [requests-per-connection] [--rounds N] [--profile plain|mtls]
    python bench/pair_hop_bench.py N --once plain|mtls|direct [--conns 1]   # one run, no timing (for callgrind)

``--profile MODE`` prints cProfile's top functions for one run of that mode.
``--once`` is for instruction counts: run it under ``valgrind --tool=callgrind``
at two request counts; (difference of the totals) / (difference of requests)
is the instructions per request, start-up excluded. With 16 connections the
order in which tasks find their bytes depends on timing, and so does the count
(±2% between runs); ``--conns 1`` (one request at a time) makes it repeatable.
``--once`` leaves out the runtimes' periodic work (watchdog, pool sweeps): it runs
by wall time, which valgrind stretches ~50x per request.
Ends with one JSON line.
Needs the test extras (``cryptography``, for the CA).
"""

from __future__ import annotations

import cProfile
import json
import pstats
import resource
import sys
from datetime import datetime, timedelta, timezone
from functools import partial

import trio

from meshctl.model.base import FrozenDict
from meshctl.model.istio import Destination, HTTPRoute, HTTPRouteDestination, PortSelector
from meshctl.model.proxyconfig import (Cluster, Endpoint, Listener, ProxyConfig, RouteTable, VirtualHost, Workload,
                                       cluster_name)
from meshctl.proxy.backend import SocketBackend
from meshctl.proxy.runtime import ProxyRuntime

from hop_bench import app, client  # the same toy app and wrk-like client as the one-hop bench (run from bench/)

CONNS = 16
BACKEND_ID = "spiffe://cluster.local/ns/default/sa/backend"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
USER: list[float] = []


def _holders():
    """Two sidecar certificate holders (backend's, client's) from one fresh CA."""
    from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
    from meshctl.proxy.sidecar_certs import SidecarCertificates

    now = datetime.now(timezone.utc)
    ca = create_root("cluster.local", now - timedelta(days=1))
    out = []
    for spiffe in (BACKEND_ID, CLIENT_ID):
        h = SidecarCertificates()
        key = generate_key()
        leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), now)
        h.update(leaf + ca.issuer_chain_pem, key_to_pem(key), ca.root_pem)
        out.append(h)
    return out


HOLDERS: list = []


def inbound_config(app_port: int, mtls: bool) -> ProxyConfig:
    return ProxyConfig(
        version="bench", workload=Workload(name="backend-0", service="backend"),
        listeners=(Listener(name="inbound", direction="inbound", address="127.0.0.1", port=0,
                            app_address="127.0.0.1", app_port=app_port, mtls_mode="STRICT" if mtls else "DISABLE"),),
        route_tables=FrozenDict(), clusters=FrozenDict(),
    )


def outbound_config(server_port: int, mtls: bool) -> ProxyConfig:
    host = "backend.default.svc.cluster.local"
    name = cluster_name(host, 80)
    vh = VirtualHost(name=f"{host}:80", domains=("backend", "backend:80", host, f"{host}:80"), routes=(
        HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=host, port=PortSelector(number=80))),)),))
    return ProxyConfig(
        version="bench", workload=Workload(name="client-0", service="client"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=0,
                            route_table="outbound"),),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(vh,))),
        clusters=FrozenDict({name: Cluster(name=name, service=host, port=80, endpoints=(
            Endpoint(address="127.0.0.1", port=server_port, identity=BACKEND_ID if mtls else None),))}),
    )


OPENED: list[int] = []  # upstream connections the sidecars opened during each measured run


def _opened(runtimes) -> int:
    return sum(st.cx_total for rt in runtimes for st in rt.stats.clusters.values())


async def run(n: int, mode: str) -> float:
    """One run: warm-up, then n requests on each of CONNS connections; CPU µs per request."""
    backend = SocketBackend()
    mtls = mode == "mtls"
    async with trio.open_nursery() as nursery:
        lst = backend.listen("127.0.0.1", 0)

        async def accept() -> None:
            while True:
                stream, _ = await lst.accept()
                nursery.start_soon(app, stream)

        nursery.start_soon(accept)
        addr = ("127.0.0.1", lst.bound_port)
        runtimes = []
        if mode != "direct":
            inbound, outbound = ProxyRuntime(backend=backend), ProxyRuntime(backend=backend)
            if mtls:
                inbound.tls, outbound.tls = HOLDERS
            await nursery.start(partial(inbound.run, inbound_config(addr[1], mtls), handle_signals=False))
            await nursery.start(partial(outbound.run, outbound_config(inbound.listeners["inbound"].bound_port, mtls),
                                        handle_signals=False))
            addr = ("127.0.0.1", outbound.listeners["outbound"].bound_port)
            runtimes = [inbound, outbound]
        async with trio.open_nursery() as warm:
            for _ in range(CONNS):
                warm.start_soon(client, backend, addr, 20)
        cx0 = _opened(runtimes)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        async with trio.open_nursery() as clients:
            for _ in range(CONNS):
                clients.start_soon(client, backend, addr, n)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        OPENED.append(_opened(runtimes) - cx0)
        USER.append((r1.ru_utime - r0.ru_utime) / (n * CONNS) * 1e6)
        t = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        for rt in runtimes:
            rt.drain(0)
        nursery.cancel_scope.cancel()
    return t / (n * CONNS) * 1e6


def _opt(name: str, default: str | None = None) -> str | None:
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


def main() -> None:
    global CONNS
    opts = {"--rounds", "--profile", "--once", "--conns"}
    args = [a for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("--") and sys.argv[i - 1] not in opts]
    n = int(args[0]) if args else 300
    CONNS = int(_opt("--conns", str(CONNS)) or CONNS)
    HOLDERS[:] = _holders()
    once = _opt("--once")
    if once:
        # the runtimes' periodic work (watchdog, pool sweep) runs by wall time, and under
        # valgrind that is ~50x longer per request: left out, the count is the request path's
        async def no_housekeeping(self, handle_signals: bool) -> None:
            await trio.sleep_forever()

        ProxyRuntime._housekeeping = no_housekeeping  # type: ignore[method-assign]
        trio.run(run, n, once)
        # a connection opened while measuring adds a handshake (millions of
        # instructions): compare instruction counts only between runs that opened as many
        print(f"upstream connections opened while measuring: {OPENED[-1]}", file=sys.stderr)
        return
    prof_mode = _opt("--profile")
    if prof_mode:
        prof = cProfile.Profile()
        prof.enable()
        trio.run(run, n, prof_mode)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(45)
        return
    rounds = int(_opt("--rounds", "5") or 5)
    cpu: dict[str, list[float]] = {"direct": [], "plain": [], "mtls": []}
    user: dict[str, list[float]] = {"direct": [], "plain": [], "mtls": []}
    for _ in range(rounds):  # interleaved, best of each
        for mode in ("direct", "plain", "mtls"):
            cpu[mode].append(trio.run(run, n, mode))
            user[mode].append(USER[-1])
    best = {k: min(v) for k, v in cpu.items()}
    ubest = {k: min(v) for k, v in user.items()}
    import meshctl._build as b
    res = {"bench": "pair-hop", "compiled": bool(b.COMPILED), "direct_us": round(best["direct"], 1),
           "plain_pair_us": round(best["plain"] - best["direct"], 1),
           "mtls_pair_us": round(best["mtls"] - best["direct"], 1),
           "mtls_extra_us": round(best["mtls"] - best["plain"], 1),
           "plain_pair_user_us": round(ubest["plain"] - ubest["direct"], 1),
           "mtls_pair_user_us": round(ubest["mtls"] - ubest["direct"], 1)}
    print(f"# pair (two sidecars) CPU per request: plain {res['plain_pair_us']} µs, mTLS {res['mtls_pair_us']} µs "
          f"(+{res['mtls_extra_us']} µs for mutual TLS); direct clients+app {res['direct_us']} µs")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
