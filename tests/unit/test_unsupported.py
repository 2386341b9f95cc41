"""Every field of Istio's API is honoured by meshctl or refused by name.

Walks tests/data/istio-api-fields.txt (derived from Istio's published API
schemas, see its header) against meshctl/loader/unsupported.py: for each
field, a resource setting it is loaded and validated as `route validate`
does, and either no error calls it unknown or unimplemented (honoured), or an
error names the field, its line and "meshctl does not implement" (refused).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshctl.loader.codec import LoadError
from meshctl.loader.resources import load_resources_text
from meshctl.loader.unsupported import FIELDS, KINDS, Honoured, Refused, entry_for
from meshctl.loader.validate import validate

DATA = Path(__file__).resolve().parent.parent / "data" / "istio-api-fields.txt"
GROUPS = {
    "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1",
    "Gateway": "networking.istio.io/v1",
    "ServiceEntry": "networking.istio.io/v1",
    "Sidecar": "networking.istio.io/v1",
    "WorkloadEntry": "networking.istio.io/v1",
    "WorkloadGroup": "networking.istio.io/v1",
    "EnvoyFilter": "networking.istio.io/v1alpha3",
    "ProxyConfig": "networking.istio.io/v1beta1",
    "PeerAuthentication": "security.istio.io/v1",
    "AuthorizationPolicy": "security.istio.io/v1",
    "RequestAuthentication": "security.istio.io/v1",
    "Telemetry": "telemetry.istio.io/v1",
}


def _fields() -> list[tuple[str, str, str]]:
    out = []
    for line in DATA.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, path, typ = line.split(" ", 2)
            out.append((kind, path, typ))
    return out


FIELD_LIST = _fields()
# Values with a meaning of their own (a condition key meshctl knows), where "1s" would not do.
SAMPLES = {("AuthorizationPolicy", "spec.rules[].when[].key"): "source.ip"}
# Fields honoured in one context only: the spec fields that give it (tls routes work on gateways).
CONTEXT = {("VirtualService", "spec.tls"): {"gateways": ["g"]}}


def _sample(typ: str, value: object = None) -> object:
    base, _, rest = typ.partition(":")
    if value is not None:
        return [value] if base == "array" else value
    if base == "string":
        if rest.startswith("enum="):
            return rest[5:].split("|")[0]
        return "aGk=" if rest == "byte" else "1s"
    if base == "integer":
        return 1
    if base == "number":
        return 1.0
    if base == "boolean":
        return True
    if base == "array":
        return [_sample(rest)] if rest != "object" else [{}]
    if base == "map":
        return {"k": _sample(rest)}
    return {}


def _document(kind: str, path: str, value: object) -> tuple[str, str]:
    """A resource setting ``path`` to ``value`` (lists get one item, maps one key "k"),
    as YAML text, and the concrete field path of what was set."""
    parts = path.split(".")
    concrete = []
    root: dict = {}
    node: dict = root
    for i, part in enumerate(parts[1:]):
        last = i == len(parts) - 2
        name = part.rstrip("[]{}")
        suffix = part[len(name):]
        child: object = value if last and not suffix else {}
        if suffix == "[]":
            inner: dict = {}
            node[name] = [value] if last else [inner]
            concrete.append(f"{name}[0]")
            node = inner
        elif suffix == "{}":
            inner = {}
            node[name] = {"k": value} if last else {"k": inner}
            concrete.append(f"{name}.k")
            node = inner
        else:
            node[name] = child
            concrete.append(name)
            if isinstance(child, dict) and not last:
                node = child
    for (k, prefix), extra in CONTEXT.items():
        if k == kind and (path == prefix or path.startswith((prefix + ".", prefix + "["))):
            root.update(extra)
    doc = {"apiVersion": GROUPS[kind], "kind": kind, "metadata": {"name": "x"}, "spec": root}
    return yaml.safe_dump(doc, sort_keys=False), "spec." + ".".join(concrete)


def _messages(text: str) -> list[str]:
    try:
        resources = load_resources_text(text, "f.yaml")
    except LoadError as e:
        errors = getattr(e, "errors", [e])
        return [str(x) for x in errors]
    return [str(f) for f in validate(resources) if f.level == "error"]


def test_the_field_list_covers_every_kind_meshctl_must_answer_for():
    kinds = {k for k, _, _ in FIELD_LIST}
    assert kinds == set(GROUPS)
    assert len(FIELD_LIST) > 700


def test_every_table_entry_names_a_field_of_istios_api():
    paths = {(k, p) for k, p, _ in FIELD_LIST}
    for kind, table in FIELDS.items():
        for key in table:
            assert any(k == kind and (p == key or p.startswith(key + ".") or p.startswith(key + "[") or p.startswith(key + "{")) for k, p in paths), (kind, key)


@pytest.mark.parametrize("kind,path,typ", FIELD_LIST, ids=[f"{k}:{p}" for k, p, _ in FIELD_LIST])
def test_each_istio_field_is_honoured_or_refused_by_name(kind, path, typ):
    if kind not in FIELDS:
        group = GROUPS[kind].split("/")[0]
        assert (group, kind) in KINDS, f"{kind} is neither implemented nor refused by name"
        text, _ = _document(kind, path, _sample(typ))
        msgs = _messages(text)
        assert any(f"kind: meshctl does not implement {kind} yet" in m for m in msgs), msgs
        return
    found = entry_for(kind, path)
    assert found is not None, f"{kind} {path}: no entry in meshctl/loader/unsupported.py"
    key, entry = found
    if isinstance(entry, Honoured):
        samples = [SAMPLES.get((kind, path), _sample(typ))]
    else:
        assert isinstance(entry, Refused)
        samples = []
        enum = typ.split("enum=", 1)[1].split("|") if "enum=" in typ else []
        if entry.allowed is not None:
            samples.append(_sample(typ, entry.allowed[0]))
        elif entry.refused is not None:
            fine = [v for v in enum if v not in entry.refused]
            if fine:
                samples.append(_sample(typ, fine[0]))
    for value in samples:  # honoured (or an allowed value): neither unknown nor refused
        text, concrete = _document(kind, path, value)
        bad = [m for m in _messages(text) if f": {concrete}" in m and ("unknown field" in m or "does not implement" in m)]
        bad += [m for m in _messages(text) if "does not implement" in m]
        assert not bad, f"{kind} {path} is listed as honoured ({key}) but: {bad}"
    if isinstance(entry, Refused):
        if entry.allowed is None and entry.refused is None:
            refused_values = [_sample(typ)]
        elif entry.refused is not None:
            refused_values = [_sample(typ, v) for v in entry.refused if "enum=" not in typ or v in typ]
        else:
            refused_values = [_sample(typ, "not-allowed")]
        for value in refused_values:
            text, concrete = _document(kind, path, value)
            msgs = _messages(text)
            # the error names the line, the field (or the list/object holding it) and the refusal
            assert any(
                m.startswith("f.yaml:") and concrete.startswith(_field_of(m)) and "meshctl does not implement" in m
                for m in msgs
            ), (kind, path, value, msgs)


def _field_of(message: str) -> str:
    """The field an error names: ``f.yaml:3: [error: ]FIELD: message``."""
    rest = message.split(": ", 1)[1]
    if rest.startswith("error: "):
        rest = rest[len("error: "):]
    return rest.split(": ", 1)[0]


def test_mirroring_from_istios_task_is_accepted_now_that_it_is_implemented(tmp_path):
    # The VirtualService of Istio's mirroring task (istio.io/latest/docs/tasks/traffic-management/mirroring/)
    text = (Path(__file__).parents[1] / "data" / "istio-mirroring" / "httpbin-mirror-v2.yaml").read_text()
    assert _messages(text) == []
    # the legacy snake_case spelling is still refused by name
    msgs = _messages(text.replace("mirrorPercentage:\n      value: 100.0", "mirror_percent: 100"))
    assert any("spec.http[0].mirror_percent: meshctl does not implement mirror_percent yet" in m for m in msgs), msgs


def test_request_principals_and_claims_are_accepted():
    text = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"""
    assert _messages(text) == []
    msgs = _messages(text.replace("request.auth.claims[groups]", "request.auth.claimz[groups]"))
    assert any("spec.rules[0].when[0].key: meshctl does not implement condition key 'request.auth.claimz[groups]' yet" in m for m in msgs), msgs


def test_known_but_unimplemented_kinds_say_so_and_unknown_kinds_stay_unknown():
    for kind in ("EnvoyFilter",):
        text = f"apiVersion: {GROUPS[kind]}\nkind: {kind}\nmetadata:\n  name: x\nspec: {{}}\n"
        assert any(f"f.yaml:2: kind: meshctl does not implement {kind} yet" in m for m in _messages(text))
    msgs = _messages("apiVersion: networking.istio.io/v1\nkind: VirtualServise\nmetadata:\n  name: x\nspec: {}\n")
    assert any("unknown kind 'VirtualServise'" in m and "did you mean VirtualService" in m for m in msgs), msgs


REFUSED = Path(__file__).parents[1] / "data" / "istio-refused"


def _validate_file(path: Path) -> list[str]:
    from meshctl.loader.resources import load_resources

    try:
        return [str(f) for f in validate(load_resources([path]))]
    except LoadError as e:
        return [str(x) for x in getattr(e, "errors", [e])]


def test_istios_mixer_rules_are_refused_by_kind_with_what_replaced_them():
    # Istio's samples/bookinfo/policy/mixer-rule-deny-label.yaml, unchanged: config.istio.io
    # was removed from Istio in 1.8; the error says so rather than "did you mean networking.istio.io?"
    path = REFUSED / "mixer-rule-deny-label.yaml"
    msgs = _validate_file(path)
    assert [m.split(": ", 2)[0:2] for m in msgs] == [[f"{path}:2", "kind"], [f"{path}:13", "kind"], [f"{path}:20", "kind"]], msgs
    assert "meshctl does not implement handler yet" in msgs[0] and "removed from Istio in 1.8" in msgs[0]
    assert "AuthorizationPolicy" in msgs[0] and "did you mean" not in msgs[0]
    for group in ("rbac.istio.io/v1alpha1", "authentication.istio.io/v1alpha1"):
        msgs = _messages(f"apiVersion: {group}\nkind: ServiceRole\nmetadata:\n  name: x\nspec: {{}}\n")
        assert any("f.yaml:2: kind: meshctl does not implement ServiceRole yet" in m and "removed in 1.6" in m for m in msgs), msgs


def test_istios_envoy_filter_sample_is_refused_by_kind():
    path = REFUSED / "productpage_envoy_ratelimit.yaml"
    msgs = _validate_file(path)
    assert [m.split(": ", 1)[0] for m in msgs] == [f"{path}:2", f"{path}:59"], msgs
    assert all("kind: meshctl does not implement EnvoyFilter yet" in m for m in msgs)


def test_the_dry_run_annotation_is_refused_by_name_not_ignored_and_enforced():
    # The policy of Istio's dry-run task: meshctl has no dry-run mode, and ignoring the
    # annotation would enforce the DENY the user only meant to try.
    path = REFUSED / "authz-dry-run-deny-path-headers.yaml"
    (msg,) = _validate_file(path)
    assert msg.startswith(f'{path}:6: metadata.annotations["istio.io/dry-run"]: meshctl does not implement '
                          "the annotation istio.io/dry-run yet"), msg
    # any annotation in Istio's domains is refused; the user's own notes are not
    text = path.read_text()
    assert any('metadata.annotations["networking.istio.io/exportTo"]: meshctl does not implement' in m
               for m in _messages(text.replace('"istio.io/dry-run"', '"networking.istio.io/exportTo"')))
    assert _messages(text.replace('"istio.io/dry-run": "true"', 'team/owner: "payments"')) == []


def test_kubernetes_objects_beside_istios_rules_say_where_services_go():
    # Istio's samples/httpbin/httpbin.yaml, unchanged: a ServiceAccount, a Service, a Deployment.
    # Before: "expected <group>/<version>, got 'v1'" and "unknown API group 'apps'".
    path = REFUSED / "httpbin.yaml"
    msgs = _validate_file(path)
    assert [m.split(" (")[0] for m in msgs] == [f"{path}:19: kind: ServiceAccount", f"{path}:24: kind: Service",
                                                f"{path}:38: kind: Deployment"], msgs
    assert all("is a Kubernetes object, not an Istio rule" in m and "mesh.yaml's services:" in m for m in msgs)
    # the Kubernetes Gateway API is Istio's too: refused by name, with what to use instead
    msgs = _messages("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: x\nspec: {}\n")
    assert any("f.yaml:2: kind: meshctl does not implement HTTPRoute yet" in m and "VirtualService" in m for m in msgs), msgs


def test_istios_removed_v1alpha1_routing_and_kubernetes_ingress_say_what_replaced_them():
    # Istio's samples/httpbin/destinationpolicies/httpbin-circuit-breaker.yaml, unchanged
    path = REFUSED / "httpbin-circuit-breaker.yaml"
    (msg,) = _validate_file(path)
    assert msg.startswith(f"{path}:2: kind: meshctl does not implement DestinationPolicy yet") and "DestinationRule" in msg, msg
    for api in ("extensions/v1beta1", "networking.k8s.io/v1"):
        msgs = _messages(f"apiVersion: {api}\nkind: Ingress\nmetadata:\n  name: x\nspec: {{}}\n")
        assert any("f.yaml:2: kind: meshctl does not implement Ingress yet" in m and "Gateway and VirtualService" in m
                   for m in msgs), msgs
