"""ServiceEntry ``addresses`` and DNS resolutions through a real proxy.

- addresses: a request whose authority is one of the entry's addresses (an IP, or
  an IP inside a CIDR range), and a CONNECT tunnel to one, reach the entry: its
  endpoints, its rules, its telemetry. (meshctl sees no original destination
  address; the authority and the CONNECT target are what it has.)
- resolution DNS: every address the name resolves to is an endpoint, requests go
  round them; DNS_ROUND_ROBIN: the first address of the latest answer (Envoy's
  LOGICAL_DNS). The name here resolves to two loopback addresses by a cache
  entry seeded as the resolver would (this machine's DNS has no such name).
"""

from __future__ import annotations

import json

import trio

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.proxyconfig import Listener, Settings, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.proxy import dns

from proxy_testkit import curl, free_port, running_proxy

ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: legacy-api
spec:
  hosts: [legacy.example]
  addresses: [10.10.10.10, 10.20.0.0/16]
  location: MESH_EXTERNAL
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 9443, name: tls, protocol: TLS}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {http}, tls: {tls}}}
"""

DNS_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: multi
spec:
  hosts: [multi.example]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
  resolution: {resolution}
"""


def _config(rules: str, listen: int):
    resources = load_resources_text(rules, "se.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    node = Node(workload=Workload(name="sleep-0", service="sleep"),
                listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),))
    return compile_proxy(Inputs(resources, {}, settings=Settings(outbound_traffic_policy="REGISTRY_ONLY")), node)


async def test_requests_to_an_entrys_addresses_reach_the_entry(upstreams):
    web, tls = upstreams("legacy-http"), upstreams("legacy-tls")
    lp = free_port()
    async with running_proxy(_config(ENTRY.format(http=web.port, tls=tls.port), lp)):
        proxy = f"http://127.0.0.1:{lp}"
        for url in ("http://10.10.10.10/a", "http://10.10.10.10:80/b", "http://10.20.3.4/c", "http://legacy.example/d"):
            r = await curl("-s", "-x", proxy, url)
            assert json.loads(r.stdout)["upstream"] == "legacy-http", (url, r.stdout)
        # outside the entry's addresses: not in the registry (REGISTRY_ONLY), 502
        r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, "http://10.30.0.1/e")
        assert r.stdout == b"502"
        # a CONNECT tunnel to an address in the range, on the entry's TLS port: to its endpoint
        r = await curl("-s", "-p", "-x", proxy, "http://10.20.9.9:9443/through-tunnel")
        assert json.loads(r.stdout)["upstream"] == "legacy-tls", r.stdout
        r = await curl("-s", "-p", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, "http://10.21.0.1:9443/")
        assert r.stdout in (b"000", b"502")  # CONNECT refused: not the entry's range
    assert [p for _, p, _ in web.requests] == ["/a", "/b", "/c", "/d"]
    assert [p for _, p, _ in tls.requests] == ["/through-tunnel"]


async def _spread(upstreams, resolution: str) -> tuple[int, int]:
    one = upstreams("first")
    two = upstreams("second", "127.0.0.2", one.port)
    lp = free_port()
    dns.CACHE.put("multi.example", ("127.0.0.1", "127.0.0.2"), 300.0, trio.current_time())
    try:
        async with running_proxy(_config(DNS_ENTRY.format(port=one.port, resolution=resolution), lp)):
            for i in range(6):
                r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", f"http://multi.example:{one.port}/{i}")
                assert json.loads(r.stdout)["upstream"] in ("first", "second")
    finally:
        dns.CACHE.entries.pop("multi.example", None)
    return len(one.requests), len(two.requests)


async def test_resolution_dns_spreads_requests_over_every_resolved_address(upstreams):
    assert await _spread(upstreams, "DNS") == (3, 3)


async def test_resolution_dns_round_robin_uses_the_first_address_of_the_answer(upstreams):
    assert await _spread(upstreams, "DNS_ROUND_ROBIN") == (6, 0)
