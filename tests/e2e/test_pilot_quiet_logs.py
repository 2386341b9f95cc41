"""A quiet mesh logs no warning: Pilot's long-poll answers 304 when nothing changed, and
that is the normal end of a poll, not "Pilot unreachable" (issue 18, item 3).

A real `meshctl pilot serve`; the proxy's Pilot client in this process with a short
long-poll wait (the sidecar's is 30 s), so a few polls time out during the test."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import pytest
import trio

from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, ProxyConfig, Workload
from meshctl.pilot.compile import Node
from meshctl.proxy.pilot_client import PilotClient
from meshctl.credentials import bearer, mesh_credential, proxy_credential

from .helpers import free_port, meshctl_popen, stop, wait_http

pytestmark = pytest.mark.e2e

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello}
spec:
  hosts: [hello]
  http:
  - timeout: 3s
    route:
    - destination: {host: hello}
"""


async def test_long_poll_timeouts_after_a_rules_change_log_no_warning(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    pilot = meshctl_popen("pilot", "serve", "--port", str(port), "--state-dir", str(state), log=tmp_path / "pilot.log")
    try:
        wait_http(port, "/healthz")
        mesh = mesh_credential(state, create=False)
        hello = {"instance": {"id": "hello-v1-0", "service": "hello", "address": "127.0.0.1", "port": free_port(),
                              "labels": {"app": "hello", "version": "v1"},
                              "meta": {"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true"}}}
        httpx.put(f"http://127.0.0.1:{port}/v1/registry/instances/hello-v1-0", json=hello, timeout=5,
                  headers=bearer(mesh)).raise_for_status()
        node = Node(Workload(name="client-v1-0", service="client", labels=FrozenDict({"app": "client"})),
                    (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=free_port(), protocol="http"),))
        applied: list[ProxyConfig] = []

        async def apply(cfg: ProxyConfig) -> None:
            applied.append(cfg)

        client = PilotClient(f"http://127.0.0.1:{port}", node, apply, None, wait="500ms",
                             credential=proxy_credential(mesh, "client-v1-0"))
        caplog.set_level(logging.INFO, logger="meshctl.proxy.pilot")
        async with trio.open_nursery() as n:
            n.start_soon(client.run)
            with trio.fail_after(10):
                await client.synced.wait()
            (tmp_path / "vs.yaml").write_text(VS)
            before = len(applied)
            r = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "meshctl", "route", "apply", "-f", str(tmp_path / "vs.yaml"), "--state-dir", str(state)],
                capture_output=True, text=True, timeout=60))
            assert r.returncode == 0, r.stderr
            with trio.fail_after(10):
                while len(applied) == before:
                    await trio.sleep(0.05)
            await trio.sleep(2.0)  # about four long-polls end with 304
            n.cancel_scope.cancel()
        assert client.connected and not client.last_error
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == []
    finally:
        stop(pilot)
