"""httpx clients for meshctl's own plain-HTTP calls between its processes
(sidecar → Pilot, Citadel, Mixer; supervisor → Pilot; Mixer → sidecars).

httpx gives every new client an SSL context loaded with the system's CA bundle,
even a client that only ever speaks http://: about 15 ms of CPU each, and a
sidecar makes two at start. Pilot, Citadel and Mixer serve plain HTTP, so
these clients get a context that trusts no CA at all: an https:// URL through
one fails verification instead of being trusted. (Consul and Eureka, which may
be https, keep httpx's default.)
"""

from __future__ import annotations

import ssl

import httpx

_NO_CA: ssl.SSLContext | None = None


def plain_http_client(**kwargs) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**kwargs)`` for http:// URLs, with ``trust_env`` off."""
    global _NO_CA
    if _NO_CA is None:
        _NO_CA = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peers, trusts nobody
    kwargs.setdefault("trust_env", False)
    return httpx.AsyncClient(verify=_NO_CA, **kwargs)
