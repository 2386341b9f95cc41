"""mesh.yaml → what to run: instances, their ports and environments. Pure.

Reading the file and checking its meaning happen here too, so `up` refuses a
bad mesh.yaml (naming file:line) before it starts anything. Ports are chosen
by an injected ``is_free`` test and earlier allocations are kept, so a
restarted or re-applied mesh keeps its addresses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..citadel.identity import is_path_segment
from ..core.locality import locality_problem
from ..loader.codec import LoadError, decode_collect, line_of, raise_errors
from ..loader.source import parse_documents
from ..model.base import FrozenDict
from ..model.mesh import MeshSpec
from ..model.proxyconfig import Node, Settings

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_mesh(path: Path) -> MeshSpec:
    """Read and check mesh.yaml; raises LoadError(s) naming file:line: field."""
    return load_mesh_lines(path)[0]


def load_mesh_lines(path: Path) -> tuple[MeshSpec, dict[str, int]]:
    """``load_mesh``, with the line of each field (``gateways[0].ports``)."""
    file = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LoadError(file, None, "", f"cannot read: {e.strerror}") from None
    docs, errors = parse_documents(text, file)
    raise_errors(errors)
    if len(docs) != 1:
        raise LoadError(file, None, "", f"expected one YAML document, found {len(docs)}")
    doc = docs[0]
    spec, errors = decode_collect(MeshSpec, doc.data, path="", lines=doc.lines, file=file)
    raise_errors(errors)
    assert spec is not None
    problems = check_mesh(spec)
    raise_errors([LoadError(file, line_of(doc.lines, p), p, m) for p, m in problems])
    return spec, doc.lines


def parse_port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a port range like 21000-21999")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not (1024 <= lo <= hi <= 65535):
        raise ValueError(f"{text!r}: ports must satisfy 1024 <= low <= high <= 65535")
    return lo, hi


def proxy_settings(spec: MeshSpec) -> Settings:
    """The ProxyConfig settings mesh.yaml gives every sidecar and gateway."""
    m = spec.settings
    return Settings(path_normalization=m.path_normalization, upgrade_types=m.upgrade_types,
                    request_timeout=m.request_timeout, max_connections=m.max_connections,
                    drain_duration=m.drain_duration, outbound_traffic_policy=m.outbound_traffic_policy,
                    extension_providers=m.extension_providers,
                    tracing_zipkin=m.tracing.zipkin, tracing_otlp=m.tracing.otlp,
                    tracing_sampling=m.tracing.sampling, outbound_users=tuple(str(u) for u in m.outbound_users))


def check_mesh(spec: MeshSpec) -> list[tuple[str, str]]:
    """Meaning checks: (field path, message) for each problem."""
    from ..model.proxyconfig import settings_problems

    out: list[tuple[str, str]] = [(f"settings.{f}", m) for f, m in settings_problems(proxy_settings(spec))]
    if spec.settings.outbound_users:  # user names unknown on this host, by name
        from ..core.peeruid import resolve_users
        from ..proxy.peercheck import user_uid

        _, problems = resolve_users(spec.settings.outbound_users, os.geteuid(), user_uid)
        out += [f for f in ((f"settings.outboundUsers[{i}]", m) for i, m in problems) if f not in out]
    try:
        parse_port_range(spec.settings.port_range)
    except ValueError as e:
        out.append(("settings.portRange", str(e)))
    if locality_problem(spec.settings.locality):
        out.append(("settings.locality", str(locality_problem(spec.settings.locality))))
    if spec.settings.advertise and (why := advertise_problem(spec.settings.advertise)):
        out.append(("settings.advertise", why))
    if spec.settings.mesh_id:
        from ..pilot.kvstore import check_mesh_id

        problem = check_mesh_id(spec.settings.mesh_id)
        if problem:
            out.append(("settings.meshId", problem))
    reg = spec.settings.registry
    if not (reg in ("", "embedded") or reg.startswith(("consul://", "consul+https://", "eureka://", "eureka+https://"))):
        out.append(("settings.registry", f"unknown registry {reg!r}: embedded, consul[+https]://HOST:PORT or eureka[+https]://HOST:PORT/eureka"))
    seen: dict[str, int] = {}
    local_ports: dict[int, str] = {}
    for i, svc in enumerate(spec.services):
        p = f"services[{i}]"
        if not NAME.match(svc.name):
            out.append((f"{p}.name", f"{svc.name!r} is not a DNS label (lower-case letters, digits, '-')"))
        if svc.name in seen:
            out.append((f"{p}.name", f"service {svc.name!r} is declared twice (first at services[{seen[svc.name]}])"))
        seen.setdefault(svc.name, i)
        if not 1 <= svc.port <= 65535:
            out.append((f"{p}.port", f"{svc.port} is not a port (1-65535)"))
        if svc.protocol not in ("http", "http2", "grpc", "tcp"):
            out.append((f"{p}.protocol", f"{svc.protocol!r}: one of http, http2, grpc, tcp"))
        if svc.service_account is not None and not is_path_segment(svc.service_account):
            out.append((f"{p}.serviceAccount", f"{svc.service_account!r} cannot be part of a SPIFFE ID: "
                                                "use letters, digits, '.', '-' and '_'"))
        if not svc.versions:
            out.append((f"{p}.versions", "a service needs at least one version (with a command or an address)"))
        vnames: set[str] = set()
        for j, v in enumerate(svc.versions):
            vp = f"{p}.versions[{j}]"
            if v.name in vnames:
                out.append((f"{vp}.name", f"version {v.name!r} is declared twice"))
            vnames.add(v.name)
            if bool(v.command) == bool(v.address):
                out.append((vp, "give exactly one of command (meshctl starts the app) or address (it is already running)"))
            if v.address and not re.fullmatch(r"[\w.\-]+:\d+", v.address):
                out.append((f"{vp}.address", f"{v.address!r} is not HOST:PORT"))
            if v.address and v.replicas != 1:
                out.append((f"{vp}.replicas", "an app given by address is one instance: replicas must be 1"))
            if v.replicas < 0:
                out.append((f"{vp}.replicas", "must be 0 or more"))
            if v.locality and locality_problem(v.locality):
                out.append((f"{vp}.locality", str(locality_problem(v.locality))))
        for up, port in svc.upstreams.items():
            if not 1 <= port <= 65535:
                out.append((f"{p}.upstreams.{up}", f"{port} is not a port"))
        hc = svc.health_check
        if hc and bool(hc.http) == bool(hc.tcp):
            out.append((f"{p}.healthCheck", "give one of http: PATH or tcp: true"))
        if hc and hc.http and not hc.http.startswith("/"):
            out.append((f"{p}.healthCheck.http", f"{hc.http!r} must be a path starting with /"))
    for i, gw in enumerate(spec.gateways):
        p = f"gateways[{i}]"
        if not NAME.match(gw.name):
            out.append((f"{p}.name", f"{gw.name!r} is not a DNS label"))
        if not gw.ports:
            out.append((f"{p}.ports", "a gateway needs ports: {GATEWAY_PORT: HOST_PORT}"))
        if gw.num_trusted_proxies < 0:
            out.append((f"{p}.numTrustedProxies", "must be 0 or more"))
        if gw.address != "127.0.0.1" and (why := gateway_address_problem(gw.address)):
            out.append((f"{p}.address", why))
        for gport, hport in gw.ports.items():
            if hport in local_ports:
                out.append((f"{p}.ports.{gport}", f"host port {hport} is already used by {local_ports[hport]}"))
            local_ports[hport] = gw.name
    return out


def advertise_problem(address: str) -> str | None:
    """Why ``address`` cannot be a host's advertised address (None: it can): other hosts
    connect to it, so it is one IP address of this host, not a wildcard or a name."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address (give this host's address, e.g. 10.0.0.12)"
    if ip.is_unspecified or ip.is_multicast:
        return f"{address}: other hosts cannot connect to it; give this host's own address"
    return None


def gateway_address_problem(address: str) -> str | None:
    """Why a gateway cannot listen on ``address`` (None: it can): an IP address, or 0.0.0.0 / :: for all."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address (127.0.0.1, this host's address, or 0.0.0.0 for every address)"
    return None


def gateway_registered_address(g: "GatewayPlan", advertise: str) -> str:
    """The address a gateway is registered at: where it listens; for a wildcard, the host's advertised one."""
    import ipaddress

    return advertise if ipaddress.ip_address(g.address).is_unspecified else g.address


def advertised(spec: MeshSpec) -> str:
    """The address this host's instances are registered at and listen on (inbound)."""
    return spec.settings.advertise or "127.0.0.1"


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True, slots=True)
class WorkloadPlan:
    name: str  # reviews-v2-0
    service: str
    version: str
    labels: FrozenDict[str, str]
    command: tuple[str, ...]
    cwd: str
    app_host: str
    app_port: int
    inbound_port: int
    outbound_port: int
    admin_port: int
    bindings: FrozenDict[str, int]  # service → local port
    env: FrozenDict[str, str]
    service_port: int
    protocol: str
    service_account: str
    locality: str = ""  # region/zone/subzone: versions[].locality, else settings.locality
    address: str = "127.0.0.1"  # the inbound listener's address, registered in the registry (settings.advertise)
    namespace: str = "default"  # settings.namespace: its identity's (ns/<namespace>) and its policies'


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    name: str
    labels: FrozenDict[str, str]
    ports: FrozenDict[int, int]  # gateway server port → host port
    admin_port: int
    trusted_proxies: int = 0
    locality: str = ""  # region/zone/subzone: the host's (settings.locality or `up --locality`)
    namespace: str = "default"  # settings.namespace
    address: str = "127.0.0.1"  # where its ports listen (mesh.yaml gateways[].address)


@dataclass(frozen=True, slots=True)
class Plan:
    workloads: tuple[WorkloadPlan, ...]
    gateways: tuple[GatewayPlan, ...]
    pilot_port: int
    allocations: FrozenDict[str, int]  # "reviews-v2-0/app" → port, kept for the next plan
    mixer_port: int
    citadel_port: int


@dataclass
class _Allocator:
    lo: int
    hi: int
    is_free: Callable[[int], bool]
    previous: Mapping[str, int]
    taken: set[int] = field(default_factory=set)
    result: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> int:
        prev = self.previous.get(key)
        if prev is not None and prev not in self.taken:
            self.taken.add(prev)
            self.result[key] = prev
            return prev
        for port in range(self.lo, self.hi + 1):
            if port in self.taken or port in self.previous.values():
                continue
            if self.is_free(port):
                self.taken.add(port)
                self.result[key] = port
                return port
        raise PlanError(f"no free port left in the range {self.lo}-{self.hi} (settings.portRange)")

    def fixed(self, key: str, port: int) -> int:
        self.taken.add(port)
        self.result[key] = port
        return port


class PlanError(Exception):
    pass


def env_name(service: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", service.upper()) + "_ADDR"


def runtime_proxy_env(outbound: int, own: Mapping[str, str]) -> dict[str, str]:
    """What runtimes whose HTTP clients ignore HTTP_PROXY need to use the sidecar anyway
    (Go's net/http, curl, Python's requests/httpx/urllib honour HTTP_PROXY as it is):
    Node >= 22.21 / 24 reads HTTP_PROXY for fetch and http.request with NODE_USE_ENV_PROXY=1
    (older Node has no switch: its apps need a proxy agent in code); the JVM's
    HttpURLConnection and java.net.http.HttpClient read the http.proxy* properties,
    which JAVA_TOOL_OPTIONS passes to every JVM (before the app's own options, so these win)."""
    java = f"-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={outbound} -Dhttp.nonProxyHosts=localhost|127.0.0.1|[::1]"
    own_java = own.get("JAVA_TOOL_OPTIONS", "")
    return {
        "NODE_USE_ENV_PROXY": own.get("NODE_USE_ENV_PROXY", "1"),
        "JAVA_TOOL_OPTIONS": f"{java} {own_java}".strip() if "http.proxyHost" not in own_java else own_java,
    }


def make_plan(spec: MeshSpec, base_dir: Path, is_free: Callable[[int], bool], previous: Mapping[str, int] = FrozenDict()) -> Plan:
    lo, hi = parse_port_range(spec.settings.port_range)
    alloc = _Allocator(lo, hi, is_free, previous)
    pilot_port = alloc.fixed("pilot", spec.settings.pilot_port) if spec.settings.pilot_port else alloc.get("pilot")
    workloads: list[WorkloadPlan] = []
    for gw in spec.gateways:
        for gport, hport in gw.ports.items():
            alloc.fixed(f"{gw.name}/{gport}", hport)
    for svc in spec.services:
        for v in svc.versions:
            for r in range(v.replicas):
                name = f"{svc.name}-{v.name}-{r}"
                labels: FrozenDict[str, str] = FrozenDict({"app": svc.name, "version": v.name, **v.labels})
                if v.address:
                    app_host, app_port_s = v.address.rsplit(":", 1)
                    app_port = int(app_port_s)
                else:
                    app_host, app_port = "127.0.0.1", alloc.get(f"{name}/app")
                inbound = alloc.get(f"{name}/inbound")
                outbound = alloc.get(f"{name}/outbound")
                admin = alloc.get(f"{name}/admin")
                # The declared port goes to the first instance that asks; the others (replicas
                # share the host) get one from the range. Apps read <SERVICE>_ADDR either way.
                bindings: FrozenDict[str, int] = FrozenDict(
                    {
                        up: alloc.fixed(f"{name}/bind/{up}", port) if port not in alloc.taken else alloc.get(f"{name}/bind/{up}")
                        for up, port in svc.upstreams.items()
                    }
                )
                own = {**svc.env, **v.env}
                env = {
                    **own,
                    **runtime_proxy_env(outbound, own),
                    "PORT": str(app_port),
                    "SERVICE_NAME": svc.name,
                    "SERVICE_VERSION": v.env.get("SERVICE_VERSION", v.name),
                    "HOSTNAME": name,
                    "POD_NAME": name,
                    "HTTP_PROXY": f"http://127.0.0.1:{outbound}",
                    "http_proxy": f"http://127.0.0.1:{outbound}",
                    "NO_PROXY": "localhost,127.0.0.1,::1",
                    "no_proxy": "localhost,127.0.0.1,::1",
                    "MESHCTL_WORKLOAD": name,
                }
                for up, port in bindings.items():
                    env[env_name(up)] = f"127.0.0.1:{port}"
                workloads.append(
                    WorkloadPlan(
                        name=name,
                        service=svc.name,
                        version=v.name,
                        labels=labels,
                        command=v.command,
                        cwd=str((base_dir / svc.cwd) if svc.cwd else base_dir),
                        app_host=app_host,
                        app_port=app_port,
                        inbound_port=inbound,
                        outbound_port=outbound,
                        admin_port=admin,
                        bindings=bindings,
                        env=FrozenDict(env),
                        service_port=svc.port,
                        protocol=svc.protocol,
                        service_account=svc.service_account or svc.name,
                        locality=v.locality if v.locality is not None else spec.settings.locality,
                        address=advertised(spec),
                        namespace=spec.settings.namespace,
                    )
                )
    gateways = tuple(
        GatewayPlan(name=gw.name, labels=FrozenDict({"app": gw.name, **gw.labels}), ports=gw.ports, admin_port=alloc.get(f"{gw.name}/admin"),
                    trusted_proxies=gw.num_trusted_proxies, locality=spec.settings.locality,
                    namespace=spec.settings.namespace, address=gw.address)
        for gw in spec.gateways
    )
    # Mixer and Citadel last, so that adding them moved no workload's ports. From the
    # range like every port of the mesh: outside the kernel's ephemeral ports, no client
    # socket can hold one when the process restarts on it.
    mixer_port, citadel_port = alloc.get("mixer"), alloc.get("citadel")
    return Plan(tuple(workloads), gateways, pilot_port, FrozenDict(alloc.result), mixer_port, citadel_port)


# ------------------------------------------------------------------ what each proxy tells Pilot


def workload_node(w: WorkloadPlan, spec: MeshSpec) -> "Node":
    from ..model.proxyconfig import Listener, Workload

    services = {s.name: s for s in spec.services}
    proto = "tcp" if w.protocol == "tcp" else "http"
    listeners = [
        Listener(name="inbound", direction="inbound", address=w.address, port=w.inbound_port, protocol=proto,
                 app_address=w.app_host, app_port=w.app_port, service_port=w.service_port),
        Listener(name="outbound", direction="outbound", address="127.0.0.1", port=w.outbound_port, protocol="http"),
    ]
    for up, port in sorted(w.bindings.items()):
        target = services.get(up)
        listeners.append(
            Listener(
                name=f"binding-{up}",
                direction="binding",
                address="127.0.0.1",
                port=port,
                protocol="tcp" if target and target.protocol == "tcp" else "http",
                service=up,
                service_port=target.port if target else 80,
            )
        )
    workload = Workload(name=w.name, service=w.service, namespace=w.namespace, labels=w.labels,
                        service_account=w.service_account, trust_domain=spec.settings.trust_domain, locality=w.locality)
    return Node(workload=workload, listeners=tuple(listeners), settings=proxy_settings(spec))


def gateway_node(g: GatewayPlan, spec: MeshSpec) -> "Node":
    from ..model.proxyconfig import Listener, Workload

    listeners = tuple(
        Listener(name=f"gateway-{gport}", direction="gateway", address=g.address, port=hport, protocol="http", service_port=gport,
                 trusted_proxies=g.trusted_proxies)
        for gport, hport in sorted(g.ports.items())
    )
    workload = Workload(name=g.name, service=g.name, namespace=g.namespace, labels=g.labels,
                        trust_domain=spec.settings.trust_domain, locality=g.locality)
    return Node(workload=workload, listeners=listeners, gateway=True, settings=proxy_settings(spec))
