"""One accepted connection's task, from admission to its handler.

``serve_connection`` is what the runtime (runtime.py) starts for every connection
a listener accepts: the local-user check of outbound listeners (peercheck.py),
TLS for a gateway's TLS ports (gateway_tls.py) and mutual TLS by PeerAuthentication
on inbound ones (identity.py), then the listener's handler (http.py, or tcp.py for
opaque TCP). A bug in it closes that connection, not the proxy.

Compiled with mypyc (setup.py's COMPILED): it is the root of the task's await
chain, which trio passes through at every wake-up of the connection (twice per
HTTP/1.1 request at least: the client's bytes, the upstream's answer).
"""

from __future__ import annotations

import logging
from typing import Any

import meshctl.proxy.aio as aio
from ..core.peeruid import checks as checks_peer
from .gateway_tls import serve_gateway_tls
from .http import serve_http_connection
from .identity import secure_inbound
from .listener import ActiveListener
from .overload import FD_ERRNOS
from .peercheck import admit_peer
from .tcp import serve_tcp_connection

__all__ = ["serve_connection"]

log = logging.getLogger("meshctl.proxy")


async def serve_connection(rt: Any, al: ActiveListener, stream: Any, client_ip: str) -> None:
    """Serve one connection until it closes; ``al.active`` and ``rt.open_conns`` (counted
    up by the accept loop) are counted down when it does. Never raises but for
    cancellation."""
    try:
        spec = al.spec
        try:
            if rt.peer_uids is not None and checks_peer(spec.direction) and not await admit_peer(
                    rt, al, stream, client_ip):  # a local user not allowed: refused (peercheck.py)
                return
            if spec.tls_servers:  # a gateway port with TLS: never plaintext (gateway_tls.py)
                await serve_gateway_tls(rt, al, stream, client_ip)
                return
            if spec.direction == "inbound" and spec.mtls_mode != "DISABLE":
                stream = await secure_inbound(rt, spec, stream)  # mTLS by PeerAuthentication
                if stream is None:
                    return
            if spec.protocol == "tcp":
                await serve_tcp_connection(rt, al, stream, client_ip)
            else:
                await serve_http_connection(rt, al, stream, client_ip)
        except OSError as exc:
            if exc.errno in FD_ERRNOS:  # one line per condition, no traceback (overload.py)
                rt.fd_shortage.hit(aio.current_time(), f"{exc.strerror} while serving a connection")
            else:
                log.exception("listener %s: connection from %s failed", spec.name, client_ip)
            stream.close_now()
        except Exception:
            log.exception("listener %s: connection from %s failed", spec.name, client_ip)
            stream.close_now()
    finally:
        al.active -= 1
        rt.open_conns -= 1
