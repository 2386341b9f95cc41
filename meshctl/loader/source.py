"""YAML/JSON text → (data, LineMap) per document, with PyYAML's node API.

``yaml.compose`` keeps the position of every mapping key and sequence item;
we record them under the same dotted paths the codec uses
(``spec.http[0].route[1].weight``), then construct plain data from the same
nodes. Syntax errors and duplicate keys become LoadErrors with file:line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from .codec import LoadError, join_path

__all__ = ["Document", "parse_documents"]


@dataclass(frozen=True, slots=True)
class Document:
    data: Any
    lines: dict[str, int]  # dotted path → 1-based line; "" is the document start
    line: int  # first line of the document's content


def _walk(node: yaml.Node, path: str, lines: dict[str, int], file: str, errors: list[LoadError]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            kpath = join_path(path, key)
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                errors.append(
                    LoadError(file, line, kpath, f"duplicate key (first given at line {seen[key]})")
                )
                continue
            seen[key] = line
            lines[kpath] = line
            _walk(value_node, kpath, lines, file, errors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            ipath = f"{path}[{i}]"
            lines[ipath] = item.start_mark.line + 1
            _walk(item, ipath, lines, file, errors)


def _is_empty(node: yaml.Node | None) -> bool:
    return node is None or (
        isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and node.value in ("", "~", "null")
    )


def _json_or_none(text: str) -> tuple[Any] | None:
    """(value,) if ``text`` is one JSON value, else None."""
    if text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return (json.loads(text),)
    except ValueError:
        return None


def parse_documents(text: str, file: str) -> tuple[list[Document], list[LoadError]]:
    """Every non-empty document of a YAML (or JSON) text, and the errors found.

    A syntax error stops the parse of that text (later documents cannot be
    trusted); duplicate keys are reported and parsing goes on.
    """
    docs: list[Document] = []
    errors: list[LoadError] = []
    as_json = _json_or_none(text)
    if as_json is not None:
        # JSON is read as JSON (PyYAML is YAML 1.1: it rejects tab indentation
        # and reads 1e5 as a string); YAML's node API still gives the lines.
        # A raw tab cannot occur inside a JSON string, so replacing tabs by
        # spaces changes no value and no line.
        text = text.replace("\t", " ")
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if _is_empty(node):
                continue
            lines: dict[str, int] = {}
            start = node.start_mark.line + 1
            lines[""] = start
            before = len(errors)
            _walk(node, "", lines, file, errors)
            data = loader.construct_document(node) if as_json is None else as_json[0]
            if len(errors) == before:
                docs.append(Document(data, lines, start))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context and exc.context_mark is not None and exc.context_mark.line + 1 != line:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        errors.append(LoadError(file, line, "", f"YAML syntax error: {problem}"))
    except yaml.YAMLError as exc:
        errors.append(LoadError(file, None, "", f"YAML error: {exc}"))
    finally:
        loader.dispose()
    return docs, errors
