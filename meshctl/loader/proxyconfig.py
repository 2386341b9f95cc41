"""ProxyConfig files: what ``meshctl proxy run --config FILE`` reads.

The file is ``to_data(ProxyConfig)``, in YAML or JSON (docs/proxyconfig.md).
On top of the codec's shape and type checks, a config must hang together.
``check_proxy_config`` is the one validator of a ProxyConfig: the loader
calls it on files, and the proxy's runtime on every config it is asked to
apply (from Pilot or a file), so both accept and refuse the same configs:

- listener ``direction`` is outbound, binding, inbound or gateway; protocol is
  http or tcp; mtlsMode is STRICT, PERMISSIVE or DISABLE; names are unique and
  no two listeners bind one address:port (port 0 aside);
- outbound and gateway listeners, and http bindings, name a ``routeTable``
  that exists; bindings name ``service`` and ``servicePort``; inbound
  listeners name ``appPort`` (``appAddress`` defaults to 127.0.0.1);
- every route destination (and mirror) names a cluster that exists:
  ``cluster_name(host, port.number, subset)``, so a port is required;
  tcp bindings without tcpRoutes need the service's own cluster;
- routeTables and clusters are keyed by their name (a missing ``name`` is
  taken from the key);
- settings the proxy cannot carry out (model.proxyconfig.settings_problems).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..model.istio import Destination
from ..model.proxyconfig import ProxyConfig, cluster_name, settings_problems
from .codec import LineMap, LoadError, decode_collect, join_path, line_of, raise_errors, to_data

__all__ = ["load_proxy_config", "load_proxy_config_text", "dump_proxy_config", "check_proxy_config"]

DIRECTIONS = ("outbound", "binding", "inbound", "gateway")
LISTENER_PROTOCOLS = ("http", "tcp")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
CLUSTER_PROTOCOLS = ("http", "http2", "grpc", "tcp")
HEALTH = ("HEALTHY", "UNHEALTHY", "DRAINING")


def dump_proxy_config(cfg: ProxyConfig) -> dict:
    """The file form of a ProxyConfig (also served as JSON by pilot and the admin API)."""
    return to_data(cfg)


def load_proxy_config(path: str | Path) -> ProxyConfig:
    """Read a ProxyConfig from a YAML or JSON file; LoadError(s) name file:line:field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(str(path), None, "", "no such file") from None
    except UnicodeDecodeError as exc:
        raise LoadError(str(path), None, "", f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise LoadError(str(path), None, "", f"cannot read: {exc.strerror or exc}") from None
    return load_proxy_config_text(text, str(path))


def load_proxy_config_text(text: str, file: str = "<config>") -> ProxyConfig:
    from .source import parse_documents  # YAML: a sidecar under Pilot gets JSON and never loads it

    docs, errors = parse_documents(text, file)
    raise_errors(errors)
    if len(docs) != 1:
        line = docs[1].line if len(docs) > 1 else None
        raise LoadError(file, line, "", f"expected one ProxyConfig document, found {len(docs)}")
    doc = docs[0]
    data = _fill_names(doc.data)
    cfg, errors = decode_collect(ProxyConfig, data, path="", lines=doc.lines, file=file)
    raise_errors(errors)
    assert cfg is not None
    raise_errors(check_proxy_config(cfg, file=file, lines=doc.lines))
    return cfg


def _fill_names(data: Any) -> Any:
    """routeTables.X and clusters.X may leave out ``name: X``."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    for key in ("routeTables", "clusters"):
        table = data.get(key)
        if isinstance(table, Mapping):
            data[key] = {
                k: ({"name": k, **v} if isinstance(v, Mapping) and "name" not in v else v) for k, v in table.items()
            }
    return data


def _choices(value: str, allowed: Sequence[str]) -> str:
    import difflib  # error messages only

    same_case = [a for a in allowed if a.lower() == value.lower()]
    hint = same_case or difflib.get_close_matches(value, list(allowed), n=1)
    if hint:
        return f"unknown value {value!r} (did you mean {hint[0]}?)"
    return f"unknown value {value!r} (expected one of: {', '.join(allowed)})"


def check_proxy_config(cfg: ProxyConfig, *, file: str = "<config>", lines: LineMap | None = None) -> list[LoadError]:
    """Consistency errors of a decoded ProxyConfig ([] when it hangs together).

    Pilot and the proxy can call this on a config that did not come from a
    file (then lines are unknown and errors carry the field path only).
    """
    errors: list[LoadError] = []

    def err(field: str, message: str) -> None:
        errors.append(LoadError(file, line_of(lines, field), field, message))

    def enum(field: str, value: str | None, allowed: Sequence[str]) -> None:
        if value is not None and value not in allowed:
            err(field, _choices(value, allowed))

    def port(field: str, value: int | None, *, zero_ok: bool = False) -> None:
        low = 0 if zero_ok else 1
        if value is not None and not low <= value <= 65535:
            err(field, f"port {value} is outside {low}-65535")

    def destination(field: str, dest: Destination) -> None:
        if dest.port is None or dest.port.number is None:
            err(field, f"destination {dest.host!r} needs port.number (clusters are per port)")
            return
        name = cluster_name(dest.host, dest.port.number, dest.subset)
        if name not in cfg.clusters:
            import difflib  # error messages only

            hint = difflib.get_close_matches(name, list(cfg.clusters), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            err(field, f"cluster {name!r} is not defined in clusters{extra}")

    for key, table in cfg.route_tables.items():
        tpath = join_path("routeTables", key)
        if table.name != key:
            err(f"{tpath}.name", f"name {table.name!r} differs from its key {key!r}")
        for i, vh in enumerate(table.virtual_hosts):
            for j, route in enumerate(vh.routes):
                rpath = f"{tpath}.virtualHosts[{i}].routes[{j}]"
                if not (route.route or route.redirect or route.direct_response):
                    err(rpath, "a route needs one of route, redirect or directResponse")
                for k, d in enumerate(route.route):
                    destination(f"{rpath}.route[{k}].destination", d.destination)
                if route.mirror is not None:
                    destination(f"{rpath}.mirror", route.mirror)
                for k, mirror in enumerate(route.mirrors):
                    destination(f"{rpath}.mirrors[{k}].destination", mirror.destination)

    for key, cluster in cfg.clusters.items():
        cpath = join_path("clusters", key)
        if cluster.name != key:
            err(f"{cpath}.name", f"name {cluster.name!r} differs from its key {key!r}")
        enum(f"{cpath}.protocol", cluster.protocol, CLUSTER_PROTOCOLS)
        port(f"{cpath}.port", cluster.port)
        for i, ep in enumerate(cluster.endpoints):
            port(f"{cpath}.endpoints[{i}].port", ep.port)
            enum(f"{cpath}.endpoints[{i}].health", ep.health, HEALTH)

    seen: dict[str, int] = {}
    bound: dict[tuple[str, int], int] = {}
    for i, lst in enumerate(cfg.listeners):
        lpath = f"listeners[{i}]"
        if lst.name in seen:
            err(f"{lpath}.name", f"duplicate listener name {lst.name!r} (also listeners[{seen[lst.name]}])")
        seen.setdefault(lst.name, i)
        if lst.port != 0 and (lst.address, lst.port) in bound:
            err(f"{lpath}.port", f"{lst.address}:{lst.port} is used by another listener "
                                 f"(listeners[{bound[(lst.address, lst.port)]}])")
        bound.setdefault((lst.address, lst.port), i)
        enum(f"{lpath}.direction", lst.direction, DIRECTIONS)
        enum(f"{lpath}.protocol", lst.protocol, LISTENER_PROTOCOLS)
        enum(f"{lpath}.mtlsMode", lst.mtls_mode, MTLS_MODES)
        port(f"{lpath}.port", lst.port, zero_ok=True)  # 0: any free port (tests)
        if lst.route_table is not None and lst.route_table not in cfg.route_tables:
            defined = ", ".join(cfg.route_tables) or "none"
            err(f"{lpath}.routeTable", f"route table {lst.route_table!r} is not defined in routeTables (defined: {defined})")
        needs_table = lst.protocol == "http" and lst.direction in ("outbound", "gateway", "binding")
        if needs_table and lst.route_table is None:
            err(lpath, f"an http {lst.direction} listener needs routeTable")
        if lst.direction == "binding":
            if not lst.service:
                err(f"{lpath}.service", "a binding needs service")
            if lst.service_port is None:
                err(f"{lpath}.servicePort", "a binding needs servicePort")
            elif lst.protocol == "tcp" and not lst.tcp_routes and lst.service:
                name = cluster_name(lst.service, lst.service_port)
                if name not in cfg.clusters:
                    err(f"{lpath}.service", f"cluster {name!r} for this tcp binding is not defined in clusters")
        if lst.direction == "inbound":
            if lst.app_port is None:
                err(f"{lpath}.appPort", "an inbound listener needs appPort")
            else:
                port(f"{lpath}.appPort", lst.app_port)
        for j, tcp in enumerate(lst.tcp_routes):
            for k, td in enumerate(tcp.route):
                destination(f"{lpath}.tcpRoutes[{j}].route[{k}].destination", td.destination)
    for field, message in settings_problems(cfg.settings):
        err(f"settings.{field}", message)
    return errors
