"""Questions about the compiled mesh that the CLI asks without a running Pilot.

`meshctl inject-fault` must know which services the mesh routes and which
routes a VirtualService gives a host, exactly as Pilot's compiler sees them;
these answers live here, beside the compiler, so the CLI imports no private
helper of pilot/compile.py.
"""

from __future__ import annotations

from ..model.istio import HTTPRoute
from .compile import Inputs, _applies_to_mesh, _normalize_route, _vs_hosts


def mesh_hosts(inp: Inputs) -> set[str]:
    """Every host the mesh routes: registry services, ServiceEntries, and the
    non-wildcard hosts of VirtualServices bound to the mesh."""
    known = set(inp.services)
    for r in inp.virtual_services:
        if _applies_to_mesh(r):
            known.update(h for h in _vs_hosts(r) if "*" not in h)
    return known


def mesh_routes(inp: Inputs, host: str) -> list[HTTPRoute]:
    """The HTTP routes (destinations normalized to FQDN and port) of the first mesh
    VirtualService for ``host``; empty when none."""
    for r in inp.virtual_services:
        if _applies_to_mesh(r) and host in _vs_hosts(r):
            return [_normalize_route(h, r.namespace, inp.services) for h in r.spec.http]  # type: ignore[attr-defined]
    return []
