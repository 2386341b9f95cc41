"""Flow control end to end: a big gRPC server-streaming call through a sidecar
pair (HTTP/2 on every hop, real `python -m meshctl.proxy` processes) passes in
bounded memory. 256 MiB here; 1 GiB by hand with the same code:
`MESHCTL_BIG_STREAM_MIB=1024 pytest tests/integration/test_grpc_big_stream.py -s`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from meshctl.loader.proxyconfig import dump_proxy_config
from meshctl.model.base import FrozenDict
from meshctl.model.istio import Destination, HTTPRoute, HTTPRouteDestination, PortSelector
from meshctl.model.proxyconfig import (
    Cluster,
    Endpoint,
    Listener,
    ProxyConfig,
    RouteTable,
    VirtualHost,
    Workload,
    cluster_name,
    fqdn,
)

from proxy_testkit import free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MiB = 1 << 20


def peak_rss_mb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def test_a_big_grpc_stream_passes_both_sidecars_in_bounded_memory(tmp_path):
    mib = int(os.environ.get("MESHCTL_BIG_STREAM_MIB", "256"))
    chunk = b"x" * MiB

    def down(req, ctx):
        for _ in range(int(req)):
            yield chunk

    handler = grpc.method_handlers_generic_handler("mesh.Big", {"Down": grpc.unary_stream_rpc_method_handler(down)})
    server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 8 * MiB)])
    server.add_generic_rpc_handlers((handler,))
    app = server.add_insecure_port("127.0.0.1:0")
    server.start()
    host = fqdn("big")
    inbound_port, outbound_port = free_port(), free_port()
    server_side = ProxyConfig(version="1", workload=Workload(name="big-0", service="big"), listeners=(
        Listener(name="inbound", direction="inbound", address="127.0.0.1", port=inbound_port,
                 app_address="127.0.0.1", app_port=app, service="big"),))
    cl = Cluster(name=cluster_name(host, 9090), service=host, port=9090, protocol="grpc",
                 endpoints=(Endpoint(address="127.0.0.1", port=inbound_port),))
    route = HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host=host, port=PortSelector(number=9090))),))
    client_side = ProxyConfig(
        version="1", workload=Workload(name="client-0", service="client"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=outbound_port,
                            route_table="outbound"),),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound", virtual_hosts=(
            VirtualHost(name=f"{host}:9090", domains=("big:9090",), routes=(route,)),))),
        clusters=FrozenDict({cl.name: cl}),
    )
    procs = []
    try:
        for name, cfg in (("in", server_side), ("out", client_side)):
            (tmp_path / f"{name}.json").write_text(json.dumps(dump_proxy_config(cfg)))
            procs.append(subprocess.Popen([sys.executable, "-m", "meshctl.proxy", "--config", str(tmp_path / f"{name}.json"),
                                           "--admin-port", "0", "--log-level", "warning"]))
        baseline = {}
        deadline = time.monotonic() + 60  # two process start-ups: generous for a loaded machine
        with grpc.insecure_channel(f"127.0.0.1:{outbound_port}", options=[
                ("grpc.default_authority", "big:9090"), ("grpc.max_receive_message_length", 8 * MiB)]) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            while time.monotonic() < deadline:  # both sidecars serving
                try:
                    list(ch.unary_stream("/mesh.Big/Down")(b"1", timeout=5))
                    break
                except grpc.RpcError:
                    time.sleep(0.1)
            for p in procs:
                baseline[p.pid] = peak_rss_mb(p.pid)
            t = time.monotonic()
            total = 0
            for m in ch.unary_stream("/mesh.Big/Down")(str(mib).encode(), timeout=600):
                total += len(m)
                time.sleep(0.003)  # a reader slower than the app: the sidecars must push back, not buffer
            took = time.monotonic() - t
        peaks = [peak_rss_mb(p.pid) for p in procs]
        print(f"{total // MiB} MiB in {took:.1f}s; sidecar peak RSS {peaks} MB (after one small call: {list(baseline.values())})")
        assert total == mib * MiB
        # Bounded: the stream is 256 MiB or more; no sidecar grew by more than a few windows' worth.
        for p, peak in zip(procs, peaks):
            assert peak - baseline[p.pid] < 40, (peaks, baseline)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        server.stop(0)
