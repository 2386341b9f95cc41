"""ServiceEntry, compiled by Pilot's compiler and served by a real proxy with real
upstreams: targetPort, endpoint ports per service port, endpoint weights, DNS
resolution of endpoint addresses, and DestinationRule subsets on entry hosts."""

from __future__ import annotations

import json
from collections import Counter

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy

from proxy_testkit import curl, free_port, running_proxy


def _proxy_config(text: str, listen: int):
    resources = load_resources_text(text, "se.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    node = Node(
        workload=Workload(name="sleep-0", service="sleep"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),),
    )
    return compile_proxy(Inputs(resources, {}), node)


async def _get(lp: int, url: str) -> tuple[int, dict | str]:
    r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "-w", "\n%{http_code}", url)
    body, _, code = r.stdout.decode().rpartition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return int(code), body


async def test_a_static_entry_with_target_port_connects_to_that_port(upstream):
    # The case: STATIC, port 80 with targetPort, one endpoint address.
    lp = free_port()
    cfg = _proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc
spec:
  hosts: [api.external.example]
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: {upstream.port}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
""", lp)
    async with running_proxy(cfg):
        code, info = await _get(lp, "http://api.external.example/get")
        assert code == 200, info
        assert info["upstream"] == "up" and info["path"] == "/get"


async def test_each_service_port_goes_to_its_endpoint_port(upstreams):
    web, admin = upstreams("web"), upstreams("admin")
    lp = free_port()
    cfg = _proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: two-ports
spec:
  hosts: [two.example]
  ports:
  - {{number: 8080, name: web, protocol: HTTP}}
  - {{number: 9090, name: admin, protocol: HTTP, targetPort: {admin.port}}}
  resolution: DNS
  endpoints:
  - address: localhost
    ports: {{web: {web.port}}}
""", lp)
    async with running_proxy(cfg):
        code, info = await _get(lp, "http://two.example:8080/w")
        assert code == 200 and info["upstream"] == "web", info
        # no endpoint port for "admin": the port's targetPort
        code, info = await _get(lp, "http://two.example:9090/a")
        assert code == 200 and info["upstream"] == "admin", info


async def test_endpoint_weights_share_the_traffic(upstreams):
    heavy, light = upstreams("heavy"), upstreams("light")
    lp = free_port()
    cfg = _proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: weighted
spec:
  hosts: [weighted.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {heavy.port}}}, weight: 3}}
  - {{address: 127.0.0.1, ports: {{http: {light.port}}}, weight: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: weighted
spec:
  host: weighted.example
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
""", lp)
    seen: Counter = Counter()
    async with running_proxy(cfg):
        for i in range(40):
            code, info = await _get(lp, f"http://weighted.example/{i}")
            assert code == 200, info
            seen[info["upstream"]] += 1
    assert seen == {"heavy": 30, "light": 10}


async def test_subsets_and_virtual_services_apply_to_entry_hosts(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    cfg = _proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: versions
spec:
  hosts: [versions.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1.port}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2.port}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: versions
spec:
  host: versions.example
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: versions
spec:
  hosts: [versions.example]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: versions.example, subset: v2}}}}]
  - route: [{{destination: {{host: versions.example, subset: v1}}}}]
""", lp)
    async with running_proxy(cfg):
        for _ in range(5):
            code, info = await _get(lp, "http://versions.example/x")
            assert code == 200 and info["upstream"] == "v1", info
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "-H", "end-user: jason", "http://versions.example/y")
        assert json.loads(r.stdout)["upstream"] == "v2"


# ------------------------------------------------------------------ outbound traffic policy

def _with_policy(cfg, policy: str):
    from dataclasses import replace

    return replace(cfg, settings=replace(cfg.settings, outbound_traffic_policy=policy))


MESH_ONLY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: known
spec:
  hosts: [known.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 1}}]
"""


async def test_allow_any_passes_unknown_hosts_through_without_internal_headers(upstream):
    # Istio's default (ALLOW_ANY): a host no ServiceEntry names is reached directly.
    lp = free_port()
    cfg = _proxy_config(MESH_ONLY, lp)
    assert cfg.settings.outbound_traffic_policy == "ALLOW_ANY"
    async with running_proxy(cfg) as rt:
        code, info = await _get(lp, f"http://localhost:{upstream.port}/status/200?x=1")
        assert code == 200, info
        assert info["path"] == "/status/200?x=1"
        names = [k for k, _ in info["headers"]]
        assert not [n for n in names if n.startswith("x-meshctl-")], names
        # what the external server saw, as it recorded it
        _, _, headers = upstream.requests[-1]
        assert not [k for k, _ in headers if k.startswith("x-meshctl-")]
        metrics = rt.telemetry.render()
    assert 'destination_service="PassthroughCluster"' in metrics, metrics


async def test_registry_only_answers_502_for_unknown_hosts(upstream):
    lp = free_port()
    cfg = _with_policy(_proxy_config(MESH_ONLY, lp), "REGISTRY_ONLY")
    async with running_proxy(cfg) as rt:
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", f"http://localhost:{upstream.port}/")
        assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout[:200]
        assert b"BlackHoleCluster" in r.stdout
        metrics = rt.telemetry.render()
    assert upstream.requests == []
    line = next(l for l in metrics.splitlines() if l.startswith("istio_requests_total{") and "BlackHoleCluster" in l)
    assert 'response_code="502"' in line and 'response_flags="NR"' in line, line


async def test_mesh_external_service_entries_get_no_internal_headers(upstream):
    lp = free_port()
    cfg = _proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ext
spec:
  hosts: [ext.example]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {upstream.port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
""", lp)
    async with running_proxy(cfg):
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "-H", "x-meshctl-source-workload: forged",
                       "http://ext.example/h")
        info = json.loads(r.stdout)
    names = [k for k, _ in info["headers"]]
    assert not [n for n in names if n.startswith("x-meshctl-")], names


async def test_connect_tunnels_to_unknown_hosts_under_allow_any_and_not_under_registry_only(upstream):
    # HTTPS_PROXY clients (curl -p here) open a CONNECT tunnel; the proxy relays the bytes.
    lp = free_port()
    cfg = _proxy_config(MESH_ONLY, lp)
    async with running_proxy(cfg):
        r = await curl("-s", "-p", "-x", f"http://127.0.0.1:{lp}", f"http://localhost:{upstream.port}/tunnelled")
        info = json.loads(r.stdout)
        assert info["path"] == "/tunnelled"
        assert not [k for k, _ in info["headers"] if k.startswith("x-meshctl-")]
    lp = free_port()
    async with running_proxy(_with_policy(_proxy_config(MESH_ONLY, lp), "REGISTRY_ONLY")):
        r = await curl("-s", "-v", "-p", "-x", f"http://127.0.0.1:{lp}", f"http://localhost:{upstream.port}/no")
        assert r.returncode != 0
        assert b"HTTP/1.1 502" in r.stderr, r.stderr[-500:]
    assert [p for _, p, _ in upstream.requests] == ["/tunnelled"]


async def test_connect_to_a_service_entry_host_reaches_its_endpoint(upstream):
    lp = free_port()
    cfg = _with_policy(_proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: secure
spec:
  hosts: [secure.example]
  ports: [{{number: 443, name: tls, protocol: TLS, targetPort: {upstream.port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
""", lp), "REGISTRY_ONLY")
    async with running_proxy(cfg):
        # the entry's host is known, so even REGISTRY_ONLY lets the tunnel through
        r = await curl("-s", "-p", "-x", f"http://127.0.0.1:{lp}", "--connect-to", "secure.example:443:secure.example:443",
                       "http://secure.example:443/inside")
        assert json.loads(r.stdout)["path"] == "/inside", r


async def test_resolution_none_and_wildcard_hosts_connect_to_the_host_the_request_names(upstream):
    # Istio's wildcard egress entry has no resolution (NONE): the request's own host is
    # where it goes. "*.0.0.1" stands for "*.wikipedia.org" here: 127.0.0.1 must resolve.
    lp = free_port()
    cfg = _with_policy(_proxy_config(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: wildcard
spec:
  hosts:
  - "*.0.0.1"
  ports:
  - number: {upstream.port}
    name: http
    protocol: HTTP
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: none
spec:
  hosts: [localhost]
  ports: [{{number: {upstream.port}, name: http, protocol: HTTP}}]
  resolution: NONE
""", lp), "REGISTRY_ONLY")
    async with running_proxy(cfg) as rt:
        code, info = await _get(lp, f"http://127.0.0.1:{upstream.port}/wild")
        assert code == 200 and info["path"] == "/wild", info
        code, info = await _get(lp, f"http://localhost:{upstream.port}/none")
        assert code == 200 and info["path"] == "/none", info
        assert not [k for k, _ in info["headers"] if k.startswith("x-meshctl-")]
        # telemetry names the entry's host, not PassthroughCluster
        metrics = rt.telemetry.render()
    assert 'destination_service="*.0.0.1"' in metrics and 'destination_service_name="localhost"' in metrics, metrics
    assert "PassthroughCluster" not in metrics


# ------------------------------------------------------------------ WorkloadEntry

def _proxy_config_with(text: str, listen: int, snapshot):
    resources = load_resources_text(text, "we.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    node = Node(
        workload=Workload(name="sleep-0", service="sleep"),
        listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),),
    )
    return compile_proxy(Inputs(resources, snapshot), node)


async def test_a_workload_entry_joins_a_mesh_service_and_a_service_entry_selects_others(upstreams):
    from meshctl.model.base import FrozenDict
    from meshctl.pilot.compile import META_SERVICE_PORT
    from meshctl.registry.base import Instance

    launched, vm, legacy = upstreams("launched"), upstreams("vm"), upstreams("legacy")
    snapshot = {"reviews": (Instance(id="reviews-v1-0", service="reviews", address="127.0.0.1", port=launched.port,
                                     labels=FrozenDict(app="reviews", version="v1"),
                                     meta=FrozenDict({META_SERVICE_PORT: "9080"})),)}
    lp = free_port()
    cfg = _proxy_config_with(f"""\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: reviews-vm
spec:
  address: 127.0.0.1
  ports: {{http: {vm.port}}}
  labels: {{app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v3}}}}]
  - route: [{{destination: {{host: reviews, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: legacy-0
spec:
  address: 127.0.0.1
  ports: {{http: {legacy.port}}}
  labels: {{app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: legacy
spec:
  hosts: [legacy.example]
  location: MESH_INTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector:
    labels: {{app: legacy}}
""".replace("  location: MESH_INTERNAL\n", ""), lp, snapshot)
    async with running_proxy(cfg):
        code, info = await _get(lp, "http://reviews:9080/r")
        assert code == 200 and info["upstream"] == "launched", info
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "-H", "end-user: jason", "http://reviews:9080/r")
        assert json.loads(r.stdout)["upstream"] == "vm"
        code, info = await _get(lp, "http://legacy.example/l")
        assert code == 200 and info["upstream"] == "legacy", info


# ------------------------------------------------------------------ Sidecar

async def test_a_sidecars_egress_hosts_limit_what_the_proxy_knows(upstreams):
    from meshctl.model.base import FrozenDict
    from meshctl.pilot.compile import META_SERVICE_PORT
    from meshctl.registry.base import Instance

    reviews, ratings = upstreams("reviews"), upstreams("ratings")
    snapshot = {name: (Instance(id=f"{name}-v1-0", service=name, address="127.0.0.1", port=up.port,
                                labels=FrozenDict(app=name, version="v1"), meta=FrozenDict({META_SERVICE_PORT: "9080"})),)
                for name, up in (("reviews", reviews), ("ratings", ratings))}
    lp = free_port()
    # Istio's reference example, in the default namespace, with this workload's outbound policy
    cfg = _proxy_config_with("""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: default
spec:
  egress:
  - hosts:
    - "./reviews.default.svc.cluster.local"
    - "istio-system/*"
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
""", lp, snapshot)
    assert not [c for c in cfg.clusters if "ratings" in c]  # not even in its config
    assert cfg.settings.outbound_traffic_policy == "REGISTRY_ONLY"
    async with running_proxy(cfg):
        code, info = await _get(lp, "http://reviews:9080/r")
        assert code == 200 and info["upstream"] == "reviews"
        code, body = await _get(lp, "http://ratings:9080/r")
        assert code == 502 and "BlackHoleCluster" in body
    assert ratings.requests == []
