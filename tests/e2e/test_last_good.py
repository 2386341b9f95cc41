"""A proxy's saved last-good config is a fallback for when Pilot is down, never a
rival to a newer mesh.yaml (issue 18, item 2). A real `meshctl pilot serve`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio

from meshctl.credentials import mesh_credential, proxy_credential
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Node
from meshctl.proxy.pilot_client import PilotClient, first_config, load_last_good, save_last_good

from .helpers import free_port, meshctl_popen, stop, wait_http

pytestmark = pytest.mark.e2e


def node(*extra: Listener) -> Node:
    outbound = Listener(name="outbound", direction="outbound", address="127.0.0.1", port=free_port(), protocol="http")
    return Node(Workload(name="client-v1-0", service="client", labels=FrozenDict({"app": "client"})), (outbound, *extra))


async def nothing(cfg) -> None:
    pass


async def test_pilot_answering_outranks_the_last_good_config(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    pilot = meshctl_popen("pilot", "serve", "--port", str(port), "--state-dir", str(state), log=tmp_path / "pilot.log")
    try:
        wait_http(port, "/healthz")
        n = node()
        cred = proxy_credential(mesh_credential(state, create=False), "client-v1-0")  # the proxy's own
        client = PilotClient(f"http://127.0.0.1:{port}", n, nothing, state, credential=cred)
        with trio.fail_after(10):
            fresh = await first_config(client)
        # The probe only looked: what Pilot gave is not saved as good before a proxy ran it.
        assert load_last_good(state, "client-v1-0") is None
        save_last_good(state, replace(fresh, version="stale"))
        with trio.fail_after(10):
            got = await first_config(client)
        assert got.version == fresh.version != "stale"
    finally:
        stop(pilot)


async def test_while_pilot_is_down_a_last_good_config_for_other_listeners_is_not_used(tmp_path):
    state = tmp_path / "state"
    pilot_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    binding = Listener(name="binding-tcp-echo", direction="binding", address="127.0.0.1", port=free_port(),
                       protocol="tcp", service="tcp-echo", service_port=9000)
    old = node(binding)
    # What the proxy ran under the old mesh.yaml (with a binding), saved on disk.
    from meshctl.model.proxyconfig import ProxyConfig

    save_last_good(state, ProxyConfig(version="old", workload=old.workload, listeners=old.listeners))
    same = PilotClient(pilot_url, old, nothing, state)
    with trio.fail_after(10):
        assert (await first_config(same)).version == "old"
    newer = PilotClient(pilot_url, replace(old, listeners=old.listeners[:1]), nothing, state)
    with trio.move_on_after(3) as waited:
        await first_config(newer)
    assert waited.cancelled_caught  # it waits for Pilot instead of serving the old mesh.yaml's listeners
