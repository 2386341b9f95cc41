"""corsPolicy through a real proxy, with the example of Istio's VirtualService
reference (istio.io/latest/docs/reference/config/networking/virtual-service/#CorsPolicy):
a preflight from the allowed origin is answered by the proxy, one from another
origin reaches the app, and an actual request gets allow-origin on its response."""

from __future__ import annotations

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import META_SERVICE_PORT, Inputs, Node, compile_proxy
from meshctl.registry.base import Instance

from proxy_testkit import curl, free_port, running_proxy

RULES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-route
spec:
  hosts:
  - ratings.prod.svc.cluster.local
  http:
  - route:
    - destination:
        host: ratings.prod.svc.cluster.local
        subset: v1
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      allowMethods:
      - POST
      - GET
      allowCredentials: false
      allowHeaders:
      - X-Foo-Bar
      maxAge: "24h"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings.prod.svc.cluster.local
  subsets:
  - name: v1
    labels: {version: v1}
"""


def _config(port: int, listen: int):
    resources = load_resources_text(RULES, "cors.yaml")
    assert not has_errors(validate(resources)), [str(f) for f in validate(resources)]
    snapshot = {"ratings.prod": (Instance(id="ratings-v1-0", service="ratings", address="127.0.0.1", port=port,
                                          labels=FrozenDict(version="v1"), meta=FrozenDict({META_SERVICE_PORT: "9080"})),)}
    node = Node(workload=Workload(name="web-0", service="web"),
                listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),))
    return compile_proxy(Inputs(resources, snapshot), node)


def _head(out: bytes) -> tuple[int, dict[str, str]]:
    head = out.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}


async def test_cors_policy_of_istios_reference(upstream):
    lp = free_port()
    url = "http://ratings.prod.svc.cluster.local:9080/ratings/0"
    async with running_proxy(_config(upstream.port, lp)):
        # a preflight from the allowed origin: answered by the proxy
        r = await curl("-si", "-X", "OPTIONS", "-x", f"http://127.0.0.1:{lp}", "-H", "Origin: https://example.com",
                       "-H", "Access-Control-Request-Method: POST", url)
        status, h = _head(r.stdout)
        assert status == 200, r.stdout
        assert h["access-control-allow-origin"] == "https://example.com"
        assert h["access-control-allow-methods"] == "POST,GET"
        assert h["access-control-allow-headers"] == "X-Foo-Bar"
        assert h["access-control-max-age"] == "86400"
        assert "access-control-allow-credentials" not in h
        assert upstream.requests == []
        # a preflight from another origin goes to the app, and gets no CORS headers
        r = await curl("-si", "-X", "OPTIONS", "-x", f"http://127.0.0.1:{lp}", "-H", "Origin: https://evil.example",
                       "-H", "Access-Control-Request-Method: POST", url)
        status, h = _head(r.stdout)
        assert "access-control-allow-origin" not in h
        assert status == 501  # the test app's own answer to OPTIONS: it got there
        # an actual request from the allowed origin: allow-origin on the app's response
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", "-H", "Origin: https://example.com", url)
        status, h = _head(r.stdout)
        assert status == 200 and h["access-control-allow-origin"] == "https://example.com"
        # without Origin: nothing added
        r = await curl("-si", "-x", f"http://127.0.0.1:{lp}", url)
        assert "access-control-allow-origin" not in _head(r.stdout)[1]
