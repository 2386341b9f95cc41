"""The door from http.py to the HTTP/2 connection loop (h2conn.py), opened by a
sidecar's first connection that starts with the HTTP/2 preface.

Interpreted on purpose (it is not in setup.py's COMPILED): in the compiled build, a
compiled module that imports h2conn, even inside a function, makes its shared library
load the HTTP/2 library at start, and every sidecar would carry it (see protocols.py).
"""

from __future__ import annotations

import meshctl.proxy.aio as aio


async def serve_h2(rt, active_listener, stream: aio.Stream, client_ip: str, first: bytes, base, lstats) -> None:
    """Serve a downstream connection whose first bytes (``first``) were the HTTP/2 preface."""
    from .h2conn import serve_h2_connection

    await serve_h2_connection(rt, active_listener, stream, client_ip, first, base, lstats)
