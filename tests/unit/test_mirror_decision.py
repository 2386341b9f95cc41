"""core/mirror.py: which mirrors a request goes to, and the shadow Host."""

from __future__ import annotations

import random

from meshctl.core.mirror import mirror_cluster, mirror_destinations, shadow_authority
from meshctl.model.istio import Destination, HTTPMirrorPolicy, HTTPRoute, Percent, PortSelector

V2 = Destination(host="httpbin.default.svc.cluster.local", subset="v2", port=PortSelector(number=8000))
V3 = Destination(host="httpbin.default.svc.cluster.local", subset="v3", port=PortSelector(number=8000))


def _share(route: HTTPRoute, n: int = 10000) -> dict[str, float]:
    rand = random.Random(7)
    counts: dict[str, int] = {}
    for _ in range(n):
        for d in mirror_destinations(route, rand):
            counts[d.subset or ""] = counts.get(d.subset or "", 0) + 1
    return {k: v / n for k, v in counts.items()}


def test_mirror_without_a_percentage_mirrors_everything():
    assert _share(HTTPRoute(mirror=V2)) == {"v2": 1.0}


def test_mirror_percentage_and_the_deprecated_mirror_percent():
    assert abs(_share(HTTPRoute(mirror=V2, mirror_percentage=Percent(25.0)))["v2"] - 0.25) < 0.02
    assert abs(_share(HTTPRoute(mirror=V2, mirror_percent=50))["v2"] - 0.5) < 0.02
    assert _share(HTTPRoute(mirror=V2, mirror_percentage=Percent(0.0))) == {}


def test_mirrors_each_with_its_own_percentage():
    share = _share(HTTPRoute(mirrors=(HTTPMirrorPolicy(destination=V2), HTTPMirrorPolicy(destination=V3, percentage=Percent(10.0)))))
    assert share["v2"] == 1.0 and abs(share["v3"] - 0.1) < 0.02


def test_shadow_host_is_envoys():
    assert shadow_authority("httpbin:8000") == "httpbin-shadow:8000"
    assert shadow_authority("httpbin") == "httpbin-shadow"
    assert shadow_authority("[::1]:80") == "[::1]-shadow:80"
    assert mirror_cluster(V2) == "outbound|8000|v2|httpbin.default.svc.cluster.local"
