"""What meshctl does with each field of Istio's API: honoured, or refused by name.

The rule above all others: configuration meshctl accepts must be carried out.
A field or value meshctl does not implement is refused at ``route validate``
and ``route apply`` (and wherever resources are loaded) with an error naming
the file:line, the field path and "meshctl does not implement <field> yet",
never accepted and ignored.

This module is the one table of that. Keys are generic field paths, as in
Istio's reference (``spec.http[].mirror``: ``[]`` for a list item, ``{}`` for
a map value). An entry covers the field and everything below it, unless a
longer path has its own entry. DestinationRule traffic policies are looked up
at ``spec.trafficPolicy...`` wherever they appear (subsets, portLevelSettings).

- ``Honoured(proof)``: meshctl carries the field out; ``proof`` names the test
  that shows it, where there is one.
- ``Refused(reason)``: the field is refused whenever it is set.
- ``Refused(reason, allowed=...)``: only values outside ``allowed`` are refused
  (a list field: any item outside it); ``refused=...``: only those values.

Whoever implements a field removes its Refused entry in the same commit;
whoever finds a field that is accepted and ignored adds one here.
tests/unit/test_unsupported.py walks Istio's published field list
(tests/data/istio-api-fields.txt) against this table.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..model.base import FrozenDict

__all__ = [
    "Honoured",
    "Refused",
    "ANNOTATIONS",
    "FIELDS",
    "GROUPS",
    "annotation_refusal",
    "KINDS",
    "entry_for",
    "generic_path",
    "refusal_message",
    "kind_refusal",
    "refused_fields",
]


@dataclass(frozen=True, slots=True)
class Honoured:
    proof: str = ""  # "tests/...py::test_name" that shows it works


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    allowed: tuple[Any, ...] | None = None  # None: every value is refused
    refused: tuple[Any, ...] | None = None  # only these values are refused

    def refuses(self, value: Any) -> Any | None:
        """The first refused value (or the value itself), None when ``value`` is fine."""
        values = list(value) if isinstance(value, tuple) else [value]
        if self.allowed is None and self.refused is None:
            return value
        for v in values:
            if self.allowed is not None and v not in self.allowed:
                return v
            if self.refused is not None and v in self.refused:
                return v
        return None


Entry = Honoured | Refused

H = Honoured
R = Refused

_EXPORT_TO = R("every resource is visible mesh-wide", allowed=("*",))

# Kinds of Istio's API that meshctl knows of but does not implement: refused by name.
KINDS: dict[tuple[str, str], str] = {
    ("networking.istio.io", "EnvoyFilter"): "meshctl's proxy is not Envoy and takes no Envoy filter configuration",
    ("networking.istio.io", "ProxyConfig"): "proxy settings come from mesh.yaml's settings",
    ("extensions.istio.io", "WasmPlugin"): "no Wasm plug-ins",
    # Istio's v1alpha1 routing API, removed in 0.8; old samples still carry it
    ("config.istio.io", "RouteRule"): "Istio's v1alpha1 routing API was removed in 0.8: use a VirtualService",
    ("config.istio.io", "DestinationPolicy"): "Istio's v1alpha1 routing API was removed in 0.8: use a DestinationRule",
    ("config.istio.io", "EgressRule"): "Istio's v1alpha1 routing API was removed in 0.8: use a ServiceEntry",
    ("extensions", "Ingress"): "a Kubernetes Ingress: use a networking.istio.io Gateway and VirtualService",
    ("networking.k8s.io", "Ingress"): "a Kubernetes Ingress: use a networking.istio.io Gateway and VirtualService",
}

# API groups Istio itself removed, whose files still circulate (Istio's samples/bookinfo/policy):
# every kind in them is refused by name, with what replaced it.
GROUPS: dict[str, str] = {
    "config.istio.io": "Mixer's adapters, templates and rules (handler, instance, rule, ...) were removed "
                       "from Istio in 1.8: use AuthorizationPolicy for denials, Telemetry for metrics and logs, "
                       "meshctl's RateLimit (meshctl.io/v1alpha1) for quotas",
    "rbac.istio.io": "Istio's RBAC (ServiceRole, ServiceRoleBinding, ClusterRbacConfig) was removed in 1.6: "
                     "use security.istio.io AuthorizationPolicy",
    "authentication.istio.io": "Istio's authentication Policy and MeshPolicy were removed in 1.6: use "
                               "security.istio.io PeerAuthentication and RequestAuthentication",
    "gateway.networking.k8s.io": "the Kubernetes Gateway API: use networking.istio.io Gateway and VirtualService",
}

# Annotations in Istio's own domains (istio.io/..., *.istio.io/...) change what Istio does
# with a resource: AuthorizationPolicy's ``istio.io/dry-run: "true"`` only logs what it
# would deny. meshctl implements none, so each is refused by name, never ignored (an
# ignored dry-run would enforce the policy). Other annotations are the user's notes.
ANNOTATIONS: dict[str, str] = {
    "istio.io/dry-run": "AuthorizationPolicy dry-run: meshctl would enforce the policy, not only log it",
}


def annotation_refusal(key: str) -> str | None:
    """Why the metadata annotation ``key`` is refused, or None for an annotation meshctl may ignore."""
    domain = key.split("/", 1)[0] if "/" in key else ""
    if domain != "istio.io" and not domain.endswith(".istio.io"):
        return None
    reason = ANNOTATIONS.get(key, "Istio's annotations change what it does with a resource")
    return f"meshctl does not implement the annotation {key} yet ({reason})"


_TRAFFIC_POLICY: dict[str, Entry] = {
    "spec.trafficPolicy": H(),
    "spec.trafficPolicy.loadBalancer.simple": R(
        "meshctl's proxies have no original destination address",
        refused=("PASSTHROUGH",),
    ),
    "spec.trafficPolicy.loadBalancer.consistentHash": H("tests/unit/test_balance.py"),
    "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl": R(
        "generating the cookie when a request has none"
    ),
    "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes": R(""),
    "spec.trafficPolicy.loadBalancer.localityLbSetting": H("tests/unit/test_locality.py"),
    "spec.trafficPolicy.loadBalancer.warmupDurationSecs": H("tests/unit/test_warmup.py"),
    "spec.trafficPolicy.loadBalancer.warmup": H("tests/unit/test_warmup.py"),
    "spec.trafficPolicy.loadBalancer.backendUtilization": R(""),
    "spec.trafficPolicy.loadBalancer.zoneAwareLbSetting": R(""),
    "spec.trafficPolicy.connectionPool": H("tests/unit/test_breaker.py"),
    "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive": R(""),
    "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration": R(""),
    "spec.trafficPolicy.connectionPool.tcp.idleTimeout": R("http.idleTimeout is implemented"),
    "spec.trafficPolicy.connectionPool.http.http2KeepAlive": R(""),
    "spec.trafficPolicy.outlierDetection": H("tests/unit/test_outlier.py"),
    "spec.trafficPolicy.outlierDetection.failurePercentageThreshold": R(""),
    "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes": R(""),
    "spec.trafficPolicy.tls": H(),
    "spec.trafficPolicy.tls.credentialName": R("use clientCertificate, privateKey, caCertificates"),
    "spec.trafficPolicy.tls.caCertCredentialName": R(""),
    "spec.trafficPolicy.tls.caCrl": R("certificate revocation lists"),
    "spec.trafficPolicy.tls.subjectAltNames": H("tests/integration/test_subject_alt_names.py"),
    "spec.trafficPolicy.portLevelSettings": H(),
    "spec.trafficPolicy.proxyProtocol": R(""),
    "spec.trafficPolicy.retryBudget": R(""),
    "spec.trafficPolicy.tunnel": R(""),
}

FIELDS: dict[str, dict[str, Entry]] = {
    "VirtualService": {
        "spec.hosts": H("tests/unit/test_pilot_compile.py"),
        "spec.gateways": H(),
        "spec.exportTo": _EXPORT_TO,
        "spec.http": H("tests/unit/test_route.py"),
        "spec.http[].match[].statPrefix": R("per-match statistics"),
        "spec.http[].redirect.prefixRewrite": R(""),
        "spec.http[].delegate": H("tests/integration/test_delegate_proxy.py"),
        "spec.http[].retries.retryRemoteLocalities": H("tests/unit/test_locality.py"),
        "spec.http[].retries.backoff": R("retries back off as Envoy's default does"),
        "spec.http[].retries.retryIgnorePreviousHosts": R(""),
        "spec.http[].fault.delay.exponentialDelay": R(""),
        "spec.http[].fault.abort.http2Error": R(""),
        "spec.http[].mirror": H("tests/integration/test_mirror.py"),
        "spec.http[].mirrorPercentage": H("tests/integration/test_mirror.py"),
        "spec.http[].mirrorPercent": H("tests/unit/test_mirror_decision.py"),
        "spec.http[].mirror_percent": R("the legacy spelling: use mirrorPercentage"),
        "spec.http[].mirrors": H("tests/integration/test_mirror.py"),
        "spec.http[].corsPolicy": H("tests/integration/test_cors.py"),
        "spec.http[].corsPolicy.allowOrigin": R("the deprecated allowOrigin: use allowOrigins"),
        "spec.http[].corsPolicy.unmatchedPreflights": R("unmatched preflights are forwarded (FORWARD)"),
        "spec.tcp": H("tests/e2e/test_gateways.py"),
        "spec.tcp[].match": H("tests/unit/test_pilot_compile.py"),  # port and gateways
        "spec.tcp[].match[].destinationSubnets": R(""),
        "spec.tcp[].match[].sourceLabels": R(""),
        "spec.tcp[].match[].sourceNamespace": R(""),
        "spec.tcp[].match[].sourceSubnet": R(""),
        "spec.tls": H("tests/e2e/test_gateways.py"),  # on gateways; validate refuses them on sidecars
        "spec.tls[].match[].destinationSubnets": R(""),
        "spec.tls[].match[].sourceLabels": R(""),
        "spec.tls[].match[].sourceNamespace": R(""),
    },
    "DestinationRule": {
        "spec.host": H("tests/unit/test_pilot_compile.py"),
        "spec.exportTo": _EXPORT_TO,
        "spec.workloadSelector": R(""),
        "spec.subsets": H("tests/unit/test_pilot_compile.py"),
        **_TRAFFIC_POLICY,
    },
    "Gateway": {
        "spec.selector": H(),
        "spec.servers": H(),
        "spec.servers[].bind": R(""),
        "spec.servers[].defaultEndpoint": R(""),
        "spec.servers[].port.targetPort": R(""),
        "spec.servers[].port.protocol": R(
            "UDP gateway servers",
            allowed=tuple(q for p in ("HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "MYSQL", "REDIS")
                          for q in (p, p.lower())),
        ),
        "spec.servers[].tls": H("tests/e2e/test_gateways.py"),
        "spec.servers[].tls.mode": R("AUTO_PASSTHROUGH (multi-network east-west gateways)", refused=("AUTO_PASSTHROUGH",)),
        "spec.servers[].tls.alpnProtocols": R("HTTPS servers offer h2 and http/1.1"),
        "spec.servers[].tls.caCertCredentialName": R("give the CA with `meshctl secret create tls --ca-cert` or a NAME-cacert secret"),
        "spec.servers[].tls.caCrl": R("certificate revocation lists"),
        "spec.servers[].tls.credentialNames": R("one credentialName per server"),
        "spec.servers[].tls.ecdhCurves": R(""),
        "spec.servers[].tls.insecureSkipVerify": R(""),
        "spec.servers[].tls.tlsCertificates": R("one certificate per server"),
        "spec.servers[].tls.verifyCertificateHash": R(""),
        "spec.servers[].tls.verifyCertificateSpki": R(""),
    },
    "ServiceEntry": {
        "spec.hosts": H("tests/unit/test_pilot_compile.py"),
        "spec.addresses": H("tests/integration/test_serviceentry_addresses.py"),
        "spec.ports": H("tests/integration/test_serviceentry.py"),
        "spec.location": H("tests/integration/test_workloadentry_identity.py"),
        "spec.resolution": R("", refused=("DYNAMIC_DNS",)),
        "spec.endpoints": H("tests/integration/test_serviceentry.py"),
        "spec.endpoints[].locality": H("tests/unit/test_locality.py"),
        "spec.endpoints[].network": R("meshctl's mesh is one network: no east-west gateway reaches another"),
        "spec.endpoints[].serviceAccount": H("tests/integration/test_workloadentry_identity.py"),
        "spec.workloadSelector": H("tests/integration/test_serviceentry.py"),
        "spec.exportTo": _EXPORT_TO,
        "spec.subjectAltNames": H("tests/integration/test_subject_alt_names.py"),
    },
    "Sidecar": {
        "spec.workloadSelector": H("tests/integration/test_serviceentry.py"),
        "spec.egress": H("tests/integration/test_serviceentry.py"),
        "spec.egress[].port": R("egress listeners per port: hosts apply to every port"),
        "spec.egress[].bind": R(""),
        "spec.egress[].captureMode": R(""),
        "spec.ingress": H("tests/integration/test_sidecar_ingress.py"),
        "spec.ingress[].captureMode": R("meshctl captures no traffic (no iptables): ingress listeners are bound "
                                        "as with captureMode NONE", refused=("IPTABLES",)),
        "spec.ingress[].port.targetPort": R("give the app's port in defaultEndpoint"),
        "spec.ingress[].tls": R("sidecar ingress listeners speak the mesh's mTLS (PeerAuthentication), "
                                "not a TLS of their own"),
        "spec.ingress[].connectionPool": R("inbound connection limits"),
        "spec.inboundConnectionPool": R(""),
        "spec.outboundTrafficPolicy": H("tests/integration/test_serviceentry.py"),
        "spec.outboundTrafficPolicy.egressProxy": R(""),
    },
    "WorkloadEntry": {
        "spec.address": H("tests/integration/test_serviceentry.py"),
        "spec.ports": H("tests/integration/test_serviceentry.py"),
        "spec.labels": H("tests/integration/test_serviceentry.py"),
        "spec.weight": H(),
        "spec.network": R("meshctl's mesh is one network: no east-west gateway reaches another"),
        "spec.locality": H("tests/unit/test_locality.py"),
        "spec.serviceAccount": H("tests/integration/test_workloadentry_identity.py"),
    },
    "WorkloadGroup": {
        "spec.metadata.labels": H("tests/integration/test_workloadgroup.py"),
        "spec.metadata.annotations": R("annotations mean nothing to meshctl"),
        "spec.template": H("tests/integration/test_workloadgroup.py"),
        "spec.template.address": R("each instance registers its own address"),
        "spec.template.labels": R("a group's labels go in metadata.labels"),
        "spec.template.ports": R("each instance registers its own port"),
        "spec.template.network": R("meshctl's mesh is one network: no east-west gateway reaches another"),
        "spec.probe": R("health comes from the registry's checks: Consul's, Eureka's heartbeats"),
    },
    "PeerAuthentication": {
        "spec.selector": H(),
        "spec.mtls": H(),
        "spec.portLevelMtls": H(),
    },
    "AuthorizationPolicy": {
        "spec.selector": H("tests/unit/test_authz.py"),
        "spec.action": H("tests/integration/test_ext_authz.py"),
        "spec.provider": H("tests/integration/test_ext_authz.py"),
        "spec.rules": H("tests/unit/test_authz.py"),
        "spec.rules[].from[].source.requestPrincipals": H("tests/e2e/test_jwt.py"),
        "spec.rules[].from[].source.notRequestPrincipals": H("tests/unit/test_authz.py"),
        "spec.rules[].from[].source.serviceAccounts": R("use principals"),
        "spec.rules[].from[].source.notServiceAccounts": R("use notPrincipals"),
        "spec.rules[].from[].source.trustDomains": R(""),
        "spec.rules[].from[].source.notTrustDomains": R(""),
        "spec.targetRef": R("use selector"),
        "spec.targetRefs": R("use selector"),
    },
    "Telemetry": {
        "spec.selector": H("tests/unit/test_telemetry_api.py"),
        "spec.targetRef": R("use selector (gateways: selector with their labels)"),
        "spec.targetRefs": R("use selector (gateways: selector with their labels)"),
        "spec.tracing": H("tests/e2e/test_telemetry_api.py"),
        "spec.tracing[].match": R("per-direction tracing"),
        "spec.tracing[].providers": R("traces go where mesh.yaml's settings.tracing sends them"),
        "spec.tracing[].customTags": R("custom span tags"),
        "spec.tracing[].disableContextPropagation": R(""),
        "spec.tracing[].useRequestIdForTraceSampling": R(""),
        "spec.tracing[].enableIstioTags": R(""),
        "spec.accessLogging": H("tests/e2e/test_telemetry_api.py"),
        "spec.accessLogging[].providers[].name": R("access logs go to the sidecar's access log file (provider envoy)",
                                                    allowed=("envoy",)),
        "spec.metrics": H("tests/e2e/test_telemetry_api.py"),
        "spec.metrics[].providers[].name": R("metrics are served to Prometheus (provider prometheus)",
                                             allowed=("prometheus",)),
        "spec.metrics[].reportingInterval": R("Prometheus scrapes the current values"),
        "spec.metrics[].overrides[].match.customMetric": R("custom metrics"),
        "spec.metrics[].overrides[].tagOverrides{}.value": R("tag values from CEL expressions; REMOVE is implemented"),
        "spec.metrics[].overrides[].tagOverrides{}.operation": R("tag values from CEL expressions (UPSERT); REMOVE "
                                                                 "is implemented", allowed=("REMOVE",)),
    },
    "RequestAuthentication": {
        "spec.selector": H("tests/unit/test_pilot_compile.py"),
        "spec.jwtRules": H("tests/unit/test_jwt.py"),
        "spec.jwtRules[].jwks_uri": R("write jwksUri"),
        "spec.targetRef": R("use selector"),
        "spec.targetRefs": R("use selector"),
    },
}

# DestinationRule traffic policies nest: all of them are looked up as the top-level one.
_TP_NESTED = re.compile(r"^spec\.(?:subsets\[\]\.trafficPolicy|trafficPolicy)(?:\.portLevelSettings\[\])?")


def generic_path(path: str) -> str:
    """``spec.http[0].route[1]`` → ``spec.http[].route[]`` (map keys are left as they are)."""
    return re.sub(r"\[\d+\]", "[]", path)


def _candidates(kind: str, path: str) -> Iterator[str]:
    yield path
    if kind == "DestinationRule":
        m = _TP_NESTED.match(path)
        if m:
            rest = path[m.end() :]
            if rest.startswith(".port") and not rest.startswith(".portLevelSettings"):
                return  # portLevelSettings[].port: honoured with portLevelSettings
            yield "spec.trafficPolicy" + rest


def entry_for(kind: str, path: str) -> tuple[str, Entry] | None:
    """The table entry that covers generic ``path`` of ``kind``: (its key, entry)."""
    table = FIELDS.get(kind)
    if table is None:
        return None
    for candidate in reversed(list(_candidates(kind, path))):  # the nested policy as the top one first
        p = candidate
        while p:
            if p in table:
                return p, table[p]
            cut = max(p.rfind("."), p.rfind("["), p.rfind("{"))
            if cut <= 0:
                break
            p = p[:cut]
    if path.startswith("spec.subsets[]") or path.startswith("spec.trafficPolicy"):
        return ("spec.subsets", table["spec.subsets"]) if kind == "DestinationRule" else None
    return None


def _name_of(key: str) -> str:
    return re.sub(r"\[\]|\{\}", "", key.rsplit(".", 1)[-1])


def refusal_message(key: str, entry: Refused, value: Any = None) -> str:
    name = _name_of(key)
    if entry.allowed is not None or entry.refused is not None:
        name = f"{name} {value}"
    why = f" ({entry.reason})" if entry.reason else ""
    return f"meshctl does not implement {name} yet{why}"


def kind_refusal(group: str, kind: str) -> str | None:
    reason = KINDS.get((group, kind)) or GROUPS.get(group)
    if reason is None:
        return None
    return f"meshctl does not implement {kind} yet ({reason})"


# ---------------------------------------------------------------- walking a decoded spec


def _camel(name: str) -> str:
    if name == "from_":
        return "from"
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _is_set(value: Any, default: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (tuple, FrozenDict, dict)) and len(value) == 0:
        return False
    return value != default or isinstance(value, bool) and default is None


def refused_fields(kind: str, spec: Any) -> list[tuple[str, str]]:
    """(concrete field path, message) for every refused field set in ``spec``."""
    if kind not in FIELDS:
        return []
    out: list[tuple[str, str]] = []
    _walk(kind, spec, "spec", "spec", out)
    return out


def _walk(kind: str, obj: Any, path: str, gpath: str, out: list[tuple[str, str]]) -> None:
    from .codec import join_path

    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        if not _is_set(value, default):
            continue
        key = _camel(f.name)
        cpath, g = f"{path}.{key}", f"{gpath}.{key}"
        found = entry_for(kind, g)
        if found is not None and isinstance(found[1], Refused) and found[0] == _key_level(kind, g, found[0]):
            bad = found[1].refuses(value)
            if bad is not None:
                out.append((cpath, refusal_message(found[0], found[1], bad)))
                continue
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                _walk(kind, item, f"{cpath}[{i}]", f"{g}[]", out)
        elif isinstance(value, Mapping):
            for k, item in value.items():
                _walk(kind, item, join_path(cpath, k), f"{g}{{}}", out)
        else:
            _walk(kind, value, cpath, g, out)


def _key_level(kind: str, gpath: str, key: str) -> str:
    """The entry key when ``gpath`` is the field the entry is about (not below it)."""
    for candidate in _candidates(kind, gpath):
        if candidate == key:
            return key
    return ""
