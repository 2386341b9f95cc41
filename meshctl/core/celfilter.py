"""The part of CEL (Common Expression Language) that access-log filters use.

Istio's Telemetry ``accessLogging[].filter.expression`` is a CEL expression over
Envoy's attributes (``response.code >= 400``). meshctl evaluates this subset,
and refuses anything else at ``route validate`` with the reason:

    expr   := or
    or     := and ("||" and)*
    and    := unary ("&&" unary)*
    unary  := "!" unary | cmp
    cmp    := value (("==" | "!=" | "<" | "<=" | ">" | ">=") value)?
    value  := ATTRIBUTE | INT | STRING | true | false | "(" expr ")"
           | ATTRIBUTE "." ("startsWith" | "endsWith" | "contains") "(" STRING ")"
           | "request.headers[" STRING "]"

Attributes (Envoy's names): ``response.code`` (int), ``response.grpc_status``,
``response.flags`` (Envoy's short flags, a string here), ``request.method``,
``request.path``, ``request.url_path``, ``request.host``, ``request.scheme``,
``request.protocol``, ``request.useragent``, ``request.id``,
``request.duration`` (milliseconds, int), ``request.headers['name']``,
``connection.mtls`` (bool), ``source.address``, ``upstream.address``.

Pure: ``parse`` once (at load and when a proxy applies its config), then
``evaluate(tree, attributes)`` per request. A missing attribute makes the
comparison false, as CEL's "no such key" error does for Envoy's filter (the
request is not logged).
"""

from __future__ import annotations

import re
from typing import Any

Node = tuple[Any, ...]  # an expression tree: ("or", left, right), ("attr", name), ("lit", value), ...

ATTRIBUTES = frozenset({
    "response.code", "response.grpc_status", "response.flags", "request.method", "request.path",
    "request.url_path", "request.host", "request.scheme", "request.protocol", "request.useragent",
    "request.id", "request.duration", "connection.mtls", "source.address", "upstream.address",
})
_METHODS = ("startsWith", "endsWith", "contains")
_TOKEN = re.compile(r"""\s*(?:(?P<num>\d+)|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\],.])|(?P<id>[A-Za-z_][A-Za-z_0-9]*))""")


class CelError(ValueError):
    """An expression outside the subset meshctl evaluates; the message says why."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CelError(f"cannot read {text[pos:pos + 20]!r} (meshctl evaluates comparisons of request and "
                           "response attributes joined by && and ||)")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise CelError("the expression ends too early")
        tok = self.toks[self.i]
        if want is not None and tok[1] != want:
            raise CelError(f"expected {want!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def expr(self) -> Node:
        node = self.and_()
        while self.peek() == "||":
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.unary()
        while self.peek() == "&&":
            self.take()
            node = ("and", node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek() == "!":
            self.take()
            return ("not", self.unary())
        left = self.value()
        if self.peek() in ("==", "!=", "<", "<=", ">", ">="):
            op = self.take()[1]
            return ("cmp", op, left, self.value())
        return left

    def value(self) -> Node:
        kind, text = self.take()
        if text == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind == "num":
            return ("lit", int(text))
        if kind == "str":
            return ("lit", bytes(text[1:-1], "utf-8").decode("unicode_escape"))
        if kind == "id" and text in ("true", "false"):
            return ("lit", text == "true")
        if kind != "id":
            raise CelError(f"unexpected {text!r}")
        name = text
        while self.peek() == "." and self.i + 1 < len(self.toks) and self.toks[self.i + 1][0] == "id":
            nxt = self.toks[self.i + 1][1]
            if nxt in _METHODS and f"{name}" in ATTRIBUTES:
                break
            self.take(".")
            name += "." + self.take()[1]
        if name == "request.headers" and self.peek() == "[":
            self.take("[")
            kind, key = self.take()
            if kind != "str":
                raise CelError("request.headers[...] takes a quoted header name")
            self.take("]")
            return ("header", key[1:-1].lower())
        if name not in ATTRIBUTES:
            raise CelError(f"meshctl does not implement the attribute {name!r} in access-log filters yet "
                           f"(it has {', '.join(sorted(ATTRIBUTES))}, request.headers['name'])")
        node = ("attr", name)
        if self.peek() == ".":
            self.take(".")
            method = self.take()[1]
            if method not in _METHODS:
                raise CelError(f"meshctl does not implement the function {method!r} yet")
            self.take("(")
            kind, arg = self.take()
            if kind != "str":
                raise CelError(f"{method}() takes a quoted string")
            self.take(")")
            node = ("call", method, node, arg[1:-1])
        return node


def parse(text: str) -> Node:
    """The expression as a tree; CelError when it is outside the subset."""
    if not text or not text.strip():
        raise CelError("the expression is empty")
    p = _Parser(text)
    node = p.expr()
    if p.i != len(p.toks):
        raise CelError(f"unexpected {p.toks[p.i][1]!r} after a complete expression")
    return node


_MISSING = object()


def _value(node: Node, attrs: dict[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "attr":
        return attrs.get(node[1], _MISSING)
    if kind == "header":
        return attrs.get("request.headers", {}).get(node[1], _MISSING)
    if kind == "call":
        v = _value(node[2], attrs)
        if not isinstance(v, str):
            return False
        return {"startsWith": v.startswith, "endsWith": v.endswith, "contains": v.__contains__}[node[1]](node[3])
    return evaluate(node, attrs)


def evaluate(node: Node, attrs: dict[str, Any]) -> bool:
    """Whether the request with ``attrs`` passes the filter."""
    kind = node[0]
    if kind == "or":
        return evaluate(node[1], attrs) or evaluate(node[2], attrs)
    if kind == "and":
        return evaluate(node[1], attrs) and evaluate(node[2], attrs)
    if kind == "not":
        return not evaluate(node[1], attrs)
    if kind == "cmp":
        a, b = _value(node[2], attrs), _value(node[3], attrs)
        if a is _MISSING or b is _MISSING:
            return False
        op = node[1]
        try:
            if op == "==":
                return bool(a == b)
            if op == "!=":
                return bool(a != b)
            if op == "<":
                return bool(a < b)
            if op == "<=":
                return bool(a <= b)
            if op == ">":
                return bool(a > b)
            return bool(a >= b)
        except TypeError:
            return False
    v = _value(node, attrs)
    return v is True
