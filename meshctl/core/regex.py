"""Regular expressions in rules, with RE2's semantics (as Istio and Envoy).

Every regex a rule carries (VirtualService uri/headers/queryParams/authority
matches, uriRegexRewrite, `meshctl inject-fault` matches) is compiled here
with google-re2, so matching is linear in the input: a pattern such as
``/redos/(a+)+`` cannot hold a proxy at 100% CPU (Python's ``re``
backtracks exponentially on it).

Rules:
- What RE2 refuses (backreferences, lookahead/lookbehind, repetition over
  1000) is refused here, with RE2's reason: `route validate` and `route apply`
  report it at the rule's file:line; a proxy never compiles it.
- A compiled program larger than ``MAX_PROGRAM_SIZE`` is refused, as Envoy's
  ``re2.max_program_size.error_level`` does; Istio sets it to 32768 in every
  proxy's bootstrap (Envoy's own default, 100, refuses even ``\\pL+``).
- RE2's own error logging to stderr is off: errors come back as RegexError.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["MAX_PROGRAM_SIZE", "RegexError", "compile_regex", "regex_problem"]

MAX_PROGRAM_SIZE = 32768  # Istio's re2.max_program_size.error_level

_OPTIONS: Any = None  # re2.Options, made with the first pattern


class RegexError(ValueError):
    """A pattern meshctl will not run."""


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> Any:
    """The RE2 program for ``pattern`` (``fullmatch``, ``search``, ``sub`` as ``re``).

    RE2 is imported here, on the first pattern: a sidecar whose rules carry no regex
    never loads it (its extension and the C++ runtime are ~2 MB of RSS)."""
    global _OPTIONS
    import re2

    if _OPTIONS is None:
        _OPTIONS = re2.Options()
        _OPTIONS.log_errors = False
    try:
        rx = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else str(exc)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"invalid regex {pattern!r}: RE2 (Istio's and Envoy's engine) refuses it: {reason}") from None
    size = rx.programsize
    if size > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"regex {pattern!r} compiles to an RE2 program of size {size}, over the limit "
            f"{MAX_PROGRAM_SIZE} (Istio's re2.max_program_size.error_level)"
        )
    return rx


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used as an Istio regex, or None."""
    try:
        compile_regex(pattern)
    except RegexError as exc:
        return str(exc)
    return None
