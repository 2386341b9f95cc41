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


def unknown_service_findings(resources, context, snapshot) -> list:
    """Warnings for the mesh-service hosts (``*.svc.cluster.local`` once a short name is
    expanded in the rule's namespace, as Istio does) of VirtualServices and DestinationRules
    in ``resources`` that no service of the registry (``snapshot``) or of a ServiceEntry
    (of ``context`` + ``resources``) has: such a rule applies to nothing until a service of
    that name registers (a rule written for another namespace than the mesh's, say).
    Nothing is said when the registry is empty (no mesh has run: nothing to check against)."""
    from ..loader.resources import source_of
    from ..loader.validate import Finding
    from ..model.istio import DestinationRule, VirtualService
    from ..model.proxyconfig import DEFAULT_DOMAIN_SUFFIX
    from .compile import discover_services, service_host

    if not snapshot:
        return []
    keys = {r.key for r in resources}
    services = discover_services([r for r in context if r.key not in keys] + list(resources), snapshot)
    out = []
    for r in resources:
        if isinstance(r.spec, VirtualService):
            named = [(f"spec.hosts[{i}]", h) for i, h in enumerate(r.spec.hosts)]
        elif isinstance(r.spec, DestinationRule):
            named = [("spec.host", r.spec.host)]
        else:
            continue
        for field, h in named:
            if not h or "*" in h:
                continue
            host = service_host(h, r.namespace, services)
            if host in services or not host.endswith("." + DEFAULT_DOMAIN_SUFFIX):
                continue
            short = host.split(".")[0]
            same = sorted(s for s in services if s.split(".")[0] == short and s.endswith("." + DEFAULT_DOMAIN_SUFFIX))
            hint = f"; the mesh has {', '.join(same)}" if same else ""
            out.append(Finding("warning", source_of(r, field), field,
                               f"{h if h == host else f'{h} ({host})'} names no known service: this {r.kind} applies to nothing "
                               f"until a service of that name registers{hint}"))
    return out
