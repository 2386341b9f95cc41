"""The call to an external authorizer (AuthorizationPolicy CUSTOM, Istio's
envoyExtAuthzHttp); what to send and what the answer means is core.extauthz.

One pool of clients per proxy runtime (proxy/ctlhttp.py), created on first
use, keeps connections to the authorizers alive between checks.
"""

from __future__ import annotations

import logging

import meshctl.proxy.aio as aio
from ..core.extauthz import (
    DEFAULT_TIMEOUT, ExtAllowed, ExtDenied, apply_upstream, check_request, check_result, on_error,
)
from ..model.proxyconfig import EnvoyExtAuthzHttp
from ..plainhttp import HTTPError
from .ctlhttp import ClientPool
from .request import LocalReply

log = logging.getLogger("meshctl.proxy.extauthz")

UAEX = "UAEX"  # Envoy's response flag: unauthorized by the external authorization service


class ExtAuthzClient:
    def __init__(self) -> None:
        # each check's own deadline is the provider's timeout (below)
        self._clients = ClientPool(timeout=DEFAULT_TIMEOUT)

    async def check(self, p: EnvoyExtAuthzHttp, method: str, target: str,
                    headers: list[tuple[str, str]]) -> ExtAllowed | ExtDenied:
        creq = check_request(p, method, target, headers)
        host = f"[{p.service}]" if ":" in p.service else p.service
        url = f"http://{host}:{p.port}{creq.target}"
        try:
            with aio.fail_after(creq.timeout):
                r = await self._clients.request(creq.method, url, headers=list(creq.headers), content=b"")
        except (HTTPError, aio.TooSlowError, OSError, ValueError) as e:
            why = f"{p.service}:{p.port}: {type(e).__name__} {e}".strip()
            log.warning("external authorizer failed: %s", why)
            return on_error(p, why)
        return check_result(p, r.status_code, r.header_list, r.content)


def provider_named(providers, name: str) -> EnvoyExtAuthzHttp | None:
    for prov in providers:
        if prov.name == name:
            return prov.envoy_ext_authz_http
    return None


async def run_custom(rq, provider: str, policy: str):
    """Ask the provider about ``rq``: None when allowed (upstream headers applied), else the LocalReply."""
    p = provider_named(rq.snap.settings.extension_providers, provider)
    if p is None:
        rq.detail = f"CUSTOM policy {policy}: provider {provider!r} is not in the mesh settings' extensionProviders"
        return LocalReply(403, b"RBAC: access denied", [("content-type", "text/plain"),
                                                        ("x-meshctl-reason", "unknown ext-authz provider")], UAEX)
    res = await rq.rt.ext_authz.check(p, rq.head.method, rq.head.path, rq.headers)
    if isinstance(res, ExtAllowed):
        if res.upstream_headers:
            rq.headers = apply_upstream(rq.headers, res.upstream_headers)
        return None
    rq.detail = f"denied by external authorizer {provider} (CUSTOM policy {policy}): {res.status}"
    return LocalReply(res.status, res.body, list(res.headers), UAEX)
