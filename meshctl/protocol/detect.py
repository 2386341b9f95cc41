"""Tell the protocol of a new connection from its first bytes.

``detect(prefix)`` returns ``"h2"`` (HTTP/2 prior-knowledge preface), ``"tls"``
(a TLS handshake record, as a ClientHello starts), ``"http1"`` (a method token
and a space), ``None`` while more bytes are needed, and ``"tcp"`` once the
bytes can be none of those (to be relayed as opaque TCP, or refused).
"""

from __future__ import annotations

import re

__all__ = ["PREFACE", "PREFACE_LEN", "MAX_METHOD_LEN", "UPSTREAM_ALPN", "detect"]

# ALPN a sidecar offers when it is the TLS client: the upstream pool speaks HTTP/1.1
# (the HTTP/2 pool asks for h2 itself).
UPSTREAM_ALPN = ("http/1.1",)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_LEN = 24
MAX_METHOD_LEN = 20  # longer than any registered method (UPDATEREDIRECTREF is 17)

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1," + str(MAX_METHOD_LEN).encode() + rb"}( ?)")


def detect(prefix: bytes) -> str | None:
    """Classify a connection by the bytes received so far (see module doc)."""
    if not prefix:
        return None
    n = len(prefix)
    if n < PREFACE_LEN:
        if PREFACE.startswith(prefix):
            return None
    elif prefix.startswith(PREFACE):
        return "h2"
    if prefix[0] == 0x16:
        if n < 2:
            return None
        return "tls" if prefix[1] == 0x03 else "tcp"
    m = _METHOD.match(prefix)
    if m is None:
        return "tcp"
    if m.group(1):
        return "http1"
    if m.end() == n and n <= MAX_METHOD_LEN:
        return None  # a method token so far, no space yet
    return "tcp"
