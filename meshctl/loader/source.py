"""YAML/JSON text → (data, LineMap) per document, with PyYAML's node API.

``yaml.compose`` keeps the position of every mapping key and sequence item;
we record them under the same dotted paths the codec uses
(``spec.http[0].route[1].weight``), then construct plain data from the same
nodes. Syntax errors and duplicate keys become LoadErrors with file:line.

Bounded, since rule files come from users and the store keeps every revision:
a file over MAX_FILE_BYTES is refused before it is read, a scalar over
MAX_SCALAR_BYTES (a 60 MB route name) is refused naming its field, and a
document whose aliases expand to more than MAX_NODES nodes (the 623-byte
"billion laughs" file, which took 42 s and a MemoryError) is refused as soon
as the expansion passes the limit, naming the file and the alias count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .codec import LoadError, join_path

__all__ = ["Document", "MAX_FILE_BYTES", "MAX_NODES", "MAX_SCALAR_BYTES", "parse_documents", "read_config_file"]

MAX_FILE_BYTES = 4 * 1024 * 1024  # a rule file; Kubernetes keeps objects under 1.5 MB
MAX_SCALAR_BYTES = 64 * 1024  # one value (a name, a regex, an inline JWKS)
MAX_NODES = 200_000  # nodes of one document once its aliases are expanded


class _TooBig(Exception):
    def __init__(self, line: int | None, path: str, message: str) -> None:
        super().__init__(message)
        self.line, self.path = line, path


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts alias uses, for the error message of an alias bomb."""

    aliases = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        return super().compose_node(parent, index)


def read_config_file(path: Path) -> str:
    """The text of a config file, refused with a LoadError over MAX_FILE_BYTES
    (checked before reading, so a huge file costs nothing)."""
    size = os.stat(path).st_size
    if size > MAX_FILE_BYTES:
        raise LoadError(str(path), None, "", f"file is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes "
                                                "for a config file: split it")
    return Path(path).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Document:
    data: Any
    lines: dict[str, int]  # dotted path → 1-based line; "" is the document start
    line: int  # first line of the document's content


def _walk(node: yaml.Node, path: str, lines: dict[str, int], file: str, errors: list[LoadError],
          budget: list[int] | None = None) -> None:
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooBig(node.start_mark.line + 1, path, "expands")
    if isinstance(node, yaml.ScalarNode):
        if len(node.value) > MAX_SCALAR_BYTES:
            raise _TooBig(node.start_mark.line + 1, path,
                          f"value of {len(node.value)} characters is over the limit of {MAX_SCALAR_BYTES}")
        return
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
            _walk(value_node, kpath, lines, file, errors, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            ipath = f"{path}[{i}]"
            lines[ipath] = item.start_mark.line + 1
            _walk(item, ipath, lines, file, errors, budget)


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
    if len(text) > MAX_FILE_BYTES:
        return [], [LoadError(file, None, "", f"text of {len(text)} characters is over the limit of "
                                              f"{MAX_FILE_BYTES} for a config file: split it")]
    as_json = _json_or_none(text)
    if as_json is not None:
        # JSON is read as JSON (PyYAML is YAML 1.1: it rejects tab indentation
        # and reads 1e5 as a string); YAML's node API still gives the lines.
        # A raw tab cannot occur inside a JSON string, so replacing tabs by
        # spaces changes no value and no line.
        text = text.replace("\t", " ")
    loader = _CountingLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None or _is_empty(node):
                continue
            lines: dict[str, int] = {}
            start = node.start_mark.line + 1
            lines[""] = start
            before = len(errors)
            try:
                _walk(node, "", lines, file, errors, [MAX_NODES])
            except _TooBig as big:
                if str(big) == "expands":
                    errors.append(LoadError(file, start, "", (
                        f"document expands to more than {MAX_NODES} nodes through {loader.aliases} YAML "
                        "alias(es) (an alias bomb?): refused")))
                else:
                    errors.append(LoadError(file, big.line, big.path, str(big)))
                break
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
