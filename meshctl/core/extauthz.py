"""External authorization (AuthorizationPolicy action CUSTOM), Envoy's ext_authz
HTTP contract as Istio configures it from meshConfig extensionProviders
envoyExtAuthzHttp. The decisions are pure; proxy/extauthz.py does the call.

Rules:

1. CUSTOM policies are evaluated first (Istio: CUSTOM, then DENY, then
   ALLOW). When one of them matches the request (core.authz.custom_check),
   the request is checked with its provider before anything else; when none
   matches, the authorizer is not called.
2. The check request: the original method, ``pathPrefix`` + the original
   path (with query), no body (``content-length: 0``); headers: ``host``,
   ``authorization`` and those named by ``includeRequestHeadersInCheck``
   (exact, ``prefix*``, ``*suffix``, as AuthorizationPolicy values), plus
   ``includeAdditionalHeadersInCheck``.
3. The authorizer answers 200: allowed. The headers of its response named by
   ``headersToUpstreamOnAllow`` replace those of the request sent upstream.
4. Any other status: denied, and the client gets that status and body, with
   the headers of the response named by ``headersToDownstreamOnDeny``.
5. The authorizer cannot be reached, times out or answers garbage:
   ``failOpen`` allows; otherwise the client gets ``statusOnError``
   (default 403).
6. A CUSTOM policy naming a provider that mesh settings do not define denies
   the requests it matches (fail closed), 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..model.proxyconfig import EnvoyExtAuthzHttp
from .authz import string_match

ALWAYS_SENT = ("host", "authorization")
DEFAULT_TIMEOUT = 600.0  # Istio's default for envoyExtAuthzHttp.timeout


@dataclass(frozen=True, slots=True)
class CheckRequest:
    method: str
    target: str  # path and query
    headers: tuple[tuple[str, str], ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class ExtAllowed:
    upstream_headers: tuple[tuple[str, str], ...] = ()  # set on the upstream request


@dataclass(frozen=True, slots=True)
class ExtDenied:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()  # sent to the client


def _named(patterns: Sequence[str], name: str) -> bool:
    return any(string_match(p.lower(), name) for p in patterns)


def check_request(p: EnvoyExtAuthzHttp, method: str, target: str, headers: Sequence[tuple[str, str]]) -> CheckRequest:
    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k in ALWAYS_SENT or _named(p.include_request_headers_in_check, k):
            out.append((k, v))
    for k, v in p.include_additional_headers_in_check.items():
        out.append((k.lower(), v))
    out.append(("content-length", "0"))
    prefix = (p.path_prefix or "").rstrip("/")
    path = target if target.startswith("/") else "/" + target
    timeout = float(p.timeout) if p.timeout is not None else DEFAULT_TIMEOUT
    return CheckRequest(method, prefix + path, tuple(out), timeout)


def check_result(p: EnvoyExtAuthzHttp, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> ExtAllowed | ExtDenied:
    if status == 200:
        return ExtAllowed(tuple((k, v) for k, v in headers if _named(p.headers_to_upstream_on_allow, k)))
    down = tuple((k, v) for k, v in headers if _named(p.headers_to_downstream_on_deny, k))
    return ExtDenied(status, body, down)


def on_error(p: EnvoyExtAuthzHttp, reason: str) -> ExtAllowed | ExtDenied:
    if p.fail_open:
        return ExtAllowed()
    status = int(p.status_on_error) if p.status_on_error and p.status_on_error.isdigit() else 403
    return ExtDenied(status, b"", (("x-meshctl-reason", f"external authorizer failed: {reason}"),))


def apply_upstream(headers: Sequence[tuple[str, str]], add: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers with the authorizer's allowed headers set (replacing same-named ones)."""
    names = {k for k, _ in add}
    return [(k, v) for k, v in headers if k not in names] + list(add)
