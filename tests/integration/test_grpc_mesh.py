"""gRPC in a real mesh: `meshctl up` with a service declared `protocol: grpc` and
a client workload whose mesh.yaml `upstreams` binds it to a local port. A grpcio
client dials 127.0.0.1:<binding> and reaches the service by name, through the
client's sidecar and the server's sidecar (HTTP/2 all the way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.helpers import mesh_ports

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ECHO_APP = textwrap.dedent("""
    import os, time
    from concurrent.futures import ThreadPoolExecutor
    import grpc

    def say(req, ctx):
        ctx.set_trailing_metadata((("x-served-by", os.environ.get("MESHCTL_INSTANCE", "echo")),))
        return b"hello " + req

    def count(req, ctx):
        for i in range(int(req)):
            yield b"%d" % i

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mesh.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }),))
    server.add_insecure_port("127.0.0.1:" + os.environ["PORT"])
    server.start()
    server.wait_for_termination()
""")

IDLE_APP = textwrap.dedent("""
    import os, socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ["PORT"])))
    s.listen(8)
    while True:
        c, _ = s.accept()
        c.close()
""")


def _meshctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_grpc_client_reaches_a_service_by_name_through_a_binding(tmp_path: Path):
    (tmp_path / "echo_app.py").write_text(ECHO_APP)
    (tmp_path / "idle_app.py").write_text(IDLE_APP)
    # the mesh's ports and the binding below Linux's ephemeral range (32768-60999): 33000+ was
    # inside it, and a loaded run saw a client socket take a planned sidecar port ("Address already in use")
    ports, bind = mesh_ports()
    (tmp_path / "mesh.yaml").write_text(f"""
settings: {{portRange: {ports}}}
services:
- name: echo
  port: 9090
  protocol: grpc
  versions:
  - name: v1
    command: [{sys.executable}, echo_app.py]
- name: client
  port: 8080
  upstreams: {{echo: {bind}}}
  versions:
  - name: v1
    command: [{sys.executable}, idle_app.py]
""")
    _meshctl("up", "-d", "-f", str(tmp_path / "mesh.yaml"))
    try:
        deadline = time.monotonic() + 45  # generous: the machine may be loaded
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{bind}") as ch:
                    resp, call = ch.unary_unary("/mesh.Echo/Say").with_call(b"mesh", timeout=10)
                    counted = list(ch.unary_stream("/mesh.Echo/Count")(b"20", timeout=10))
                break
            except grpc.RpcError as e:  # the mesh may still be starting
                last = e
                time.sleep(0.3)
        else:
            raise AssertionError(f"no gRPC answer through the binding: {last}")
        assert resp == b"hello mesh"
        assert dict(call.trailing_metadata())["x-served-by"]  # trailers came back through both sidecars
        assert counted == [b"%d" % i for i in range(20)]
        st = json.loads(_meshctl("status", "--json", "--state-dir", str(tmp_path / ".meshctl")).stdout)
        assert {w["service"] for w in st["workloads"]} >= {"echo", "client"}
    finally:
        _meshctl("down", "--state-dir", str(tmp_path / ".meshctl"))
