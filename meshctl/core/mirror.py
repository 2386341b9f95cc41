"""Which mirrors (shadows) a routed request is copied to: Istio's HTTPRoute
``mirror`` with ``mirrorPercentage`` (or the deprecated integer
``mirrorPercent``), and the newer ``mirrors`` list, each with its own
``percentage``. Unset percentages mirror every request, as in Istio.

Pure: the caller passes the random source. The proxy side (sending the
shadow, bounded, fire-and-forget) is proxy/mirror.py.
"""

from __future__ import annotations

import random

from ..model.istio import Destination, HTTPRoute
from ..model.proxyconfig import cluster_name


def has_mirrors(route: HTTPRoute) -> bool:
    return route.mirror is not None or bool(route.mirrors)


def _chosen(percent: float, rand: random.Random) -> bool:
    return percent >= 100.0 or (percent > 0.0 and rand.random() * 100.0 < percent)


def mirror_destinations(route: HTTPRoute, rand: random.Random) -> list[Destination]:
    """The destinations this request is mirrored to (often none)."""
    out: list[Destination] = []
    if route.mirror is not None:
        if route.mirror_percentage is not None:
            percent = route.mirror_percentage.value
        elif route.mirror_percent is not None:
            percent = float(route.mirror_percent)
        else:
            percent = 100.0
        if _chosen(percent, rand):
            out.append(route.mirror)
    for m in route.mirrors:
        if _chosen(m.percentage.value if m.percentage is not None else 100.0, rand):
            out.append(m.destination)
    return out


def mirror_cluster(d: Destination) -> str:
    return cluster_name(d.host, d.port.number if d.port and d.port.number else 80, d.subset)


def shadow_authority(authority: str) -> str:
    """Envoy's shadow Host: ``-shadow`` after the host name, before any port
    (``httpbin:8000`` → ``httpbin-shadow:8000``)."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] + "-shadow" + authority[end + 1 :] if end >= 0 else authority + "-shadow"
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return authority + "-shadow"
