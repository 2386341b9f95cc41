"""Istio resource files → ``model.istio.Resource`` objects, and back.

Accepts what ``kubectl apply -f`` accepts for these kinds: files or
directories (``*.yaml``, ``*.yml``, ``*.json``, recursively, in sorted order),
multi-document YAML, a JSON object, a JSON/YAML list of objects, or a
Kubernetes ``List``. Every error of every file is collected and raised
together as LoadErrors, each naming ``file:line: field: message``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from ..model.base import EMPTY, FrozenDict
from ..model.istio import API_VERSIONS, SPEC_TYPES, Resource
from .codec import LineMap, LoadError, LoadErrors, decode_collect, join_path, line_of, to_data
from .source import parse_documents, read_config_file
from .unsupported import Refused, annotation_refusal, entry_for, generic_path, kind_refusal, refusal_message

__all__ = [
    "load_resources",
    "load_resources_text",
    "dump_resources",
    "resource_to_data",
    "lines_of",
    "source_of",
    "RESOURCE_SUFFIXES",
]

RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")

# Envelope keys: the ones we use, and the ones kubectl output carries that we ignore.
_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec")
_TOP_IGNORED = ("status",)
_META_KEYS = ("name", "namespace", "labels")
_META_IGNORED = (
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "finalizers",
    "ownerReferences",
    "generateName",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# ---------------------------------------------------------------- where each field came from
#
# Resource is a shared, frozen model class with only ``source`` ("file:line" of
# the document). validate() wants the line of any field, so the loader keeps
# each loaded resource's LineMap here, keyed by the (hashable) resource.
# Bounded, so a long-running pilot reloading files does not grow it forever.

_LINES: OrderedDict[Resource, tuple[str, LineMap]] = OrderedDict()
_LINES_MAX = 20_000


def _remember(resource: Resource, file: str, lines: LineMap) -> None:
    _LINES[resource] = (file, lines)
    _LINES.move_to_end(resource)
    while len(_LINES) > _LINES_MAX:
        _LINES.popitem(last=False)


def lines_of(resource: Resource) -> tuple[str, LineMap] | None:
    """(file, LineMap) of a resource loaded by this process, else None."""
    try:
        return _LINES.get(resource)
    except TypeError:  # an unhashable spec built by hand
        return None


def source_of(resource: Resource, field: str) -> str:
    """``"file:line"`` of ``field`` (``spec.http[0].route``) in ``resource``.

    Falls back to the document's ``source``, then to ``kind/namespace/name``.
    """
    known = lines_of(resource)
    if known is not None:
        file, lines = known
        line = line_of(lines, field)
        if line is not None:
            return f"{file}:{line}"
    if resource.source:
        return resource.source
    return f"{resource.kind}/{resource.namespace}/{resource.name}"


# ---------------------------------------------------------------- loading


def _files(paths: Sequence[str | Path], errors: list[LoadError]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in RESOURCE_SUFFIXES
            )
            if not found:
                errors.append(LoadError(str(path), None, "", "no *.yaml, *.yml or *.json files in this directory"))
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif path.exists():
            errors.append(LoadError(str(path), None, "", "not a regular file or directory"))
        else:
            errors.append(LoadError(str(path), None, "", "no such file or directory"))
    return out


def load_resources(paths: Sequence[str | Path]) -> list[Resource]:
    """Load every resource in the given files and directories, in order.

    Raises LoadErrors (all errors of all files) if anything is wrong.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    errors: list[LoadError] = []
    resources: list[Resource] = []
    for file in _files(paths, errors):
        try:
            text = read_config_file(file)
        except LoadError as exc:
            errors.append(exc)
            continue
        except UnicodeDecodeError as exc:
            errors.append(LoadError(str(file), None, "", f"not UTF-8 text ({exc.reason})"))
            continue
        except OSError as exc:
            errors.append(LoadError(str(file), None, "", f"cannot read: {exc.strerror or exc}"))
            continue
        got, errs = _load_text(text, str(file))
        resources.extend(got)
        errors.extend(errs)
    if errors:
        raise LoadErrors(errors)
    return resources


def load_resources_text(text: str, file: str = "<stdin>") -> list[Resource]:
    """Load resources from YAML/JSON text (``meshctl route apply -f -``)."""
    resources, errors = _load_text(text, file)
    if errors:
        raise LoadErrors(errors)
    return resources


def _load_text(text: str, file: str) -> tuple[list[Resource], list[LoadError]]:
    docs, errors = parse_documents(text, file)
    resources: list[Resource] = []
    for doc in docs:
        for obj, path in _objects(doc.data, doc.lines, file, errors):
            r = _load_object(obj, path, doc.lines, file, errors)
            if r is not None:
                resources.append(r)
    return resources, errors


def _objects(data: Any, lines: LineMap, file: str, errors: list[LoadError]):
    """Yield (object, path) for a document: one object, a list, or a kind: List."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield item, f"[{i}]"
        return
    if isinstance(data, Mapping) and data.get("kind") == "List" and "items" in data:
        items = data.get("items") or []
        if not isinstance(items, list):
            errors.append(LoadError(file, line_of(lines, "items"), "items", "expected a list of resources"))
            return
        for i, item in enumerate(items):
            yield item, f"items[{i}]"
        return
    yield data, ""


def _sub(path: str, key: str) -> str:
    return join_path(path, key)


_KUBERNETES_GROUPS = ("apps", "batch", "autoscaling", "policy", "rbac.authorization.k8s.io", "networking.k8s.io",
                      "apiextensions.k8s.io", "admissionregistration.k8s.io")


def _is_kubernetes(api_version: str) -> bool:
    """``v1`` (the core group: Service, ServiceAccount, ConfigMap ...) or a Kubernetes group's."""
    return "/" not in api_version and api_version.startswith("v1") or api_version.split("/")[0] in _KUBERNETES_GROUPS


def _load_object(
    obj: Any, path: str, lines: LineMap, file: str, errors: list[LoadError]
) -> Resource | None:
    def err(field: str, message: str) -> None:
        errors.append(LoadError(file, line_of(lines, field), field, message))

    where = path or ""
    if not isinstance(obj, Mapping):
        err(where, f"expected a resource (a mapping with apiVersion, kind, metadata, spec), got {_kind_of(obj)}")
        return None
    before = len(errors)
    for key in obj:
        if key not in _TOP_KEYS and key not in _TOP_IGNORED:
            err(_sub(where, str(key)), _unknown(str(key), _TOP_KEYS))

    # apiVersion and kind
    spec_type: type | None = None
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    av_path, kind_path = _sub(where, "apiVersion"), _sub(where, "kind")
    group = version = None
    if api_version is None:
        err(av_path, _missing("apiVersion", obj))
    elif (isinstance(api_version, str) and isinstance(kind, str) and _is_kubernetes(api_version)
          and all(k != kind for (_, k) in SPEC_TYPES) and kind_refusal(api_version.split("/")[0], kind) is None):
        # Istio's samples put a Service, a ServiceAccount and a Deployment beside the rules
        err(kind_path, f"{kind} ({api_version}) is a Kubernetes object, not an Istio rule: meshctl runs no Kubernetes; "
                       "a service, its versions and their commands go in mesh.yaml's services: (see examples/bookinfo/mesh.yaml)")
    elif not isinstance(api_version, str) or api_version.count("/") != 1:
        err(av_path, f"expected <group>/<version> such as networking.istio.io/v1, got {_repr(api_version)}")
    else:
        group, version = api_version.split("/")
        refusal = kind_refusal(group, kind) if isinstance(kind, str) else None
        if refusal is not None:  # an Istio kind meshctl knows of and does not implement
            err(kind_path, refusal)
            group = None
        elif group not in API_VERSIONS:
            hint = difflib.get_close_matches(group, list(API_VERSIONS), n=1)
            extra = f"did you mean {hint[0]}?" if hint else f"known: {', '.join(API_VERSIONS)}"
            err(av_path, f"unknown API group {group!r} ({extra})")
            group = None
        elif version not in API_VERSIONS[group]:
            err(av_path, f"unsupported version {version!r} of {group} (supported: {', '.join(API_VERSIONS[group])})")
    if kind is None:
        err(kind_path, _missing("kind", obj))
    elif not isinstance(kind, str):
        err(kind_path, f"expected a string, got {_repr(kind)}")
    elif group is not None:
        spec_type = SPEC_TYPES.get((group, kind))
        if spec_type is None:
            elsewhere = [g for (g, k) in SPEC_TYPES if k == kind]
            if elsewhere:
                err(kind_path, f"{kind} is not in {group}; it is in {elsewhere[0]}")
            else:
                kinds = [k for (g, k) in SPEC_TYPES if g == group]
                hint = difflib.get_close_matches(kind, kinds, n=1)
                extra = f"did you mean {hint[0]}?" if hint else f"known: {', '.join(kinds)}"
                err(kind_path, f"unknown kind {kind!r} in {group} ({extra})")

    # metadata
    meta_path = _sub(where, "metadata")
    meta = obj.get("metadata")
    name = namespace = None
    labels: FrozenDict[str, str] = EMPTY
    if meta is None:
        err(meta_path, _missing("metadata", obj))
    elif not isinstance(meta, Mapping):
        err(meta_path, f"expected a mapping, got {_kind_of(meta)}")
    else:
        for key in meta:
            if key not in _META_KEYS and key not in _META_IGNORED:
                err(_sub(meta_path, str(key)), _unknown(str(key), _META_KEYS + _META_IGNORED))
        name = meta.get("name")
        name_path = _sub(meta_path, "name")
        if name is None:
            err(name_path, _missing("name", meta))
        elif not isinstance(name, str):
            err(name_path, f"expected a string, got {_repr(name)}")
            name = None
        elif not _DNS_1123_SUBDOMAIN.match(name) or len(name) > 253:
            err(name_path, f"invalid name {name!r}: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit")
            name = None
        namespace = meta.get("namespace", "default")
        ns_path = _sub(meta_path, "namespace")
        if namespace is None:
            namespace = "default"
        elif not isinstance(namespace, str):
            err(ns_path, f"expected a string, got {_repr(namespace)}")
        elif not _DNS_1123_LABEL.match(namespace) or len(namespace) > 63:
            err(ns_path, f"invalid namespace {namespace!r}: use lower-case letters, digits and '-'")
        annotations = meta.get("annotations")
        if isinstance(annotations, Mapping):
            for k in annotations:
                refusal = annotation_refusal(str(k))
                if refusal is not None:
                    err(_sub(_sub(meta_path, "annotations"), str(k)), refusal)
        raw_labels = meta.get("labels")
        if raw_labels is not None:
            lpath = _sub(meta_path, "labels")
            if not isinstance(raw_labels, Mapping):
                err(lpath, f"expected a mapping, got {_kind_of(raw_labels)}")
            else:
                ok = True
                for k, v in raw_labels.items():
                    if not isinstance(k, str) or not isinstance(v, str):
                        err(_sub(lpath, str(k)), f"label values must be strings, got {_repr(v)}")
                        ok = False
                if ok:
                    labels = FrozenDict(raw_labels)

    # spec
    spec: Any = None
    spec_path = _sub(where, "spec")
    if spec_type is not None:
        raw_spec = obj.get("spec")
        if raw_spec is None:
            raw_spec = {}
        spec, spec_errors = decode_collect(spec_type, raw_spec, path=spec_path, lines=lines, file=file)
        errors.extend(_refuse_by_name(str(kind), spec_path, e) for e in spec_errors)

    if len(errors) != before or spec is None:
        return None
    # no error: all four were checked to be strings above
    assert isinstance(api_version, str) and isinstance(kind, str) and isinstance(name, str) and isinstance(namespace, str)
    doc_line = line_of(lines, where)
    source = f"{file}:{doc_line}" if doc_line is not None else file
    resource = Resource(
        api_version=api_version,
        kind=kind,
        name=name,
        namespace=namespace,
        spec=spec,
        labels=labels,
        source=source,
    )
    # Field paths of the spec are "spec...." whatever the document layout, so
    # validate() can look them up without knowing about lists.
    _remember(resource, file, _rebase(lines, where))
    return resource


def _refuse_by_name(kind: str, spec_path: str, e: LoadError) -> LoadError:
    """An Istio field the model lacks is "not implemented", not "unknown" (loader/unsupported.py)."""
    if not e.message.startswith("unknown field") or not e.field.startswith(spec_path):
        return e
    found = entry_for(kind, "spec" + generic_path(e.field[len(spec_path):]))
    if found is None or not isinstance(found[1], Refused) or found[1].allowed or found[1].refused:
        return e
    return LoadError(e.file, e.line, e.field, refusal_message(found[0], found[1]))


def _rebase(lines: LineMap, where: str) -> LineMap:
    """The LineMap of one object in a list document, with paths relative to it."""
    if not where:
        return lines
    out: dict[str, int] = {}
    prefix = where + "."
    for path, line in lines.items():
        if path == where:
            out[""] = line
        elif path.startswith(prefix):
            out[path[len(prefix):]] = line
    return out


def _missing(key: str, obj: Mapping) -> str:
    return "required field is null" if key in obj else "required field missing"


def _unknown(key: str, known: Sequence[str]) -> str:
    hint = difflib.get_close_matches(key, list(known), n=1)
    if hint:
        return f"unknown field (did you mean {hint[0]}?)"
    return f"unknown field (known fields: {', '.join(k for k in known if k in _TOP_KEYS or k in _META_KEYS)})"


def _repr(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return _kind_of(value)


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return _repr(value)


# ---------------------------------------------------------------- dumping


def resource_to_data(resource: Resource) -> dict[str, Any]:
    """kubectl's shape: apiVersion, kind, metadata (name, namespace, labels), spec."""
    meta: dict[str, Any] = {"name": resource.name, "namespace": resource.namespace}
    if resource.labels:
        meta["labels"] = dict(resource.labels)
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": meta,
        "spec": to_data(resource.spec),
    }


def dump_resources(resources: Sequence[Resource], fmt: Literal["yaml", "json"] = "yaml") -> str:
    """Render resources as ``kubectl get -o yaml|json`` would.

    YAML: one document per resource, separated by ``---``. JSON: the object
    itself for one resource, a ``List`` of items otherwise. Both load back
    with load_resources_text.
    """
    items = [resource_to_data(r) for r in resources]
    if fmt == "yaml":
        return "---\n".join(
            yaml.safe_dump(item, sort_keys=False, default_flow_style=False, allow_unicode=True) for item in items
        )
    if fmt == "json":
        if len(items) == 1:
            return json.dumps(items[0], indent=2, ensure_ascii=False) + "\n"
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown output format {fmt!r} (use yaml or json)")
