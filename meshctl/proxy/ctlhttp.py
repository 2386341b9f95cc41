"""The sidecar's HTTP client for everything that is not proxied traffic: Pilot
(config), Mixer (quota asks), the span collectors and external authorizers.

It is meshctl/plainhttp.py's client on the data plane's own runtime
(proxy/aio.py) and sockets (stream.connect_tcp: names through the sidecar's
DNS cache), so these calls run on whichever runtime the sidecar runs on.
``https://`` is served too (a collector behind TLS), verified against the
system's trusted CAs, on the same non-blocking TLS stream as upstream TLS.
"""

from __future__ import annotations

import ssl
from typing import Any

import meshctl.proxy.aio as aio
from ..plainhttp import PlainHTTPClient, Response
from .stream import UpstreamConnectError, connect_tcp, start_tls

_SYSTEM_CA: ssl.SSLContext | None = None


async def _connect(scheme: str, host: str, port: int) -> Any:
    try:
        raw = await connect_tcp(host, port)
    except UpstreamConnectError as exc:
        raise OSError(exc.cause) from None
    if scheme == "http":
        return raw
    global _SYSTEM_CA
    if _SYSTEM_CA is None:
        _SYSTEM_CA = ssl.create_default_context()
    tls = start_tls(raw, _SYSTEM_CA, server_side=False, server_hostname=host)
    try:
        await tls.do_handshake()
    except (aio.BrokenResourceError, aio.ClosedResourceError) as exc:
        await aio.aclose_forcefully(tls)
        cause = exc.__cause__ or exc
        raise OSError(f"TLS handshake failed: {getattr(cause, 'verify_message', None) or cause}") from None
    except BaseException:
        await aio.aclose_forcefully(tls)
        raise
    return tls


def control_client(*, timeout: float = 10.0, read_timeout: float | None = -1.0,
                   headers: dict[str, str] | None = None) -> PlainHTTPClient:
    """A PlainHTTPClient on the sidecar's runtime (arguments as PlainHTTPClient's)."""
    return PlainHTTPClient(timeout=timeout, read_timeout=read_timeout, headers=headers, runtime=aio,
                           connect=_connect)


class ClientPool:
    """Concurrent calls to one kind of peer (Mixer's quota asks, external authorizers):
    a call takes an idle kept-alive client, or a new one (a PlainHTTPClient carries one
    request at a time), and gives it back after; ``keep`` idle clients are kept."""

    def __init__(self, *, keep: int = 8, timeout: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.keep = keep
        self.timeout = timeout
        self.headers = headers
        self._idle: list[PlainHTTPClient] = []

    async def request(self, method: str, url: str, **kw: Any) -> Response:
        client = self._idle.pop() if self._idle else control_client(timeout=self.timeout, headers=self.headers)
        r = await client.request(method, url, **kw)  # on failure it has closed its connection: dropped
        if len(self._idle) < self.keep:
            self._idle.append(client)
        else:
            await client.aclose()
        return r

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await client.aclose()
