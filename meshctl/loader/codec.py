"""Reflective codec: plain YAML/JSON data ⇄ the frozen model dataclasses.

Driven entirely by the dataclasses' type hints, so a new model field needs no
code here. Conventions (see meshctl/model/base.py):

- field ``per_try_timeout`` is key ``perTryTimeout``; ``from_`` is ``from``;
- ``tuple[X, ...]`` is a list, ``FrozenDict[K, V]`` a mapping, ``X | None``
  is an optional field (absent or ``null`` means "not set");
- ``Duration`` is written ``"1.5s"``, ``"250ms"``, ``"3m"``, ``"1h"`` (Go/Istio
  syntax; units ns, us, µs, ms, s, m, h; compounds such as ``"1h30m"``).

Errors are :class:`LoadError` values that name the file, the line (from a
:data:`LineMap` built by ``loader.source``) and the dotted field path, e.g.
``reviews.yaml:14: spec.http[0].route[1].wieght: unknown field (did you mean weight?)``.
Decoding goes on after an error, so one pass reports every problem.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from functools import lru_cache
from typing import Any, Mapping, Sequence, TypeVar, Union

from ..model.base import Duration, FrozenDict, format_duration

T = TypeVar("T")

LineMap = Mapping[str, int]
"""Dotted field path (``spec.http[0].route``) → 1-based line in the source."""

__all__ = [
    "LineMap",
    "LoadError",
    "LoadErrors",
    "from_data",
    "to_data",
    "parse_duration",
    "format_duration",
    "join_path",
    "line_of",
    "camel",
]


class LoadError(Exception):
    """A configuration error at one place of one file.

    ``str()`` is ``"FILE:LINE: FIELD: MESSAGE"`` (line and field left out when
    unknown).
    """

    def __init__(self, file: str, line: int | None, field: str, message: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working
        return (LoadError, (self.file, self.line, self.field, self.message))


class LoadErrors(LoadError):
    """Several LoadErrors at once; ``str()`` is one error per line.

    A subclass of LoadError (its file/line/field/message are the first
    error's), so ``except LoadError`` catches both.
    """

    def __init__(self, errors: Sequence[LoadError]) -> None:
        if not errors:
            raise ValueError("LoadErrors needs at least one error")
        self.errors: list[LoadError] = list(errors)
        first = self.errors[0]
        super().__init__(first.file, first.line, first.field, first.message)

    def _text(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __reduce__(self):
        return (LoadErrors, (self.errors,))


def raise_errors(errors: Sequence[LoadError]) -> None:
    """Raise nothing, the one error, or LoadErrors for several."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise LoadErrors(errors)


# ---------------------------------------------------------------- paths and lines

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\-/*:@]+$")


def join_path(path: str, key: object) -> str:
    """``join_path("spec.headers", "end-user")`` → ``spec.headers.end-user``;
    keys with dots or odd characters are quoted: ``labels["app.kubernetes.io/name"]``."""
    text = str(key)
    if _PLAIN_KEY.match(text):
        return f"{path}.{text}" if path else text
    return f"{path}[{json.dumps(text)}]"


def line_of(lines: LineMap | None, path: str) -> int | None:
    """The line of ``path``, or of its nearest ancestor that has one."""
    if not lines:
        return None
    while True:
        line = lines.get(path)
        if line is not None:
            return line
        if not path:
            return None
        path = _parent(path)


def _parent(path: str) -> str:
    if path.endswith('"]'):  # 'a["x.y"]' -> "a"
        return path[: path.rfind('["')]
    if path.endswith("]"):  # "a.b[3]" -> "a.b"
        return path[: path.rfind("[")]
    dot = path.rfind(".")
    return path[:dot] if dot >= 0 else ""


# ---------------------------------------------------------------- names


def camel(name: str) -> str:
    """``per_try_timeout`` → ``perTryTimeout``; ``from_`` → ``from``."""
    name = name.rstrip("_")
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    key: str
    hint: Any
    required: bool
    default: Any  # for non-required fields: the default value


@lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[tuple[_Field, ...], dict[str, _Field]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            required, default = False, f.default
        elif f.default_factory is not dataclasses.MISSING:
            required, default = False, f.default_factory()
        else:
            required, default = True, None
        out.append(_Field(f.name, camel(f.name), hints[f.name], required, default))
    fields = tuple(out)
    return fields, {f.key: f for f in fields}


def _suggest(key: str, known: Sequence[str]) -> str | None:
    as_camel = camel(key) if "_" in key else key
    if as_camel in known:
        return as_camel
    lower = {k.lower(): k for k in known}
    if key.lower() in lower:
        return lower[key.lower()]
    import difflib  # error messages only

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


# ---------------------------------------------------------------- durations

_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_duration(text: str) -> Duration:
    """``"1.5s"`` → ``Duration(1.5)``. Raises ValueError with a readable message."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '1.5s' or '250ms', got {_show(text)}")
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"negative duration {text!r} not allowed")
    if not _DURATION.fullmatch(s):
        raise ValueError(
            f"invalid duration {text!r} (use a number and a unit: '1.5s', '250ms', '3m', '1h')"
        )
    # Exact sum in integers (the sidecar does without the decimal module): every part is
    # whole.frac × unit; scaled by 10**digits, the largest fraction's digit count.
    parts = [(number.partition("."), _UNIT_NS[unit]) for number, unit in _DURATION_PART.findall(s)]
    digits = max(len(frac) for (_, _, frac), _ in parts)
    scaled = sum(int((whole or "0") + frac.ljust(digits, "0")) * ns for (whole, _, frac), ns in parts)
    # Go truncates to nanoseconds; so do we, which keeps format/parse exact.
    return Duration(scaled // 10**digits / 10**9)


# ---------------------------------------------------------------- decode

_BAD = object()  # a value that failed to decode (its error is already recorded)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


class _Ctx:
    __slots__ = ("file", "lines", "errors")

    def __init__(self, file: str, lines: LineMap | None) -> None:
        self.file = file
        self.lines = lines
        self.errors: list[LoadError] = []

    def error(self, path: str, message: str) -> object:
        self.errors.append(LoadError(self.file, line_of(self.lines, path), path, message))
        return _BAD


def _decode(tp: Any, data: Any, path: str, ctx: _Ctx) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return data
    if origin is Union or origin is types.UnionType:
        args: Sequence[Any] = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        if len(args) != 1:
            raise TypeError(f"codec: unsupported union {tp!r} at {path}")
        return _decode(args[0], data, path, ctx)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if any(type(data) is type(a) and data == a for a in allowed):
            return data
        shown = ", ".join(str(a) for a in allowed)
        return ctx.error(path, f"expected one of {shown}, got {_show(data)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"codec: only tuple[X, ...] is supported, got {tp!r} at {path}")
        if not isinstance(data, list):
            return ctx.error(path, f"expected a list, got {_show(data)}")
        items = [_decode(args[0], item, f"{path}[{i}]", ctx) for i, item in enumerate(data)]
        return _BAD if any(x is _BAD for x in items) else tuple(items)
    if origin is FrozenDict or tp is FrozenDict:
        args = typing.get_args(tp) or (str, Any)
        if not isinstance(data, Mapping):
            return ctx.error(path, f"expected a mapping, got {_show(data)}")
        out: dict[Any, Any] = {}
        bad = False
        for k, v in data.items():
            kpath = join_path(path, k)
            key = _decode_key(args[0], k, kpath, ctx)
            value = _decode(args[1], v, kpath, ctx)
            if key is _BAD or value is _BAD:
                bad = True
            else:
                out[key] = value
        return _BAD if bad else FrozenDict(out)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data, path, ctx)
    if tp is Duration:
        if data is None:
            return ctx.error(path, "expected a duration such as '1.5s', got null")
        try:
            return parse_duration(data)
        except ValueError as exc:
            return ctx.error(path, str(exc))
    if tp is bool:
        if isinstance(data, bool):
            return data
        return ctx.error(path, f"expected true or false, got {_show(data)}")
    if tp is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        return ctx.error(path, f"expected an integer, got {_show(data)}")
    if tp is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        return ctx.error(path, f"expected a number, got {_show(data)}")
    if tp is str:
        if isinstance(data, str):
            return data
        return ctx.error(path, f"expected a string, got {_show(data)}")
    raise TypeError(f"codec: unsupported type {tp!r} at {path}")


def _decode_key(tp: Any, key: Any, path: str, ctx: _Ctx) -> Any:
    if tp is int:
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        if isinstance(key, str) and key.isdigit():
            return int(key)  # JSON object keys are always strings
        return ctx.error(path, f"expected an integer key, got {_show(key)}")
    if tp is str:
        if isinstance(key, str):
            return key
        return ctx.error(path, f"expected a string key, got {_show(key)}")
    return _decode(tp, key, path, ctx)


def _decode_dataclass(cls: type, data: Any, path: str, ctx: _Ctx) -> Any:
    if not isinstance(data, Mapping):
        return ctx.error(path, f"expected a mapping, got {_show(data)}")
    fields, by_key = _plan(cls)
    kwargs: dict[str, Any] = {}
    bad = False
    for key, value in data.items():
        kpath = join_path(path, key)
        f = by_key.get(key) if isinstance(key, str) else None
        if f is None:
            hint = _suggest(str(key), list(by_key))
            if hint is not None:
                ctx.error(kpath, f"unknown field (did you mean {hint}?)")
            else:
                ctx.error(kpath, f"unknown field (known fields: {', '.join(by_key)})")
            bad = True
            continue
        if value is None:
            # "timeout:" or "timeout: null": not set
            if f.required:
                ctx.error(kpath, "required field is null")
                bad = True
            continue
        decoded = _decode(f.hint, value, kpath, ctx)
        if decoded is _BAD:
            bad = True
        else:
            kwargs[f.attr] = decoded
    for f in fields:
        if f.required and f.key not in data:
            ctx.error(join_path(path, f.key), "required field missing")
            bad = True
    if bad:
        return _BAD
    return cls(**kwargs)


def from_data(
    cls: type[T],
    data: Any,
    *,
    path: str = "spec",
    lines: LineMap | None = None,
    file: str = "<input>",
) -> T:
    """Build a model object of type ``cls`` from plain data (camelCase keys).

    Raises LoadError (or LoadErrors, a subclass, when there are several)
    naming ``file:line: path.to.field: what is wrong``.
    """
    ctx = _Ctx(file, lines)
    value = _decode(cls, data, path, ctx)
    raise_errors(ctx.errors)
    return value


def decode_collect(
    cls: type[T], data: Any, *, path: str, lines: LineMap | None, file: str
) -> tuple[T | None, list[LoadError]]:
    """Like from_data, but return (value or None, errors) instead of raising."""
    ctx = _Ctx(file, lines)
    value = _decode(cls, data, path, ctx)
    if ctx.errors:
        return None, ctx.errors
    return value, []


# ---------------------------------------------------------------- encode


def to_data(obj: Any) -> Any:
    """Model → plain dicts/lists/scalars, camelCase keys, durations as ``"1.5s"``.

    Fields that are None are left out, and so are false booleans whose
    default is false, and empty lists/maps whose default is empty (an empty tuple where the default is None, such as
    AuthorizationPolicy ``rules: []``, is kept: it means something).
    ``from_data(type(x), to_data(x)) == x``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, (tuple, list)):
        return [to_data(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: to_data(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields, _ = _plan(type(obj))
        out: dict[str, Any] = {}
        for f in fields:
            value = getattr(obj, f.attr)
            if value is None:
                continue
            if value is False and f.default is False:
                continue  # "ignoreUriCase: false" everywhere is noise
            if (
                isinstance(value, (tuple, Mapping))
                and not value
                and not f.required
                and f.default is not None
                and not f.default
            ):
                continue
            out[f.key] = to_data(value)
        return out
    raise TypeError(f"to_data: cannot encode {type(obj).__name__}")
