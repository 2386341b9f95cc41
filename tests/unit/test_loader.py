"""loader.codec and loader.resources: Istio YAML ⇄ model, errors with file:line:field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from meshctl.loader.codec import LoadError, LoadErrors, from_data, parse_duration, to_data
from meshctl.loader.resources import dump_resources, load_resources, load_resources_text, source_of
from meshctl.model.base import Duration, FrozenDict
from meshctl.model.istio import (
    AuthorizationPolicy,
    DestinationRule,
    FaultAbort,
    Gateway,
    HTTPRetry,
    OutlierDetection,
    PeerAuthentication,
    Rule,
    RuleFrom,
    Source,
    VirtualService,
)

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = sorted((DATA / "istio").glob("*.yaml"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "bookinfo" / "rules"


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("3m", 180.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        ("1h30m", 5400.0),
        ("100us", 0.0001),
        ("7s", 7.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration_accepts_istio_syntax(text, seconds):
    d = parse_duration(text)
    assert isinstance(d, Duration)
    assert d == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "5x", "1.5", "s", "", "1 s", "-1s", "1.5sec", "1d"])
def test_parse_duration_rejects_everything_else(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_round_trips_through_text():
    for text in ["1.1ms", "250ms", "0.333333333s", "1h", "2.5s", "10ns"]:
        d = parse_duration(text)
        assert parse_duration(to_data(d)) == d


# ---------------------------------------------------------------- codec


def test_from_data_maps_camel_case_and_reserved_names():
    policy = from_data(
        AuthorizationPolicy,
        {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["a"]}}]}]},
    )
    assert policy.action == "DENY"
    assert policy.rules == (Rule(from_=(RuleFrom(source=Source(not_principals=("a",))),)),)
    od = from_data(OutlierDetection, {"consecutive5xxErrors": 7, "baseEjectionTime": "30s"})
    assert od.consecutive_5xx_errors == 7
    assert od.base_ejection_time == 30.0


def test_from_data_error_names_path_and_suggests():
    with pytest.raises(LoadError) as info:
        from_data(HTTPRetry, {"attempts": 3, "perTryTimout": "1s"}, path="spec.http[0].retries", file="x.yaml")
    err = info.value
    assert err.file == "x.yaml"
    assert err.line is None
    assert err.field == "spec.http[0].retries.perTryTimout"
    assert str(err) == "x.yaml: spec.http[0].retries.perTryTimout: unknown field (did you mean perTryTimeout?)"


def test_from_data_reports_every_error_at_once():
    with pytest.raises(LoadErrors) as info:
        from_data(HTTPRetry, {"attempts": "three", "perTryTimeout": "soon"}, file="f")
    assert [e.field for e in info.value.errors] == ["spec.attempts", "spec.perTryTimeout"]
    assert str(info.value).count("\n") == 1


def test_from_data_int_map_keys_accept_json_strings():
    pa = from_data(PeerAuthentication, {"portLevelMtls": {"8080": {"mode": "DISABLE"}}})
    assert list(pa.port_level_mtls) == [8080]
    assert from_data(PeerAuthentication, to_data(pa)) == pa


def test_to_data_omits_unset_and_keeps_meaningful_empty_rules():
    deny_all = AuthorizationPolicy(rules=())
    assert to_data(deny_all) == {"rules": []}
    assert from_data(AuthorizationPolicy, to_data(deny_all)) == deny_all
    assert to_data(AuthorizationPolicy()) == {}
    assert from_data(AuthorizationPolicy, {}).rules is None


def test_to_data_writes_durations_and_camel_case():
    retry = HTTPRetry(attempts=0, per_try_timeout=Duration(0.25), retry_on="5xx")
    assert to_data(retry) == {"attempts": 0, "perTryTimeout": "0.25s", "retryOn": "5xx"}
    assert json.dumps(to_data(retry))  # plain data, JSON-serialisable


def test_null_means_not_set():
    vs = from_data(VirtualService, {"hosts": ["a"], "gateways": None, "http": [{"timeout": None}]})
    assert vs.gateways == ()
    assert vs.http[0].timeout is None


def test_deprecated_fields_accepted():
    fa = from_data(FaultAbort, {"percent": 100, "httpStatus": 500})
    assert fa.percent == 100 and fa.http_status == 500
    od = from_data(OutlierDetection, {"consecutiveErrors": 3})
    assert od.consecutive_errors == 3


# ---------------------------------------------------------------- Istio's samples


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_loads_and_round_trips(path):
    resources = load_resources([path])
    assert resources
    for r in resources:
        assert r.namespace == "default"
        assert r.source.startswith(f"{path}:")
        assert from_data(type(r.spec), to_data(r.spec)) == r.spec
    # and the whole envelope, through both output formats
    for fmt in ("yaml", "json"):
        back = load_resources_text(dump_resources(resources, fmt), file=f"dump.{fmt}")
        assert [(b.key, b.api_version, b.spec) for b in back] == [(r.key, r.api_version, r.spec) for r in resources]


def test_examples_are_the_same_samples():
    for path in SAMPLES:
        assert (EXAMPLES / path.name).read_text() == path.read_text()


def test_bookinfo_samples_mean_what_istio_documents():
    by_file = {p.name: load_resources([p]) for p in SAMPLES}
    (delay,) = by_file["virtual-service-ratings-test-delay.yaml"]
    fault = delay.spec.http[0].fault
    assert fault.delay.fixed_delay == 7.0 and fault.delay.percent == 100
    assert delay.spec.http[0].match[0].headers["end-user"].exact == "jason"
    (abort,) = by_file["virtual-service-ratings-test-abort.yaml"]
    assert abort.spec.http[0].fault.abort.http_status == 500
    (split,) = by_file["virtual-service-reviews-50-v3.yaml"]
    assert [(d.destination.subset, d.weight) for d in split.spec.http[0].route] == [("v1", 50), ("v3", 50)]
    gw, vs = by_file["bookinfo-gateway.yaml"]
    assert isinstance(gw.spec, Gateway) and gw.spec.servers[0].port.number == 80
    assert vs.spec.gateways == ("bookinfo-gateway",)
    assert vs.source.endswith("bookinfo-gateway.yaml:18")
    drs = by_file["destination-rule-all.yaml"]
    assert all(isinstance(r.spec, DestinationRule) for r in drs)
    assert [s.name for s in drs[1].spec.subsets] == ["v1", "v2", "v3"]


def test_directory_is_loaded_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "dr.yml").write_text((DATA / "istio" / "destination-rule-all.yaml").read_text())
    (tmp_path / "a.yaml").write_text((DATA / "istio" / "virtual-service-reviews-v3.yaml").read_text())
    (tmp_path / "notes.txt").write_text("not a rule")
    resources = load_resources([tmp_path])
    assert [r.kind for r in resources] == ["VirtualService"] + ["DestinationRule"] * 4


def test_empty_documents_are_skipped_and_namespace_kept():
    text = "---\n---\n# only a comment\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: prod\nspec:\n  mtls:\n    mode: STRICT\n---\n"
    (pa,) = load_resources_text(text, file="pa.yaml")
    assert (pa.name, pa.namespace, pa.spec.mtls.mode) == ("strict", "prod", "STRICT")
    assert pa.source == "pa.yaml:5"


def test_kubectl_output_fields_are_tolerated():
    text = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
  uid: 1234
  resourceVersion: "5"
  annotations: {a: b}
spec:
  host: reviews
status: {}
"""
    (dr,) = load_resources_text(text)
    assert dr.spec.host == "reviews"


def test_all_errors_of_all_files_are_collected(tmp_path):
    (tmp_path / "one.yaml").write_text((DATA / "bad" / "unknown-kind.yaml").read_text())
    (tmp_path / "two.yaml").write_text((DATA / "bad" / "two-documents.yaml").read_text())
    (tmp_path / "ok.yaml").write_text((DATA / "istio" / "virtual-service-reviews-v3.yaml").read_text())
    with pytest.raises(LoadErrors) as info:
        load_resources([tmp_path])
    lines = str(info.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"{tmp_path / 'one.yaml'}:2",
        f"{tmp_path / 'two.yaml'}:11",
        f"{tmp_path / 'two.yaml'}:29",
    ]


def test_missing_path_is_an_error():
    with pytest.raises(LoadErrors) as info:
        load_resources(["/nonexistent/rules.yaml"])
    assert str(info.value) == "/nonexistent/rules.yaml: no such file or directory"


def test_json_list_and_kubernetes_list_load():
    items = [
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "a"}, "spec": {"host": "a"}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "b"}, "spec": {"host": "b"}},
    ]
    assert [r.name for r in load_resources_text(json.dumps(items))] == ["a", "b"]
    as_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=1)
    assert [r.spec.host for r in load_resources_text(as_list)] == ["a", "b"]
    bad = json.dumps({"apiVersion": "v1", "kind": "List", "items": [items[0], {**items[1], "spec": {"hots": "b"}}]}, indent=1)
    with pytest.raises(LoadErrors) as info:
        load_resources_text(bad, file="l.json")
    assert str(info.value) == "l.json:22: items[1].spec.hots: unknown field (did you mean host?)"


def test_source_of_names_the_line_of_a_field():
    (vs,) = load_resources([DATA / "bad" / ".." / "istio" / "virtual-service-reviews-50-v3.yaml"])
    assert source_of(vs, "spec.http[0].route[1].weight").endswith("virtual-service-reviews-50-v3.yaml:17")
    assert source_of(vs, "spec.http[0].route[1].nothing").endswith(":14")


# ---------------------------------------------------------------- bad files

BAD_FILES = [
    ("unknown-field.yaml", "unknown-field.yaml:18: spec.http[0].route[1].wieght: unknown field (did you mean weight?)"),
    ("unknown-field.json", "unknown-field.json:10: spec.http[0].timout: unknown field (did you mean timeout?)"),
    ("snake-case.yaml", "snake-case.yaml:12: spec.http[0].retries.per_try_timeout: unknown field (did you mean perTryTimeout?)"),
    ("bad-duration.yaml", "bad-duration.yaml:8: spec.http[0].timeout: invalid duration '5x' (use a number and a unit: '1.5s', '250ms', '3m', '1h')"),
    ("duration-number.yaml", "duration-number.yaml:13: spec.http[0].retries.perTryTimeout: expected a duration such as '1.5s' or '250ms', got 2"),
    ("negative-duration.yaml", "negative-duration.yaml:10: spec.trafficPolicy.outlierDetection.interval: negative duration '-1s' not allowed"),
    ("weight-not-int.yaml", "weight-not-int.yaml:12: spec.http[0].route[0].weight: expected an integer, got 'abc'"),
    ("bool-field.yaml", "bool-field.yaml:11: spec.http[0].match[0].ignoreUriCase: expected true or false, got 'yes'"),
    ("hosts-not-list.yaml", "hosts-not-list.yaml:6: spec.hosts: expected a list, got 'reviews'"),
    ("spec-is-list.yaml", "spec-is-list.yaml:5: spec: expected a mapping, got a list"),
    ("port-key.yaml", "port-key.yaml:10: spec.portLevelMtls.http: expected an integer key, got 'http'"),
    ("unknown-kind.yaml", "unknown-kind.yaml:2: kind: unknown kind 'VirtualServce' in networking.istio.io (did you mean VirtualService?)"),
    ("unknown-group.yaml", "unknown-group.yaml:1: apiVersion: unknown API group 'networking.istio.i' (did you mean networking.istio.io?)"),
    ("bad-version.yaml", "bad-version.yaml:1: apiVersion: unsupported version 'v2' of networking.istio.io (supported: v1, v1beta1, v1alpha3)"),
    ("no-slash-version.yaml", "no-slash-version.yaml:1: apiVersion: expected <group>/<version> such as networking.istio.io/v1, got 'v1'"),
    ("wrong-group.yaml", "wrong-group.yaml:2: kind: VirtualService is not in security.istio.io; it is in networking.istio.io"),
    ("missing-name.yaml", "missing-name.yaml:3: metadata.name: required field missing"),
    ("bad-name.yaml", "bad-name.yaml:4: metadata.name: invalid name 'Reviews_V1': use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"),
    ("label-not-string.yaml", 'label-not-string.yaml:6: metadata.labels["app.kubernetes.io/version"]: label values must be strings, got 1'),
    ("unknown-top-level.yaml", "unknown-top-level.yaml:5: specs: unknown field (did you mean spec?)"),
    ("duplicate-key.yaml", "duplicate-key.yaml:10: spec.http: duplicate key (first given at line 7)"),
    ("syntax-error.yaml", "syntax-error.yaml:7: YAML syntax error: expected ',' or ']', but got ':' (while parsing a flow sequence at line 6)"),
    (
        "two-documents.yaml",
        "two-documents.yaml:11: spec.http[0].route[0].destination.subsett: unknown field (did you mean subset?)\n"
        "two-documents.yaml:29: spec.subsets[0].trafficPolicy.connectionPool.tcp.maxConnections: expected an integer, got '100'",
    ),
]


@pytest.mark.parametrize("name, expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_error_text(name, expected, monkeypatch):
    monkeypatch.chdir(DATA / "bad")
    with pytest.raises(LoadErrors) as info:
        load_resources([name])
    assert str(info.value) == expected
    first = info.value.errors[0]
    assert first.file == name and isinstance(first.line, int)


def test_every_bad_file_is_in_the_table():
    # files named invalid-*.yaml load fine and are for validate() (test_validate.py)
    on_disk = {p.name for p in (DATA / "bad").iterdir() if not p.name.startswith("invalid-")}
    assert on_disk == {name for name, _ in BAD_FILES}


def test_tab_indented_json_loads_and_errors_keep_their_line():
    text = (
        '{\n\t"apiVersion": "networking.istio.io/v1",\n\t"kind": "DestinationRule",\n'
        '\t"metadata": {"name": "a"},\n\t"spec": {"host": "a",\n\t\t"trafficPolicy": {"outlierDetection": {"interval": 5}}}\n}\n'
    )
    with pytest.raises(LoadError) as info:
        load_resources_text(text, "x.json")
    assert str(info.value) == "x.json:6: spec.trafficPolicy.outlierDetection.interval: expected a duration such as '1.5s' or '250ms', got 5"
    (dr,) = load_resources_text(text.replace('"interval": 5', '"interval": "5s"'), "x.json")
    assert dr.spec.traffic_policy.outlier_detection.interval == 5.0


def test_yaml_anchors_and_merge_keys():
    text = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a
  trafficPolicy: &tp
    loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    trafficPolicy:
      <<: *tp
      tls: {mode: ISTIO_MUTUAL}
"""
    (dr,) = load_resources_text(text)
    policy = dr.spec.subsets[0].traffic_policy
    assert (policy.load_balancer.simple, policy.tls.mode) == ("RANDOM", "ISTIO_MUTUAL")


@dataclass(frozen=True)
class _Probe:
    kind: Literal["http", "tcp"] = "http"


def test_literal_fields_are_checked():
    assert from_data(_Probe, {"kind": "tcp"}).kind == "tcp"
    with pytest.raises(LoadError) as info:
        from_data(_Probe, {"kind": "udp"}, path="probe", file="m.yaml")
    assert str(info.value) == "m.yaml: probe.kind: expected one of http, tcp, got 'udp'"


# ---------------------------------------------------------------- every field of every model class


def _sample(tp, depth=0):
    """A non-default value of type ``tp``, built from the type hints alone."""
    import dataclasses
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _sample(inner, depth)
    if origin is tuple:
        return (_sample(typing.get_args(tp)[0], depth + 1),)
    if origin is FrozenDict:
        k, v = typing.get_args(tp)
        return FrozenDict({8080 if k is int else "k-1": _sample(v, depth + 1)})
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _sample(hints[f.name], depth + 1) for f in dataclasses.fields(tp)})
    return {Duration: Duration(1.5), bool: True, int: 7, float: 2.5, str: "text"}[tp]


def _model_classes():
    import dataclasses

    from meshctl.model import istio, proxyconfig

    for module in (istio, proxyconfig):
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ and obj.__name__ != "Resource":
                yield obj


@pytest.mark.parametrize("cls", list(_model_classes()), ids=lambda c: c.__name__)
def test_every_field_round_trips_through_json(cls):
    obj = _sample(cls)
    data = json.loads(json.dumps(to_data(obj)))
    assert from_data(cls, data) == obj
    # and every field was written out (none had its default)
    import dataclasses

    assert len(data) == len(dataclasses.fields(cls))
