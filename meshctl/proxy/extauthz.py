"""The call to an external authorizer (AuthorizationPolicy CUSTOM, Istio's
envoyExtAuthzHttp); what to send and what the answer means is core.extauthz.

One httpx client per proxy runtime, created on first use, keeps connections
to the authorizers alive between checks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import meshctl.proxy.aio as aio
from ..core.extauthz import ExtAllowed, ExtDenied, apply_upstream, check_request, check_result, on_error
from ..model.proxyconfig import EnvoyExtAuthzHttp
from .request import LocalReply

if TYPE_CHECKING:  # httpx is loaded on the first CUSTOM check (a sidecar that never makes one saves ~3 MB)
    import httpx

log = logging.getLogger("meshctl.proxy.extauthz")

UAEX = "UAEX"  # Envoy's response flag: unauthorized by the external authorization service


class ExtAuthzClient:
    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    async def check(self, p: EnvoyExtAuthzHttp, method: str, target: str,
                    headers: list[tuple[str, str]]) -> ExtAllowed | ExtDenied:
        import httpx

        creq = check_request(p, method, target, headers)
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        host = f"[{p.service}]" if ":" in p.service else p.service
        url = f"http://{host}:{p.port}{creq.target}"
        sent = [(k, v) for k, v in creq.headers if k != "content-length"]
        try:
            with aio.fail_after(creq.timeout):
                r = await self._client.request(creq.method, url, headers=sent, content=b"")
        except (httpx.HTTPError, aio.TooSlowError, OSError, ValueError) as e:
            why = f"{p.service}:{p.port}: {type(e).__name__} {e}".strip()
            log.warning("external authorizer failed: %s", why)
            return on_error(p, why)
        return check_result(p, r.status_code, [(k.lower(), v) for k, v in r.headers.multi_items()], r.content)


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
