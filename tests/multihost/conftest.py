"""Fixtures of the multi-host tests: three hosts in network namespaces, a Consul
cluster of three servers, and Bookinfo split across the hosts.

    host 1  10.213.0.1   ingress gateway (127.0.0.1:8080 of host 1), productpage, details
    host 2  10.213.0.2   reviews v1 and v2, ratings
    host 3  10.213.0.3   reviews v3, ratings

Each host runs `meshctl up -d -f hostN.yaml --advertise 10.213.0.N --locality
region1/zoneN` with the mesh file of its own services from examples/multi-host/
(registry consul://127.0.0.1:8500, its own Consul server; docs/multi-host.md). The CA
is docs/multi-host-ca.md's: one root made by `citadel init --root-dir` in the test's
own directory (no host's), `citadel join` on each host, `citadel approve --all` by
the root holder; each host's Citadel signs with its own intermediate from Consul KV.

Skipped, with the reason, where the runner cannot make network namespaces (not
root, no iproute2). One mesh serves all the tests of this folder (package scope):
the failure tests put back what they break, and the one that kills a host runs last.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.tools.servers import build_tool

from .hosts import RUNNING, ConsulCluster, MeshHost, RootHolder
from .netlab import LabUnavailable, NetLab, wait_for, why_unavailable

GATEWAY_PORT = 8080  # host 1's own loopback: the namespaces have ports of their own


class Mesh:
    def __init__(self, lab: NetLab, consul: ConsulCluster, hosts: dict[int, MeshHost], root: RootHolder) -> None:
        self.lab, self.consul, self.hosts, self.root = lab, consul, hosts, root

    def wait_routable(self, via: int, service: str, addresses: set[str], timeout: float = 60) -> None:
        """Host ``via``'s Pilot has endpoints of ``service`` on exactly the hosts ``addresses``."""
        host = self.hosts[via]
        seen: list[set[str]] = []

        def routed() -> bool:
            seen.append({e.rsplit(':', 1)[0] for e in host.endpoints(service)})
            return seen[-1] == addresses

        try:
            wait_for(f"host {via}'s Pilot to route {service} to {sorted(addresses)}", routed, timeout, 0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; it routed to {sorted(seen[-1]) if seen else 'nothing (no answer)'}; "
                                 f"Consul: {self.consul.describe()}") from None


@pytest.fixture(autouse=True)
def _stop_loads():
    """A test that fails mid-way leaves no load running into the next test (or keeping pytest from exiting)."""
    yield
    while RUNNING:
        RUNNING.pop()._stop.set()


@pytest.fixture(scope="package")
def mesh(tmp_path_factory):
    why = why_unavailable()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    consul_bin = build_tool("consul.sh")
    work: Path = tmp_path_factory.mktemp("multihost")
    try:
        lab = NetLab(3)
    except LabUnavailable as e:
        pytest.skip(f"multi-host tests need network namespaces: {e}")
    consul = ConsulCluster(lab, consul_bin, work / "consul")
    hosts: dict[int, MeshHost] = {}
    try:
        for h in consul.hosts:
            consul.start(h)
        consul.wait_ready()
        # docs/multi-host-ca.md: the root made once, off the hosts (the test's own directory);
        # each host joins (its key stays home, its CSR goes to Consul KV); the root holder approves
        root = RootHolder(lab, work / "root")
        root.init()
        for h in consul.hosts:
            hosts[h] = MeshHost(lab, h, work / f"host{h}")
            hosts[h].prepare()
        root.approve("--all")
        errors: list[BaseException] = []

        def up(h: MeshHost) -> None:
            try:
                h.up()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=up, args=(h,)) for h in hosts.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        m = Mesh(lab, consul, hosts, root)
        a1, a2, a3 = lab.addresses
        m.wait_routable(1, "reviews", {a2, a3})
        m.wait_routable(1, "ratings", {a2, a3})
        m.wait_routable(2, "ratings", {a2, a3})
        m.wait_routable(3, "ratings", {a2, a3})
        # applied once, on host 1: the rules live in Consul KV, every host's Pilot follows them
        hosts[1].apply("../bookinfo/rules/bookinfo-gateway.yaml", "rules/cross-host.yaml")
        yield m
    finally:
        while RUNNING:
            RUNNING.pop()._stop.set()
        # Every process of every host is killed with its namespace (lab.close), the
        # meshes included: nothing outlives the namespaces to deregister from.
        consul.close()
        lab.close()
