"""Pure gRPC helpers for the proxy: message framing counts, timeouts, status codes.

gRPC runs over HTTP/2 (``meshctl.protocol.http2``); the proxy never decodes
protobuf, it only needs what the gRPC wire protocol puts around it:

* Length-prefixed messages: each message in a DATA stream is one flag byte
  (0 = plain, 1 = compressed) and a 4-byte big-endian length, then the
  payload. ``MessageCounter`` counts complete messages across arbitrary chunk
  boundaries (``istio_request_messages_total`` / ``istio_response_messages_total``)
  and refuses declared lengths over a cap before any payload arrives.
* ``grpc-timeout``: 1 to 8 ASCII digits and a unit (H M S m u n).
* ``grpc-status`` / ``grpc-message``: in trailers, or in the head of a
  "trailers-only" response (HTTP 200, END_STREAM on the HEADERS frame). Locally
  generated errors (no route, fault abort, timeout) use the trailers-only form
  built by ``local_grpc_reply``.

Nothing here does I/O or keeps global state.
"""

from __future__ import annotations

import re
from enum import IntEnum

from .events import HeaderList, ResponseHead, header_value

__all__ = [
    "GrpcError",
    "GrpcStatus",
    "MessageCounter",
    "parse_grpc_timeout",
    "format_grpc_timeout",
    "grpc_status_from",
    "grpc_status_for_http",
    "is_grpc",
    "local_grpc_reply",
    "encode_grpc_message",
    "decode_grpc_message",
]


class GrpcError(ValueError):
    """A gRPC wire value meshctl cannot accept (bad framing, bad timeout)."""


class GrpcStatus(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# ------------------------------------------------------------------ framing
PREFIX_LEN = 5
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's own default receive limit


class MessageCounter:
    """Counts complete length-prefixed gRPC messages in one direction of a stream.

    ``feed(chunk)`` returns how many messages the chunk completed; ``messages``
    is the running total. A declared length over ``max_message_size``, or a
    flag byte other than 0/1, raises ``GrpcError`` (the proxy answers
    RESOURCE_EXHAUSTED / INTERNAL and resets the stream). ``in_message`` says a
    message is partly received (a stream ending then was truncated).
    """

    __slots__ = ("max_message_size", "messages", "_prefix", "_remaining")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self.max_message_size = max_message_size
        self.messages = 0
        self._prefix = b""  # bytes of a prefix still incomplete (< 5)
        self._remaining = 0  # payload bytes still expected for the current message

    @property
    def in_message(self) -> bool:
        return self._remaining > 0 or bool(self._prefix)

    def feed(self, data: bytes) -> int:
        n = len(data)
        i = 0
        done = 0
        remaining = self._remaining
        while i < n:
            if remaining:
                take = n - i
                if take >= remaining:
                    i += remaining
                    remaining = 0
                    done += 1
                else:
                    remaining -= take
                    i = n
                continue
            prefix = self._prefix
            if not prefix and n - i >= PREFIX_LEN:  # the common case: a whole prefix here
                prefix = data[i : i + PREFIX_LEN]
                i += PREFIX_LEN
            else:
                need = PREFIX_LEN - len(prefix)
                prefix += data[i : i + need]
                i += need
                if len(prefix) < PREFIX_LEN:
                    self._prefix = prefix
                    break
                self._prefix = b""
            flag = prefix[0]
            length = int.from_bytes(prefix[1:5], "big")
            if flag > 1:
                self._remaining = 0
                raise GrpcError(f"gRPC message with invalid compressed-flag byte {flag} (must be 0 or 1)")
            if length > self.max_message_size:
                self._remaining = 0
                raise GrpcError(
                    f"gRPC message declares {length} bytes, over the limit of {self.max_message_size}"
                )
            if length:
                remaining = length
            else:
                done += 1
        self._remaining = remaining
        self.messages += done
        return done


# ------------------------------------------------------------------ timeouts
_TIMEOUT_RE = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# finest first: gRPC writes the finest unit whose value fits in 8 digits
_UNIT_NS = (("n", 1), ("u", 1_000), ("m", 1_000_000), ("S", 10**9), ("M", 60 * 10**9), ("H", 3600 * 10**9))
_MAX_TIMEOUT_VALUE = 99_999_999


def parse_grpc_timeout(value: str) -> float:
    """``"100m"`` -> 0.1 seconds. Raises GrpcError for anything the spec does not allow."""
    m = _TIMEOUT_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise GrpcError(
            f"invalid grpc-timeout {value!r}: expected 1-8 digits followed by one of H M S m u n"
        )
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_grpc_timeout(seconds: float) -> str:
    """Seconds -> the finest grpc-timeout unit that fits in 8 digits (rounded up, so a
    deadline is never shortened by formatting). Longer than 99999999 hours is clamped."""
    if seconds != seconds or seconds < 0:
        raise GrpcError(f"grpc-timeout cannot be negative or NaN: {seconds!r}")
    if seconds == float("inf"):
        return f"{_MAX_TIMEOUT_VALUE}H"
    ns = round(seconds * 1e9)
    for unit, size in _UNIT_NS:
        v = -(-ns // size)
        if v <= _MAX_TIMEOUT_VALUE:
            return f"{v}{unit}"
    return f"{_MAX_TIMEOUT_VALUE}H"


# ------------------------------------------------------------------ status
def is_grpc(headers: HeaderList) -> bool:
    """content-type is application/grpc, application/grpc+proto, application/grpc; ..."""
    ct = header_value(headers, "content-type")
    if ct is None:
        return False
    ct = ct.strip().lower()
    if not ct.startswith("application/grpc"):
        return False
    rest = ct[16:]
    return rest == "" or rest[0] in "+;"


def grpc_status_from(headers: HeaderList) -> int | None:
    """grpc-status from trailers (or a trailers-only head); None if absent.
    An unparseable value counts as UNKNOWN (2), as gRPC clients treat it."""
    v = header_value(headers, "grpc-status")
    if v is None:
        return None
    v = v.strip()
    if v.isascii() and v.isdigit():
        return int(v)
    return int(GrpcStatus.UNKNOWN)


_HTTP_TO_GRPC = {
    400: GrpcStatus.INTERNAL,
    401: GrpcStatus.UNAUTHENTICATED,
    403: GrpcStatus.PERMISSION_DENIED,
    404: GrpcStatus.UNIMPLEMENTED,
    429: GrpcStatus.UNAVAILABLE,
    502: GrpcStatus.UNAVAILABLE,
    503: GrpcStatus.UNAVAILABLE,
    504: GrpcStatus.UNAVAILABLE,
}


def grpc_status_for_http(status: int) -> int:
    """The gRPC code for an HTTP status, per gRPC's http-grpc-status-mapping.md."""
    if status == 200:
        return int(GrpcStatus.OK)
    return int(_HTTP_TO_GRPC.get(status, GrpcStatus.UNKNOWN))


def encode_grpc_message(message: str) -> str:
    """Percent-encode a grpc-message value (UTF-8; bytes outside 0x20-0x7E and '%')."""
    raw = message.encode("utf-8")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return message
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


def decode_grpc_message(value: str) -> str:
    """Undo ``encode_grpc_message``; malformed escapes are kept as they are."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    raw = value.encode("latin-1", "replace")
    while i < len(raw):
        b = raw[i]
        if b == 0x25 and _is_hex2(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex2(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


def local_grpc_reply(status: int, message: str = "") -> tuple[ResponseHead, HeaderList]:
    """A trailers-only gRPC response for an error the proxy generates itself.

    Returns ``(head, trailers)``; ``trailers`` is empty because grpc-status and
    grpc-message travel in the head. Send it with ``end_stream=True`` on the
    head (HTTP/2: one HEADERS frame with END_STREAM).
    """
    if not 0 <= int(status) <= 16:
        raise ValueError(f"gRPC status must be 0..16, not {status}")
    headers: HeaderList = [("content-type", "application/grpc"), ("grpc-status", str(int(status)))]
    if message:
        headers.append(("grpc-message", encode_grpc_message(message)))
    return ResponseHead(200, headers, http_version="2"), []
