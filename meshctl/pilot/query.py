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


def _named_hosts(r) -> list[tuple[str, str]]:
    """(field, host) of the mesh-service names a VirtualService or DestinationRule writes:
    its hosts, and (Istio's IST0101 for destinations) every route destination and mirror."""
    from ..model.istio import DestinationRule, VirtualService

    if isinstance(r.spec, DestinationRule):
        return [("spec.host", r.spec.host)]
    if not isinstance(r.spec, VirtualService):
        return []
    out = [(f"spec.hosts[{i}]", h) for i, h in enumerate(r.spec.hosts)]
    for kind in ("http", "tcp", "tls"):
        for i, route in enumerate(getattr(r.spec, kind)):
            out += [(f"spec.{kind}[{i}].route[{j}].destination.host", rd.destination.host)
                    for j, rd in enumerate(route.route)]
            if kind == "http":
                if route.mirror is not None:
                    out.append((f"spec.http[{i}].mirror.host", route.mirror.host))
                out += [(f"spec.http[{i}].mirrors[{j}].destination.host", m.destination.host)
                        for j, m in enumerate(route.mirrors)]
    return out


def unknown_service_findings(resources, context, snapshot) -> list:
    """Warnings for the mesh-service hosts (``*.svc.cluster.local`` once a short name is
    expanded in the rule's namespace, as Istio does) that VirtualServices (hosts and route
    destinations) and DestinationRules in ``resources`` name and that no service of the
    registry (``snapshot``) or of a ServiceEntry (of ``context`` + ``resources``) has: such a
    rule applies to nothing, or routes to nothing, until a service of that name registers
    (a rule written for another namespace than the mesh's, say). Istio's analyzer says
    IST0101 ReferencedResourceNotFound ("Referenced host not found") for a destination;
    Istio applies the rule all the same, and so does meshctl: these are warnings.
    A short name (``reviews``) whose service exists only in other namespaces gets the
    reason spelled out: it is the rule's namespace's ``reviews``, never another's.
    Nothing is said when the registry is empty (no mesh has run: nothing to check against)."""
    from ..loader.resources import source_of
    from ..loader.validate import Finding
    from ..model.proxyconfig import DEFAULT_DOMAIN_SUFFIX
    from .compile import discover_services, service_host

    if not snapshot:
        return []
    keys = {r.key for r in resources}
    services = discover_services([r for r in context if r.key not in keys] + list(resources), snapshot)
    out = []
    for r in resources:
        said: set[str] = set()
        for field, h in _named_hosts(r):
            if not h or "*" in h:
                continue
            host = service_host(h, r.namespace, services)
            if host in services or not host.endswith("." + DEFAULT_DOMAIN_SUFFIX) or host in said:
                continue
            said.add(host)  # once per host and rule: its first mention
            short = host.split(".")[0]
            same = sorted(s for s in services if s.split(".")[0] == short and s.endswith("." + DEFAULT_DOMAIN_SUFFIX))
            what = "applies to nothing" if field.startswith(("spec.host", "spec.hosts")) else "routes to no endpoint"
            if "." not in h and same:
                ns = sorted({s.split(".")[1] for s in same})
                msg = (f"{h} names no known service: a short host is of the rule's namespace {r.namespace!r} "
                       f"({host}), as in Istio, never of another namespace; the mesh has {', '.join(same)}. "
                       f"This {r.kind} {what} until {host} registers: to mean another namespace's, write "
                       f"{' or '.join(f'{short}.{n}' for n in ns)} (or its FQDN), or put the rule in namespace "
                       f"{' or '.join(repr(n) for n in ns)}")
            else:
                hint = f"; the mesh has {', '.join(same)}" if same else ""
                msg = (f"{h if h == host else f'{h} ({host})'} names no known service: this {r.kind} {what} "
                       f"until a service of that name registers{hint}")
            out.append(Finding("warning", source_of(r, field), field, msg))
    return out


def port_level_mtls_findings(resources, snapshot) -> list:
    """Warnings for PeerAuthentication ``portLevelMtls`` keys that no workload the policy selects
    serves: Istio keys them by the workload's (container) port; meshctl gives apps their ports
    from portRange, so a key applies when it is the service port (Bookinfo's 9080) or an app's
    own pinned port. Istio's authn task keys httpbin's container port 80, which a meshctl
    httpbin (service port 8000) never serves: said, not silently ignored. Nothing is said
    when no registered workload matches the selector (nothing to check against)."""
    from ..loader.resources import source_of
    from ..loader.validate import Finding
    from ..model.istio import PeerAuthentication
    from .compile import META_SERVICE_PORT

    out = []
    for r in resources:
        pa = r.spec
        if not isinstance(pa, PeerAuthentication) or not pa.port_level_mtls or not pa.selector:
            continue
        want = dict(pa.selector.match_labels)
        if not want:
            continue
        served: dict[str, set[int]] = {}
        for insts in snapshot.values():
            for inst in insts:
                if all(inst.labels.get(k) == v for k, v in want.items()) and META_SERVICE_PORT in inst.meta:
                    try:
                        served.setdefault(inst.service, set()).add(int(inst.meta[META_SERVICE_PORT]))
                    except ValueError:
                        pass
        ports = set().union(*served.values()) if served else set()
        for key in pa.port_level_mtls:
            if served and key not in ports:
                which = ", ".join(f"{s} {', '.join(map(str, sorted(p)))}" for s, p in sorted(served.items()))
                out.append(Finding(
                    "warning", source_of(r, f"spec.portLevelMtls.{key}"), f"spec.portLevelMtls.{key}",
                    f"no workload this PeerAuthentication selects serves port {key} (service ports: {which}); "
                    f"meshctl keys portLevelMtls by the service port or the app's own pinned port, so this "
                    f"setting does nothing unless {key} is an app's address port"))
    return out
