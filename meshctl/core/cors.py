"""CORS for a route with Istio's ``corsPolicy``, as Envoy's CORS filter does it.

- A preflight (OPTIONS with ``Origin`` and ``Access-Control-Request-Method``)
  from an allowed origin is answered by the proxy: 200 with
  ``access-control-allow-origin`` (the request's origin), ``-allow-methods``,
  ``-allow-headers``, ``-max-age`` and ``-allow-credentials`` as configured.
  A preflight from another origin goes to the app like any request (Istio's
  default ``unmatchedPreflights: FORWARD``).
- Any other request from an allowed origin gets ``access-control-allow-origin``
  (and ``-allow-credentials``, ``-expose-headers``) on its response.
- No ``Origin``, or an origin not allowed: nothing is added.

Pure: the proxy passes the request's method and headers (proxy/http.py).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..model.istio import CorsPolicy, StringMatch
from .regex import compile_regex


def _origin_ok(origins: Sequence[StringMatch], origin: str) -> bool:
    for sm in origins:
        if sm.exact is not None and (sm.exact == origin or sm.exact == "*"):
            return True
        if sm.prefix is not None and origin.startswith(sm.prefix):
            return True
        if sm.regex is not None and compile_regex(sm.regex).fullmatch(origin) is not None:
            return True
    return False


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def cors(policy: CorsPolicy, method: str, headers: Iterable[tuple[str, str]]) -> tuple[bool, list[tuple[str, str]]]:
    """(preflight answered here, headers): for a preflight to answer locally, the
    response's headers; else the headers to add to the upstream's response (maybe none)."""
    origin = _header(headers, "origin")
    if origin is None or not _origin_ok(policy.allow_origins, origin):
        return False, []
    out = [("access-control-allow-origin", origin)]
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    if method == "OPTIONS" and _header(headers, "access-control-request-method") is not None:
        if policy.allow_methods:
            out.append(("access-control-allow-methods", ",".join(policy.allow_methods)))
        if policy.allow_headers:
            out.append(("access-control-allow-headers", ",".join(policy.allow_headers)))
        if policy.max_age is not None:
            out.append(("access-control-max-age", str(int(policy.max_age))))
        return True, out
    if policy.expose_headers:
        out.append(("access-control-expose-headers", ",".join(policy.expose_headers)))
    return False, out
