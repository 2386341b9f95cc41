"""The server name (SNI) of a TLS ClientHello, read without consuming it (sans-IO).

A gateway port with several TLS servers picks one by SNI before the handshake
(Envoy's tls_inspector): PASSTHROUGH servers relay the untouched bytes, the
others terminate TLS with that server's certificate. Only what that needs is
parsed (RFC 8446 4.1.2, RFC 6066 3):

    record:      type 22 (handshake) | version (2) | length (2) | fragment
    handshake:   type 1 (ClientHello) | length (3) | version (2) | random (32)
                 | session_id <0..32> | cipher_suites <2..> | compression <1..>
                 | extensions <0..2^16-1>
    extension 0: server_name_list <2..> of name_type (0: host_name) | name <1..>

``parse(data)`` says NEED_MORE until the whole ClientHello has arrived (it may
span records), NOT_TLS when the bytes cannot be a ClientHello, else the
server name (None when the client sent none).
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = "need-more"
NOT_TLS: Final = "not-tls"
MAX_HELLO = 64 * 1024  # larger than any real ClientHello; more is refused as not TLS


class Hello:
    __slots__ = ("sni",)

    def __init__(self, sni: str | None) -> None:
        self.sni = sni

    def __repr__(self) -> str:
        return f"Hello(sni={self.sni!r})"


def parse(data: bytes) -> Hello | str:
    """``Hello`` once the ClientHello is complete; NEED_MORE or NOT_TLS otherwise."""
    # gather the handshake bytes from the records
    hs = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            if pos == 0 and data and data[0] != 22:
                return NOT_TLS
            return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS
        if data[pos] != 22 or data[pos + 1] != 3:
            return NOT_TLS
        n = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if len(data) - pos - 5 < n:
            return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS
        hs += data[pos + 5 : pos + 5 + n]
        pos += 5 + n
        if len(hs) >= 4:
            if hs[0] != 1:
                return NOT_TLS
            need = int.from_bytes(hs[1:4], "big") + 4
            if len(hs) >= need:
                return _client_hello(bytes(hs[4:need]))
        if pos >= len(data):
            return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS


def _client_hello(b: bytes) -> Hello | str:
    try:
        i = 2 + 32  # version, random
        i += 1 + b[i]  # session id
        i += 2 + int.from_bytes(b[i : i + 2], "big")  # cipher suites
        i += 1 + b[i]  # compression methods
        if i >= len(b):
            return Hello(None)  # no extensions
        end = i + 2 + int.from_bytes(b[i : i + 2], "big")
        i += 2
        while i + 4 <= end:
            etype = int.from_bytes(b[i : i + 2], "big")
            elen = int.from_bytes(b[i + 2 : i + 4], "big")
            body = b[i + 4 : i + 4 + elen]
            i += 4 + elen
            if etype != 0:
                continue
            j = 2
            while j + 3 <= len(body):
                ntype = body[j]
                nlen = int.from_bytes(body[j + 1 : j + 3], "big")
                name = body[j + 3 : j + 3 + nlen]
                j += 3 + nlen
                if ntype == 0:
                    return Hello(name.decode("ascii", "replace").lower().rstrip("."))
        return Hello(None)
    except IndexError:
        return NOT_TLS


def host_matches(pattern: str, name: str) -> bool:
    """A Gateway server host (``*``, ``*.example.com``, exact) against an SNI name."""
    if pattern == "*":
        return True
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name
