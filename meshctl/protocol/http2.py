"""Sans-IO HTTP/2 codec (RFC 9113) for both legs of a proxy hop: its own frame
layer, stream states and flow control; HPACK (RFC 7541): its own encoder,
jh2's native decoder.

``H2Server`` serves one downstream connection; ``H2Client`` carries many
multiplexed requests on one upstream connection. Both speak the events of
``meshctl.protocol.events`` (every event carries its ``stream_id``), so the
proxy pipeline is the one it runs for HTTP/1.1, plus three HTTP/2-only
events defined here: ``GoAway``, ``WindowUpdated`` and ``H2Reset`` (a
``Reset`` with the RST_STREAM error code). No sockets, no trio, no clock of
its own (the rapid-reset clock is injected).

Frames are parsed and built here with ``struct`` (no frame objects, no event
objects besides the ones handed out, no logging on the hot path); header
blocks out are coded by ``_HpackEncoder`` (dict lookups, literals without
Huffman coding), blocks in decoded by jh2's native HPACK. Every block's structure is read
first (``_walk_block``): the native decoder panics on a representation cut
off by the end of the block, and Rust prints each panic to stderr, so a peer
could write to our stderr at will; such a block, and a dynamic table size
update after the first field (RFC 7541 4.2), is a COMPRESSION_ERROR before
the decoder sees it. For untrusted clients (the server side) each decoded
block is then checked for Huffman padding longer than 7 bits or not the EOS
code's first bits (5.2, ``_check_huffman``: the code lengths of the decoded
string say how many bits of padding the literal has; those must be 0-7 one
bits). A panic all the same is a COMPRESSION_ERROR
like any other bad block. A block that leaves the dynamic table as it is (every
field indexed, or literals without indexing: a peer's steady state) decodes to
what it did last time until a block changes the table, so such blocks are kept
decoded per connection with their checked fields (``_Endpoint._decode``,
``_fields_of``). Measured with ``bench/h2_codec_bench.py``.

Rules this module keeps
-----------------------
* Bytes out: every method that changes the connection returns ALL bytes the
  connection has pending, in order (including PING/SETTINGS ACKs and
  WINDOW_UPDATEs queued by an earlier ``feed``), as one ``bytes``: one write
  per batch of frames. After ``feed`` call ``data_to_send()``. Write what you
  get, in the order you get it.
  Bytes are counted as "sent" once handed out: the control-frame flood cap
  counts ACKs queued since the last hand-out, so take bytes only when the
  connection can write them.
* Inbound flow control is the caller's: each ``Data`` event must be followed,
  once the bytes have been passed on, by ``ack_received(stream_id, n)``, which
  reopens the windows (WINDOW_UPDATE, sent once half a window is consumed).
  Not acking is backpressure: the peer stops after ``initial_window_size``
  bytes per stream and ``connection_window`` per connection; a peer that
  sends past a window is a connection error (FLOW_CONTROL_ERROR). Padding is
  acked by the codec; so is whatever is unacked when a stream is reset or
  completes both ways, and DATA for streams that are gone.
* Outbound flow control is the codec's: ``data()`` sends what the windows
  allow and queues the rest (``end()`` and trailers queue behind it). Queued
  bytes go out from later calls as the peer's WINDOW_UPDATEs (or a larger
  SETTINGS_INITIAL_WINDOW_SIZE) arrive; a smaller initial window can make a
  stream's window negative, and nothing is sent until it is positive again.
  When ``send_window(stream_id)`` is 0 the caller should stop reading that
  stream's source until ``feed`` returns ``WindowUpdated(stream_id)``, which
  is emitted once a stream that was blocked has room again.
* Connection-fatal errors raise ``ProtocolError`` from ``feed`` (status 400 for
  a downstream client, 502 for an upstream); ``data_to_send()`` then holds a
  GOAWAY with the RFC 9113 error code (PROTOCOL_ERROR, FRAME_SIZE_ERROR,
  FLOW_CONTROL_ERROR, COMPRESSION_ERROR, STREAM_CLOSED), and the connection
  should be closed after writing it. Frame rules (RFC 9113 4-6): the client
  preface, SETTINGS first, frame sizes above our SETTINGS_MAX_FRAME_SIZE,
  fixed-size frames of the wrong length, frames on stream 0 that belong on a
  stream and the reverse, padding longer than the frame, HEADERS without
  END_HEADERS followed by anything but CONTINUATION of the same stream,
  CONTINUATION out of place, streams opened with an identifier of the wrong
  parity or not above the previous one, frames other than HEADERS/PRIORITY
  on an idle stream, PUSH_PROMISE (push is off), SETTINGS values out of
  range, a zero or overflowing WINDOW_UPDATE on the connection. Stream
  errors (RST_STREAM, and an ``H2Reset`` event if the stream was open): DATA
  on a half-closed (remote) or closed stream and HEADERS on a half-closed
  (remote) one (STREAM_CLOSED; HEADERS on a closed stream is a connection
  error STREAM_CLOSED; frames on a stream this codec reset or refused are
  ignored, their DATA acked, RFC 9113 5.1), a stream depending on itself, a
  zero or overflowing stream WINDOW_UPDATE, a body whose length disagrees
  with its content-length (PROTOCOL_ERROR).
  Malformed header blocks are connection errors (GOAWAY PROTOCOL_ERROR), as in
  Envoy's default (``stream_error_on_invalid_http_messaging: false``). The
  rules are RFC 9113 8.2-8.3: empty or uppercase names, whitespace around
  names and values, unknown, duplicate, misplaced or missing pseudo-headers,
  connection-specific fields, ``te`` other than trailers, an empty ``:path``,
  ``:authority`` and Host that disagree, a content-length that is not a
  number, trailers without END_STREAM, checked in one pass over the decoded
  fields.
* Stream-level refusals never reach the caller as requests: past
  ``max_concurrent_streams`` a new stream gets RST_STREAM(REFUSED_STREAM)
  (no event); a request whose decoded header list is larger than
  ``max_header_list_size`` (name + value + 32 per field, pseudo-headers
  included) or has more than ``max_headers`` fields gets a local 431 and an
  ``H2Reset`` event (log it; there is nothing to cancel). For a response
  (H2Client) the stream is reset (CANCEL) with an ``H2Reset`` event.
  Header blocks above twice the limit abort HPACK decoding, which is fatal
  (GOAWAY ENHANCE_YOUR_CALM), as the HPACK table cannot be kept in step.
* Floods answered with GOAWAY(ENHANCE_YOUR_CALM) + ProtocolError: more than
  ``max_continuation_frames`` CONTINUATION frames in one header block; more
  than ``max_queued_control_frames`` PING/SETTINGS ACKs and RST_STREAMs queued
  and not handed out; more than ``rapid_reset_threshold`` streams reset by the
  client before any response head, or refused for opening past
  ``max_concurrent_streams``, within ``rapid_reset_window`` seconds
  (CVE-2023-44487); more than ``max_consecutive_empty_frames`` empty DATA
  frames in a row (CVE-2019-9518); as Envoy, more PRIORITY (and unknown-type)
  frames than ``max_inbound_priority_frames_per_stream`` x (1 + streams
  opened), more WINDOW_UPDATEs than
  ``max_inbound_window_update_frames_per_data_frame_sent`` x (1 + DATA frames
  sent), and more than ``max_inbound_control_frames_per_window`` PING/SETTINGS
  frames per ``control_frame_window`` seconds even when their ACKs are sent (a
  PING or SETTINGS that follows DATA frames we sent since the last one is not
  counted: grpc-go's bandwidth probes, one per call on a busy connection).
* A response that completes while its request is still open is followed by
  RST_STREAM(NO_ERROR) (RFC 9113 8.1), so the client stops sending.
* GOAWAY both ways is graceful: streams at or below the last-stream-id
  finish; later ones are refused (server: RST_STREAM REFUSED_STREAM; client:
  an ``H2Reset`` with ``refused`` true, safe to retry elsewhere).
* Calls naming a stream that is gone (reset by the peer, finished) are ignored
  and return the pending bytes: the proxy may race a Reset it has not seen yet.
* Output headers are the caller's ``HeaderList``; names are lower-cased,
  connection-specific fields are dropped (``te`` kept only as ``trailers``),
  CR/LF/NUL in values raise ``ValueError``; authorization and short cookies
  are sent never-indexed (RFC 7541 7.1.3).
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Final, Iterable

from jh2.hpack.exceptions import HPACKError as _PureHPACKError
from jh2.hpack.huffman_constants import REQUEST_CODES_LENGTH as _HUFFMAN_CODE_LENGTHS
from jh2.hpack.exceptions import OversizedHeaderListError as _PureOversized
from jh2.hpack.table import HeaderTable as _StaticTable

try:  # jh2's native HPACK decoder (Rust); jh2 itself falls back to its pure-Python one where it does not load
    from jh2._hazmat import Decoder as _Decoder
    from jh2._hazmat import HPACKError as _NativeHPACKError
    from jh2._hazmat import OversizedHeaderListError as _NativeOversized
except ImportError:  # pragma: no cover - platforms without jh2's wheel
    from jh2.hpack import Decoder as _Decoder
    _NativeHPACKError = _PureHPACKError
    _NativeOversized = _PureOversized

# jh2's pure-Python HPACK (loaded where the native one is not) logs every integer it
# codes at DEBUG (~60 calls per header block): never worth it here
logging.getLogger("jh2.hpack.hpack").disabled = True

from ..dataclass_slots import DATACLASS_SLOTS
from .events import (
    Data,
    EndOfMessage,
    Event,
    HeaderList,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    header_value,
)

__all__ = [
    "H2Limits",
    "H2Server",
    "H2Client",
    "GoAway",
    "WindowUpdated",
    "H2Reset",
    "h1_head_to_h2",
    "h2_head_to_h1",
    "CONNECTION_SPECIFIC",
]

_MAX_WINDOW: Final = (1 << 31) - 1


@dataclass(frozen=True)
class H2Limits:
    max_concurrent_streams: int = 100
    max_header_list_size: int = 60 * 1024  # decoded: name + value + 32 per field
    max_headers: int = 100
    initial_window_size: int = 1 << 20  # per stream, what we advertise
    connection_window: int = 4 << 20
    max_frame_size: int = 16384
    max_continuation_frames: int = 32  # CONTINUATION flood cap
    rapid_reset_threshold: int = 200  # premature resets per window before GOAWAY (CVE-2023-44487)
    rapid_reset_window: float = 10.0
    max_queued_control_frames: int = 1000  # PING/SETTINGS ACK (and RST_STREAM) flood cap
    max_consecutive_empty_frames: int = 1  # empty DATA frames in a row (CVE-2019-9518), as Envoy
    # frames that cost work and carry nothing for a stream (Envoy's names and defaults):
    # PRIORITY (and unknown/extension frames) over the connection's life, per stream opened
    max_inbound_priority_frames_per_stream: int = 100
    # WINDOW_UPDATE per DATA frame we sent
    max_inbound_window_update_frames_per_data_frame_sent: int = 10
    # PING and SETTINGS, even when their ACKs are handed out at once: per control window
    max_inbound_control_frames_per_window: int = 10_000
    control_frame_window: float = 10.0

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"H2Limits.{what}")

        need(self.max_concurrent_streams >= 1, f"max_concurrent_streams must be >= 1, not {self.max_concurrent_streams}")
        need(self.max_header_list_size >= 1024, f"max_header_list_size must be >= 1024, not {self.max_header_list_size}")
        need(self.max_headers >= 1, f"max_headers must be >= 1, not {self.max_headers}")
        need(65535 <= self.initial_window_size <= _MAX_WINDOW,
             f"initial_window_size must be in 65535..2^31-1, not {self.initial_window_size}")
        need(65535 <= self.connection_window <= _MAX_WINDOW,
             f"connection_window must be in 65535..2^31-1, not {self.connection_window}")
        need(16384 <= self.max_frame_size <= (1 << 24) - 1,
             f"max_frame_size must be in 16384..2^24-1, not {self.max_frame_size}")
        need(self.max_continuation_frames >= 1, "max_continuation_frames must be >= 1")
        need(self.rapid_reset_threshold >= 1, "rapid_reset_threshold must be >= 1")
        need(self.rapid_reset_window > 0, "rapid_reset_window must be > 0")
        need(self.max_queued_control_frames >= 1, "max_queued_control_frames must be >= 1")
        need(self.max_consecutive_empty_frames >= 0, "max_consecutive_empty_frames must be >= 0")
        need(self.max_inbound_priority_frames_per_stream >= 1, "max_inbound_priority_frames_per_stream must be >= 1")
        need(self.max_inbound_window_update_frames_per_data_frame_sent >= 1,
             "max_inbound_window_update_frames_per_data_frame_sent must be >= 1")
        need(self.max_inbound_control_frames_per_window >= 1, "max_inbound_control_frames_per_window must be >= 1")
        need(self.control_frame_window > 0, "control_frame_window must be > 0")


_DEFAULT_LIMITS: Final = H2Limits()

# ---------------------------------------------------------------- inbound header validation
# h2's inbound rules (jh2.utilities.validate_headers), checked in _Endpoint._decode_fields
_REQUEST: Final = 0  # what a header block is
_RESPONSE: Final = 1
_TRAILERS: Final = 2


def _ws(c: int) -> bool:
    """An octet of b" \\t\\n\\r\\x0b\\x0c" (compiled: integer compares, no set lookup)."""
    return c == 32 or 9 <= c <= 13


# a decoded header block: (name, value, never-indexed) per field, as jh2's decoder gives it
# with raw=True (its pure-Python decoder gives (name, value) tuples)
_Raw = list[tuple[bytes, ...]]
# header blocks kept decoded per connection (_Endpoint._decode), and the longest kept: a
# steady state's blocks are a few dozen bytes; the bounds keep what a peer can make a
# connection hold small
_DEC_CACHE_MAX: Final = 16
_DEC_CACHE_BLOCK_MAX: Final = 256


class _Decoded:
    """A header block kept decoded (``_Endpoint._decode``): its fields, and once checked
    as a request, response or trailers (``kind``), what ``_decode_fields`` made of them."""

    __slots__ = ("raw", "kind", "pseudo", "fields", "problem", "length")

    def __init__(self, raw: _Raw) -> None:
        self.raw = raw
        self.kind = -1  # none yet
        self.pseudo: dict[bytes, bytes] = {}  # (read, never changed, by the callers)
        self.fields: HeaderList = []  # (a copy is handed out each time)
        self.problem = ""
        self.length = -1

_UPPER: Final = re.compile(b"[A-Z]")
_CONNECTION_FIELDS: Final = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_PSEUDO_ALLOWED: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_PSEUDO_REQUEST_ONLY: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# regular field names that passed the name checks, decoded (names repeat from request to
# request: the checks run once per name); bounded, so a peer inventing names cannot grow it
_CHECKED_NAMES: Final[dict[bytes, str]] = {}
_CHECKED_NAMES_MAX: Final = 2048


def _malformed_block(pseudo: dict[bytes, bytes], host: bytes | None, kind: int) -> str:
    """What is wrong with a header block's pseudo-headers (RFC 9113 8.3), or ""."""
    if kind == _TRAILERS:
        return f"pseudo-header in trailers: {sorted(pseudo)}" if pseudo else ""
    if kind == _RESPONSE:
        if b":status" not in pseudo:
            return "response without :status"
        bad = [n for n in pseudo if n in _PSEUDO_REQUEST_ONLY]
        return f"request pseudo-headers in a response: {bad}" if bad else ""
    for need in (b":path", b":method", b":scheme"):
        if need not in pseudo:
            return f"request without {need.decode()}"
    if b":status" in pseudo:
        return "response pseudo-header :status in a request"
    if b":protocol" in pseudo and pseudo[b":method"] != b"CONNECT":
        return ":protocol in a request that is not CONNECT"
    if not pseudo[b":path"]:
        return "empty :path"
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        return "request without :authority or Host"
    if authority is not None and host is not None and authority != host:
        return f"mismatched :authority and Host: {authority!r} / {host!r}"
    return ""


# ---------------------------------------------------------------- events
@dataclass(**DATACLASS_SLOTS)
class GoAway:
    """The peer sent GOAWAY: no new streams on this connection. Streams up to
    ``last_stream_id`` may still complete; later ones were not processed."""

    last_stream_id: int
    error_code: int = 0
    debug: bytes = b""


@dataclass(**DATACLASS_SLOTS)
class WindowUpdated:
    """A stream that had no send window (or queued data) can take more data now."""

    stream_id: int



# RFC 9113 7: error codes
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
SETTINGS_TIMEOUT: Final = 0x4
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
CONNECT_ERROR: Final = 0xA
ENHANCE_YOUR_CALM: Final = 0xB
_CODE_NAMES: Final = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
               "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
               "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")


@dataclass(**DATACLASS_SLOTS)
class H2Reset(Reset):
    """A Reset with the HTTP/2 error code (0 when the codec reset the stream itself)."""

    error_code: int = 0

    @property
    def refused(self) -> bool:
        """The peer did not process the request (REFUSED_STREAM or above GOAWAY): safe to retry."""
        return self.error_code == REFUSED_STREAM


H2Event = Event | GoAway | WindowUpdated


def _code_name(code: int) -> str:
    return _CODE_NAMES[code] if 0 <= code < len(_CODE_NAMES) else f"error code {code}"


# ---------------------------------------------------------------- headers
# connection-specific fields, never sent on HTTP/2 (RFC 9113 8.2.2); "te" is
# handled apart (only "trailers" is allowed)
CONNECTION_SPECIFIC: Final = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_DROP_OUT: Final = CONNECTION_SPECIFIC | {"te", "host"}
_NEVER_INDEXED: Final = frozenset({"authorization", "proxy-authorization"})
# fields whose value is new in every request (ids): coded as literals kept out of the HPACK
# dynamic table, where each would evict an entry that later requests reuse, and make every
# lookup in the table longer (the peer's decoder then skips them too)
_PER_REQUEST: Final = frozenset({"x-request-id", "x-client-trace-id", "traceparent", "b3", "x-b3-traceid",
                                 "x-b3-spanid", "x-b3-parentspanid"})

# an HPACK header field as the encoder takes it: (name, value, never-indexed)
_Field = tuple[bytes, bytes, bool]


def _strip_connection_specific(headers: HeaderList, *, drop_host: bool) -> HeaderList:
    for k, v in headers:  # the common case: nothing to strip, a copy (te: trailers stays as it is)
        if k in CONNECTION_SPECIFIC or (k == "te" and v != "trailers") or (drop_host and k == "host"):
            break
    else:
        return list(headers)
    nominated: set[str] = set()
    for k, v in headers:
        if k == "connection":
            nominated.update(t.strip().lower() for t in v.split(",") if t.strip())
    out: HeaderList = []
    for k, v in headers:
        if k == "te":
            if "trailers" in (t.strip().lower() for t in v.split(",")):
                out.append(("te", "trailers"))
            continue
        if k in CONNECTION_SPECIFIC or k in nominated or (drop_host and k == "host"):
            continue
        out.append((k, v))
    return out


# how an output field name is sent (_out_name)
_NAME_PLAIN: Final = 0  # indexed by HPACK
_NAME_UNINDEXED: Final = 1  # never indexed (_NEVER_INDEXED, _PER_REQUEST)
_NAME_COOKIE: Final = 2  # never indexed when short (RFC 7541 7.1.3)
_NAME_TE: Final = 3  # te: sent only as "trailers"
_NAME_DROP: Final = 4  # connection-specific, or host
# output names already checked (names repeat from request to request, mostly as the very
# str objects _decode_fields made): name -> (lower-cased ASCII bytes, _NAME_*); bounded
# (short names only, and no more than _OUT_NAMES_MAX)
_OUT_NAMES: Final[dict[str, tuple[bytes, int]]] = {}
_OUT_NAMES_MAX: Final = 2048
# values of indexed fields already checked and encoded (content-type, te, user-agent, ...):
# value -> stripped latin-1 bytes; short values only, emptied when full
_OUT_VALUES: Final[dict[str, bytes]] = {}
_OUT_VALUES_MAX: Final = 1024
_OUT_VALUE_LEN_MAX: Final = 128


def _out_name(k: str) -> tuple[bytes, int]:
    """``(name as sent, _NAME_*)`` for a caller's field name; ValueError if it may not be sent."""
    got = _OUT_NAMES.get(k)
    if got is not None:
        return got
    low = k if k.islower() else k.lower()
    if low in _DROP_OUT:
        how = _NAME_TE if low == "te" else _NAME_DROP
    elif low[:1] == ":" or not low:
        raise ValueError(f"header name {low!r} is not allowed in a header list (pseudo-headers come from the head)")
    elif low in _NEVER_INDEXED or low in _PER_REQUEST:
        how = _NAME_UNINDEXED
    else:
        how = _NAME_COOKIE if low == "cookie" else _NAME_PLAIN
    try:
        name = low.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"header {low!r} is not encodable as latin-1: {exc}") from None
    got = (name, how)
    if len(_OUT_NAMES) < _OUT_NAMES_MAX and len(k) <= _OUT_VALUE_LEN_MAX:
        _OUT_NAMES[k] = got
    return got


def _out_value(k: str, v: str) -> bytes:
    """A field value as sent (stripped, latin-1); ValueError for CR, LF, NUL or beyond latin-1."""
    if "\r" in v or "\n" in v or "\0" in v:
        raise ValueError(f"CR, LF or NUL in the value of header {k!r}: {v!r}")
    try:
        return v.strip().encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"header {k!r} is not encodable as latin-1: {exc}") from None


def _encode_fields(out: list[_Field], headers: Iterable[tuple[str, str]]) -> list[_Field]:
    """Append the caller's fields to ``out`` as HPACK wants them (bytes, lower-case names;
    connection-specific fields and host dropped, te kept only as "trailers")."""
    values = _OUT_VALUES
    for k, v in headers:
        name, how = _out_name(k)
        if how == _NAME_PLAIN:
            value = values.get(v)
            if value is None:
                value = _out_value(k, v)
                if len(v) <= _OUT_VALUE_LEN_MAX:
                    if len(values) >= _OUT_VALUES_MAX:
                        values.clear()
                    values[v] = value
            out.append((name, value, False))
        elif how == _NAME_UNINDEXED:
            out.append((name, _out_value(k, v), True))
        elif how == _NAME_COOKIE:
            value = _out_value(k, v)
            out.append((name, value, len(value) < 20))
        elif how == _NAME_TE:
            if v.strip().lower() == "trailers":
                out.append((b"te", b"trailers", False))
    return out


# ---------------------------------------------------------------- HPACK encoder (RFC 7541)
# Header blocks out are coded here, not by jh2's native encoder: that one looks each field up
# by a walk over the whole static and dynamic table, and takes its fields through pyo3's
# conversion of a list of tuples (~2.8K instructions per field in callgrind); compiled, a
# field found in these dicts (by name, then value: bytes whose hashes the caches of
# _encode_fields keep) costs a few hundred. String literals are sent without Huffman coding
# (RFC 7541 5.2 leaves that to the encoder): a few bytes more for a new literal, and no
# per-octet work on either side.
_STATIC_TABLE: Final = _StaticTable.STATIC_TABLE  # (name, value) per index 1-61
_STATIC_FIELD: Final[dict[bytes, dict[bytes, int]]] = {}  # name -> value -> its index
_STATIC_NAME: Final[dict[bytes, int]] = {}  # name -> its first index
for _i, (_n, _v) in enumerate(_STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault(_n, {}).setdefault(_v, _i)
    _STATIC_NAME.setdefault(_n, _i)
_TABLE_SIZE_MAX: Final = 4096  # the largest dynamic table we keep, whatever the peer allows
_OCTET: Final = [bytes((_i,)) for _i in range(256)]  # one-octet bytes (a list index, compiled)


def _hpack_int_bytes(value: int, prefix: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with a ``prefix``-bit prefix, ``first``'s high bits set."""
    mask = (1 << prefix) - 1
    if value < mask:
        return _OCTET[first | value]
    out = bytearray()
    out.append(first | mask)
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _HpackEncoder:
    """One connection's HPACK encoder: fields found in the static or dynamic table are sent
    as an index, others as literals with incremental indexing (never-indexed ones, flagged
    by the caller, as never-indexed literals); the dynamic table holds up to
    ``header_table_size`` bytes (32 + name + value per entry, oldest evicted first)."""

    def __init__(self) -> None:
        self._max = _TABLE_SIZE_MAX  # the peer's decoder starts at 4096 too (RFC 9113 6.5.2)
        self._size = 0
        self._entries: list[tuple[bytes, bytes]] = []  # oldest first
        self._added = 0  # entries ever added: entry number k is at index 62 + (_added - 1 - k)
        self._field: dict[bytes, dict[bytes, int]] = {}  # name -> value -> its newest entry number
        self._name: dict[bytes, int] = {}  # name -> its newest entry number
        self._resize_to = -1  # a size change not yet announced: the smallest size since the last block

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, limit: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the table is kept within it (and 4096)."""
        size = min(limit, _TABLE_SIZE_MAX)
        if size == self._max:
            return
        self._max = size
        if self._resize_to < 0 or size < self._resize_to:
            self._resize_to = size
        self._evict(size)

    def _evict(self, room: int) -> None:
        entries = self._entries
        while self._size > room:
            name, value = entries.pop(0)
            self._size -= 32 + len(name) + len(value)
            gone = self._added - len(entries) - 1  # the entry number of the one popped
            values = self._field.get(name)
            if values is not None and values.get(value) == gone:
                del values[value]
                if not values:
                    del self._field[name]
            if self._name.get(name) == gone:
                del self._name[name]

    def _name_index(self, name: bytes) -> int:
        index = _STATIC_NAME.get(name, 0)
        if index:
            return index
        k = self._name.get(name)
        return 0 if k is None else 62 + self._added - 1 - k

    def encode(self, fields: list[_Field]) -> bytes:
        parts: list[bytes] = []
        if self._resize_to >= 0:  # RFC 7541 4.2: the smallest size since the last block, then the last one
            parts.append(_hpack_int_bytes(self._resize_to, 5, 0x20))
            if self._resize_to != self._max:
                parts.append(_hpack_int_bytes(self._max, 5, 0x20))
            self._resize_to = -1
        for name, value, never in fields:
            if never:  # 6.2.3: a literal never indexed
                index = self._name_index(name)
                parts.append(_hpack_int_bytes(index, 4, 0x10))
                if not index:
                    parts.append(_hpack_int_bytes(len(name), 7, 0))
                    parts.append(name)
                parts.append(_hpack_int_bytes(len(value), 7, 0))
                parts.append(value)
                continue
            values = _STATIC_FIELD.get(name)
            if values is not None:
                index = values.get(value, 0)
                if index:  # 6.1: indexed, static table
                    parts.append(_hpack_int_bytes(index, 7, 0x80))
                    continue
            values = self._field.get(name)
            if values is not None:
                k = values.get(value)
                if k is not None:  # 6.1: indexed, dynamic table
                    parts.append(_hpack_int_bytes(62 + self._added - 1 - k, 7, 0x80))
                    continue
            index = self._name_index(name)
            size = 32 + len(name) + len(value)
            indexing = size <= self._max
            # 6.2.1: a literal with incremental indexing; 6.2.2: without (larger than the table)
            parts.append(_hpack_int_bytes(index, 6, 0x40) if indexing else _hpack_int_bytes(index, 4, 0))
            if not index:
                parts.append(_hpack_int_bytes(len(name), 7, 0))
                parts.append(name)
            parts.append(_hpack_int_bytes(len(value), 7, 0))
            parts.append(value)
            if indexing:
                self._evict(self._max - size)
                self._entries.append((name, value))
                self._size += size
                values = self._field.get(name)
                if values is None:
                    values = self._field[name] = {}
                values[value] = self._added
                self._name[name] = self._added
                self._added += 1
        return b"".join(parts)


# ---------------------------------------------------------------- frames (RFC 9113 4, 6)
_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20
# SETTINGS identifiers
_S_HEADER_TABLE_SIZE: Final = 0x1
_S_ENABLE_PUSH: Final = 0x2
_S_MAX_CONCURRENT_STREAMS: Final = 0x3
_S_INITIAL_WINDOW_SIZE: Final = 0x4
_S_MAX_FRAME_SIZE: Final = 0x5
_S_MAX_HEADER_LIST_SIZE: Final = 0x6

_FRAME_HEAD: Final = struct.Struct(">LBL")  # (length << 8 | type, flags, stream id): 9 bytes
_U32: Final = struct.Struct(">L")
_SETTING: Final = struct.Struct(">HL")
_GOAWAY_HEAD: Final = struct.Struct(">LL")
_pack_head: Final = _FRAME_HEAD.pack
_unpack_head: Final = _FRAME_HEAD.unpack_from
_RST_HEAD: Final = _pack_head(4 << 8 | _RST_STREAM, 0, 0)[:5]  # all but the stream id
_SETTINGS_ACK: Final = _pack_head(_SETTINGS, _ACK, 0)
_PING_ACK_HEAD: Final = _pack_head(8 << 8 | _PING, _ACK, 0)

# how a stream that is no longer open ended: frames for it are ignored (we reset
# or refused it, RFC 9113 5.1 "closed") or answered with STREAM_CLOSED
_GONE_IGNORE: Final = 0
_GONE_CLOSED: Final = 1
_GONE_MAX: Final = 512  # closed streams remembered per connection (oldest forgotten first)
_CONN_WINDOW_DEFAULT: Final = 65535


# ---------------------------------------------------------------- HPACK, strictly
class _BadBlock(Exception):
    """A header block RFC 7541 forbids that jh2's native decoder decoded anyway."""


# the Huffman code's length in bits of each octet (RFC 7541 Appendix B; all under 31), as bytes:
# indexing bytes is a native operation once compiled
_HUFFMAN_BITS: Final[bytes] = bytes(_HUFFMAN_CODE_LENGTHS[:256])


def _hpack_int(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) at ``pos`` with a ``prefix``-bit prefix: (value, next pos)."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block) or shift > 28:
            raise _BadBlock("integer past the end of the block or too large")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _hpack_string(block: bytes, pos: int, decoded: bytes) -> int:
    """Check one string literal (RFC 7541 5.2) against what the decoder made of it: a
    Huffman-coded one is the code of ``decoded`` (the decoder read it so), then padding,
    which must be at most 7 bits, all ones (the EOS code's first bits). The code's
    length follows from ``decoded``: no re-coding. (An EOS inside, or a longer or
    other padding, the decoder did not turn into octets: too many bits left, or not ones.)"""
    huffman = block[pos] & 0x80
    length, pos = _hpack_int(block, pos, 7)
    end = pos + length
    if huffman:
        bits = 0
        widths = _HUFFMAN_BITS
        for c in decoded:
            bits += widths[c]
        pad = length * 8 - bits
        if pad < 0 or pad > 7:
            raise _BadBlock("Huffman-coded string with bad padding or EOS")
        if pad:
            ones = (1 << pad) - 1
            if block[end - 1] & ones != ones:
                raise _BadBlock("Huffman-coded string with bad padding or EOS")
    return end


def _skip_string(block: bytes, pos: int) -> int:
    """Past one string literal (RFC 7541 5.2) at ``pos``, which must end inside the block."""
    if pos >= len(block):
        raise _BadBlock("literal past the end of the block")
    length, pos = _hpack_int(block, pos, 7)
    pos += length
    if pos > len(block):
        raise _BadBlock("literal past the end of the block")
    return pos


def _walk_block(block: bytes) -> tuple[int, list[tuple[int, int, int]], bool]:
    """A header block's structure, read before jh2's native decoder sees it: that
    decoder panics (Rust prints to stderr, per block) on a representation or string
    cut off by the end of the block, so a peer could write to our stderr at will.
    Refuses those, and a dynamic table size update after a field (RFC 7541 4.2).
    Returns the number of fields, each Huffman-coded string as (field index,
    0 name / 1 value, position), for ``_check_huffman`` once decoded, and whether
    decoding the block changes the dynamic table (a literal with incremental
    indexing, or a size update)."""
    pos = 0
    end = len(block)
    i = 0
    huffman: list[tuple[int, int, int]] = []
    changes = False
    while pos < end:
        b = block[pos]
        if b & 0x80:  # indexed field
            _, pos = _hpack_int(block, pos, 7)
            i += 1
            continue
        if b & 0xE0 == 0x20:  # dynamic table size update
            if i:
                raise _BadBlock("dynamic table size update after a header field")
            _, pos = _hpack_int(block, pos, 5)
            changes = True
            continue
        if b & 0x40:
            changes = True
        index, pos = _hpack_int(block, pos, 6 if b & 0x40 else 4)
        if not index:
            if pos < end and block[pos] & 0x80:
                huffman.append((i, 0, pos))
            pos = _skip_string(block, pos)
        if pos < end and block[pos] & 0x80:
            huffman.append((i, 1, pos))
        pos = _skip_string(block, pos)
        i += 1
    return i, huffman, changes


def _check_huffman(n: int, huffman: list[tuple[int, int, int]], block: bytes, fields: _Raw) -> None:
    """What jh2's native decoder lets through and RFC 7541 forbids, in a block it decoded
    into ``fields`` (``n`` and ``huffman`` from ``_walk_block``): Huffman padding that is
    not the EOS code's first bits, or longer than 7 bits (5.2)."""
    if n != len(fields):
        raise _BadBlock("header block and decoded fields disagree")
    for i, which, pos in huffman:
        _hpack_string(block, pos, fields[i][which])


def _window_due(done: int, win: int, mx: int) -> int | None:
    """One receive window (connection or stream; ``mx`` its full size, ``win`` what is
    left, ``done`` consumed bytes not yet given back): None to keep counting, else
    the WINDOW_UPDATE increment to send now (<= 0: none). Due once half the window
    is consumed, or sooner when the window is exhausted."""
    if done >= mx >> 1 or (win <= 0 and done > min(1024, mx >> 2)):
        return min(done, mx - win)
    return None


class _ConnectionError(Exception):
    """A connection error found while reading frames: GOAWAY(code) and the connection ends."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = ("queue", "queued", "end_pending", "unacked", "trailers", "local_done", "remote_done",
                 "responded", "blocked", "send_win", "recv_win", "recv_done", "length", "received", "head_only")

    def __init__(self, send_win: int, recv_win: int) -> None:
        self.queue: deque[memoryview] | None = None  # outbound data waiting for window
        self.queued = 0
        self.end_pending: list[tuple[str, str]] | None = None  # trailers (maybe []) to send after the queue
        self.unacked = 0  # inbound bytes handed out in Data events, not acked yet
        self.trailers: HeaderList = []
        self.local_done = False  # we sent END_STREAM
        self.remote_done = False  # the peer sent END_STREAM
        self.responded = False  # server: a final response head went out; client: one came in
        self.blocked = False
        self.send_win = send_win  # what the peer lets us send on this stream (may go negative)
        self.recv_win = recv_win  # what we let the peer send on this stream
        self.recv_done = 0  # acked bytes not yet given back in a WINDOW_UPDATE
        self.length = -1  # the peer's content-length, -1 if none
        self.received = 0  # body bytes the peer sent
        self.head_only = False  # client: a HEAD request (the response has no body whatever its length)


# ---------------------------------------------------------------- common
class _Endpoint:
    _client_side = False
    _status_bad = 400
    _who = "client"

    def __init__(self, limits: H2Limits, now: Callable[[], float] | None) -> None:
        self._limits = limits
        self._now = now or time.monotonic
        self._enc = _HpackEncoder()
        dec = _Decoder()
        dec.max_allowed_table_size = 4096  # what we advertise (SETTINGS_HEADER_TABLE_SIZE)
        # HPACK aborts (fatally) only far above the limit; the limit itself is stream-level
        dec.max_header_list_size = 2 * limits.max_header_list_size
        self._dec = dec
        self._dec_cache: dict[bytes, _Decoded] = {}  # blocks that do not change the HPACK table
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._gone: dict[int, int] = {}  # closed stream -> _GONE_IGNORE / _GONE_CLOSED
        self._gone_ring: list[int] = []  # the ids in _gone, oldest at _gone_at once it is full
        self._gone_at = 0
        self._buf = bytearray()  # bytes pending for the peer
        self._inbuf = b""  # an incomplete frame (or preface) from the peer
        self._initiated = False
        self._preface = not self._client_side  # (server) the client preface is still to come
        self._settings_seen = False  # the peer's first frame must be SETTINGS
        self._error: ProtocolError | None = None
        self._closed = False  # GOAWAY sent non-gracefully or connection gone
        self._drain_last: int | None = None  # our graceful GOAWAY's last-stream-id
        self._peer_last: int | None = None  # the peer's GOAWAY last-stream-id
        self._peer_highest = 0  # highest stream id the peer opened
        self._my_highest = 0  # highest stream id we opened
        # header block being read (HEADERS without END_HEADERS, then CONTINUATION)
        self._hb_sid = 0
        self._hb_end_stream = False
        self._hb_parts: list[bytes] = []
        self._hb_size = 0
        self._hb_frames = 0
        self._hb_self_dep = False  # its HEADERS made the stream depend on itself
        # flow control: what the peer sent us and what we may send it
        self._peer_initial_window = 65535
        self._peer_max_frame = 16384
        self._peer_max_streams = _MAX_WINDOW  # unbounded until its SETTINGS say otherwise
        self._send_win = _CONN_WINDOW_DEFAULT
        self._recv_win = _CONN_WINDOW_DEFAULT  # raised by our first WINDOW_UPDATE (initiate)
        self._recv_done = 0
        self._ctl = 0  # control frames queued since bytes were last handed out
        self._resets: deque[float] = deque()
        self._empty = 0  # consecutive empty DATA frames without END_STREAM
        # frame budgets (H2Limits.max_inbound_*): what the peer sent, what earns it more
        self._idle_frames = 0  # PRIORITY and unknown frames
        self._window_updates = 0
        self._data_frames_sent = 0
        self._heads = 0  # streams the peer opened (server) or answered (client)
        self._ctl_in = 0  # PING/SETTINGS in the current control window
        self._ctl_since = -1.0
        self._ctl_data = 0  # _data_frames_sent when the last PING/SETTINGS came (see _control_frame)
        self.refused_streams = 0  # streams refused with REFUSED_STREAM (for stats)

    # ------------------------------------------------------------ output
    def initiate(self) -> bytes:
        """Our connection preface (client magic for H2Client) and SETTINGS."""
        self._initiate()
        return self._out()

    def _initiate(self) -> None:
        if self._initiated:
            return
        self._initiated = True
        lim = self._limits
        settings = [
            (_S_HEADER_TABLE_SIZE, 4096),  # RFC 9113's default
            (_S_MAX_CONCURRENT_STREAMS, lim.max_concurrent_streams),
            (_S_INITIAL_WINDOW_SIZE, lim.initial_window_size),
            (_S_MAX_FRAME_SIZE, lim.max_frame_size),
            (_S_MAX_HEADER_LIST_SIZE, lim.max_header_list_size),
        ]
        if self._client_side:
            settings.insert(1, (_S_ENABLE_PUSH, 0))
        out = self._buf
        if self._client_side:
            out += _PREFACE
        out += _pack_head(6 * len(settings) << 8 | _SETTINGS, 0, 0)
        for ident, value in settings:
            out += _SETTING.pack(ident, value)
        extra = lim.connection_window - _CONN_WINDOW_DEFAULT
        if extra > 0:
            out += _pack_head(4 << 8 | _WINDOW_UPDATE, 0, 0)
            out += _U32.pack(extra)
            self._recv_win += extra

    def data_to_send(self) -> bytes:
        """Everything pending: call after ``feed`` (also after a ProtocolError: the GOAWAY)."""
        return self._out()

    def _out(self) -> bytes:
        self._ctl = 0
        buf = self._buf
        if not buf:
            return b""
        data = bytes(buf)
        buf.clear()
        return data

    def _send_headers(self, sid: int, fields: list[_Field], end_stream: bool) -> None:
        block = self._enc.encode(fields)
        n = len(block)
        mx = self._peer_max_frame
        out = self._buf
        flags = _END_STREAM if end_stream else 0
        if n <= mx:
            out += _pack_head(n << 8 | _HEADERS, flags | _END_HEADERS, sid)
            out += block
            return
        out += _pack_head(mx << 8 | _HEADERS, flags, sid)
        out += block[:mx]
        pos = mx
        while pos < n:
            chunk = block[pos:pos + mx]
            pos += mx
            out += _pack_head(len(chunk) << 8 | _CONTINUATION, _END_HEADERS if pos >= n else 0, sid)
            out += chunk

    def _send_data(self, sid: int, st: _Stream, data: bytes | memoryview, end_stream: bool) -> None:
        """One DATA frame; the caller checked the windows and the frame size."""
        n = len(data)
        self._buf += _pack_head(n << 8 | _DATA, _END_STREAM if end_stream else 0, sid)
        self._buf += data
        self._send_win -= n
        st.send_win -= n
        self._data_frames_sent += 1

    def _send_rst(self, sid: int, code: int) -> None:
        self._buf += _RST_HEAD
        self._buf += _U32.pack(sid)
        self._buf += _U32.pack(code)

    def _send_goaway(self, last: int, code: int, debug: bytes = b"") -> None:
        self._buf += _pack_head((8 + len(debug)) << 8 | _GOAWAY, 0, 0)
        self._buf += _GOAWAY_HEAD.pack(last, code)
        self._buf += debug

    # ------------------------------------------------------------ input
    def feed(self, data: bytes) -> list[H2Event]:
        """Bytes from the peer -> events. Raises ProtocolError if the connection must close."""
        if self._error is not None:
            raise self._error
        if self._closed or not data:
            return []
        if not self._initiated:
            self._initiate()
        events: list[H2Event] = []
        try:
            flush = self._read_frames(data, events)
        except _ConnectionError as exc:
            calm = exc.code == ENHANCE_YOUR_CALM
            if calm:  # a flood: what it queued is not sent
                self._buf.clear()
            self._fail(f"{exc} from the {self._who}" if calm else
                       f"HTTP/2 protocol error from the {self._who}: {exc}", exc.code, exc)
        if self._ctl > self._limits.max_queued_control_frames:
            self._buf.clear()
            self._fail(
                f"control frame flood from the {self._who}: more than "
                f"{self._limits.max_queued_control_frames} PING/SETTINGS ACKs or RST_STREAMs queued",
                ENHANCE_YOUR_CALM,
            )
        if flush and self._blocked:
            for sid, st in list(self._blocked.items()):
                self._flush(sid, st)
                if sid not in self._blocked:  # the queue ran out and the stream finished
                    continue
                if not st.queue and self._window(st) > 0:
                    st.blocked = False
                    del self._blocked[sid]
                    events.append(WindowUpdated(sid))
        return events

    def _read_frames(self, data: bytes, events: list[H2Event]) -> bool:
        """Handle every complete frame in the input; True if a window grew."""
        if self._inbuf:
            data = self._inbuf + data
            self._inbuf = b""
        pos = 0
        end = len(data)
        if self._preface:
            n = min(end, 24)
            if data[:n] != _PREFACE[:n]:
                raise _ConnectionError(PROTOCOL_ERROR, "invalid connection preface")
            if n < 24:
                self._inbuf = data
                return False
            self._preface = False
            pos = 24
        flush = False
        max_frame = self._limits.max_frame_size
        streams = self._streams
        while end - pos >= 9:
            lt, flags, sid = _unpack_head(data, pos)
            length = lt >> 8
            if length > max_frame:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes is over SETTINGS_MAX_FRAME_SIZE")
            if end - pos - 9 < length:
                break
            ftype = lt & 0xFF
            sid &= 0x7FFFFFFF
            start = pos + 9
            pos = start + length
            if self._hb_sid and ftype != _CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, f"frame of type {ftype} inside a header block")
            if not self._settings_seen:
                if ftype != _SETTINGS or flags & _ACK:
                    raise _ConnectionError(PROTOCOL_ERROR, "the first frame is not SETTINGS")
                self._settings_seen = True
            if ftype == _DATA:
                st = streams.get(sid)
                if st is not None and not st.remote_done and (st.responded or not self._client_side):
                    # the common case, inline: an open stream, no padding
                    if not flags & _PADDED and length <= self._recv_win and length <= st.recv_win:
                        self._recv_win -= length
                        st.recv_win -= length
                        if length:
                            self._empty = 0
                            st.received += length
                            if 0 <= st.length < st.received:
                                self._too_long(sid, st, length, events)
                                continue
                            st.unacked += length
                            events.append(Data(data[start:pos], sid))
                        elif not flags & _END_STREAM:
                            self._empty_frame()
                        if flags & _END_STREAM:
                            self._remote_end(sid, st, events)
                        continue
                self._on_data(sid, flags, data[start:pos], st, events)
            elif ftype == _HEADERS:
                self._on_headers(sid, flags, data[start:pos], events)
            elif ftype == _WINDOW_UPDATE:
                flush = self._on_window_update(sid, data[start:pos], events) or flush
            elif ftype == _SETTINGS:
                flush = self._on_settings(sid, flags, data[start:pos]) or flush
            elif ftype == _PING:
                if sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"PING of {length} bytes")
                self._control_frame("PING")
                if not flags & _ACK:
                    self._buf += _PING_ACK_HEAD
                    self._buf += data[start:pos]
                    self._ctl += 1
            elif ftype == _RST_STREAM:
                self._on_rst(sid, data[start:pos], events)
            elif ftype == _GOAWAY:
                if sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"GOAWAY of {length} bytes")
                last, code = _GOAWAY_HEAD.unpack_from(data, start)
                self._on_goaway(last & 0x7FFFFFFF, code, data[start + 8:pos], events)
            elif ftype == _CONTINUATION:
                self._on_continuation(sid, flags, data[start:pos], events)
            elif ftype == _PRIORITY:
                if not sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                self._idle_frame("PRIORITY")
                if length != 5:
                    self._stream_error(sid, streams.get(sid), FRAME_SIZE_ERROR, events,
                                       f"PRIORITY of {length} bytes")
                elif _U32.unpack_from(data, start)[0] & 0x7FFFFFFF == sid:
                    self._stream_error(sid, streams.get(sid), PROTOCOL_ERROR, events, "stream depends on itself")
            elif ftype == _PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
            else:  # unknown and extension frames are ignored (RFC 9113 5.5)
                self._idle_frame("unknown-type")
        if pos < end:
            self._inbuf = data[pos:]
        return flush

    # -- frame handlers
    def _idle(self, sid: int) -> bool:
        """No frame but HEADERS (or PRIORITY) opened this stream yet."""
        if (sid & 1) != self._client_side:  # the peer's parity: odd for a client, even for a server
            return sid > self._peer_highest
        return sid > self._my_highest

    def _empty_frame(self) -> None:
        self._empty += 1
        if self._empty > self._limits.max_consecutive_empty_frames:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"empty DATA frame flood: more than "
                                   f"{self._limits.max_consecutive_empty_frames} in a row")

    def _on_data(self, sid: int, flags: int, payload: bytes, st: _Stream | None, events: list[H2Event]) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        body = payload
        if flags & _PADDED:
            if not size or payload[0] >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA padding as long as the frame")
            body = payload[1:size - payload[0]]
        if size > self._recv_win:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA past the connection window")
        self._recv_win -= size
        if st is None or st.remote_done:
            self._ack_connection(size)
            if st is None and self._idle(sid):
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if st is not None or self._gone.get(sid, _GONE_CLOSED) == _GONE_CLOSED:
                self._stream_error(sid, st, STREAM_CLOSED, events, "DATA after the end of the stream")
            return
        if not st.responded and self._client_side:
            raise _ConnectionError(PROTOCOL_ERROR, f"DATA before the response head on stream {sid}")
        if size > st.recv_win:
            raise _ConnectionError(FLOW_CONTROL_ERROR, f"DATA past the window of stream {sid}")
        st.recv_win -= size
        n = len(body)
        if size > n:  # padding: nobody downstream will ack it
            self._ack(sid, st, size - n)
        if n:
            self._empty = 0
            st.received += n
            if 0 <= st.length < st.received:
                self._too_long(sid, st, n, events)
                return
            st.unacked += n
            events.append(Data(body, sid))
        elif not flags & _END_STREAM:
            self._empty_frame()
        if flags & _END_STREAM:
            self._remote_end(sid, st, events)

    def _too_long(self, sid: int, st: _Stream, n: int, events: list[H2Event]) -> None:
        """More body than the content-length said: the frame is not passed on (its bytes are acked)."""
        self._ack_connection(n)
        self._stream_error(sid, st, PROTOCOL_ERROR, events, f"more body than its content-length ({st.length})")

    def _remote_end(self, sid: int, st: _Stream, events: list[H2Event]) -> None:
        if st.length >= 0 and st.received != st.length and not st.head_only:
            self._stream_error(sid, st, PROTOCOL_ERROR, events,
                               f"a body of {st.received} bytes with content-length {st.length}")
            return
        st.remote_done = True
        events.append(EndOfMessage(st.trailers, sid))
        if st.local_done:
            self._forget(sid, st, _GONE_CLOSED)

    def _on_headers(self, sid: int, flags: int, payload: bytes, events: list[H2Event]) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not end or payload[0] >= end:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding as long as the frame")
            end -= payload[0]
            start = 1
        depends_on_itself = False
        if flags & _PRIORITY_FLAG:
            if end - start < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            depends_on_itself = _U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == sid
            start += 5
        block = payload[start:end] if start or end != len(payload) else payload
        if not flags & _END_HEADERS:
            self._hb_sid = sid
            self._hb_end_stream = bool(flags & _END_STREAM)
            self._hb_parts = [block]
            self._hb_size = len(block)
            self._hb_frames = 0
            self._hb_self_dep = depends_on_itself
            return
        self._on_header_block(sid, bool(flags & _END_STREAM), block, depends_on_itself, events)

    def _on_continuation(self, sid: int, flags: int, payload: bytes, events: list[H2Event]) -> None:
        if not self._hb_sid or sid != self._hb_sid:
            raise _ConnectionError(PROTOCOL_ERROR, f"CONTINUATION on stream {sid} out of a header block")
        self._hb_frames += 1
        if self._hb_frames > self._limits.max_continuation_frames:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"CONTINUATION flood: more than "
                                   f"{self._limits.max_continuation_frames} CONTINUATION frames in one header block")
        self._hb_size += len(payload)
        if self._hb_size > 2 * self._limits.max_header_list_size:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"oversized header block ({self._hb_size} bytes coded)")
        self._hb_parts.append(payload)
        if flags & _END_HEADERS:
            block = b"".join(self._hb_parts)
            self._hb_sid = 0
            self._hb_parts = []
            self._on_header_block(sid, self._hb_end_stream, block, self._hb_self_dep, events)

    def _decode(self, block: bytes) -> _Raw:
        """The fields of a header block (never changed by the caller: it may be a list
        handed out before). A block that leaves the dynamic table as it is decodes to
        what it decoded to last time, until a block changes the table: such blocks
        (a peer's steady state, where every field is indexed) come from ``_dec_cache``
        without the native decoder, and their field names are the same bytes objects
        each time, whose hashes are kept (``_decode_fields`` looks every name up)."""
        cache = self._dec_cache
        hit = cache.get(block)
        if hit is not None:
            return hit.raw
        # one exception name per clause below: compiled by mypyc, a name shared by the
        # clauses gets the first clause's type (_BadBlock) and the others fail a type check
        try:
            n, huffman, changes = _walk_block(block)
            fields: _Raw = self._dec.decode(block, raw=True)
            if not self._client_side:  # untrusted clients: RFC 7541's rules the native decoder skips
                _check_huffman(n, huffman, block, fields)
            if changes:
                if cache:
                    cache.clear()
            elif len(block) <= _DEC_CACHE_BLOCK_MAX:
                if len(cache) >= _DEC_CACHE_MAX:
                    cache.clear()
                cache[block] = _Decoded(fields)
        except _BadBlock as bad:
            raise _ConnectionError(COMPRESSION_ERROR, f"error decoding header block: {bad}") from bad
        except (_NativeOversized, _PureOversized) as oversized:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"oversized header block: {oversized}") from oversized
        except (_NativeHPACKError, _PureHPACKError, IndexError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"error decoding header block: {exc}") from exc
        except BaseException as panic:
            # jh2's native decoder panics on some malformed blocks (an index into an empty
            # buffer); pyo3 raises that as PanicException, a BaseException: a peer's bytes
            # must not get past the codec's ProtocolError
            if type(panic).__name__ != "PanicException":
                raise
            raise _ConnectionError(COMPRESSION_ERROR, f"error decoding header block: {panic}") from panic
        return fields

    def _on_header_block(self, sid: int, end_stream: bool, block: bytes, self_dep: bool,
                         events: list[H2Event]) -> None:
        st = self._streams.get(sid)
        if st is None:
            if self._client_side:
                if not sid & 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}, which a server may not open")
                if sid > self._my_highest:
                    raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
                gone = self._gone.get(sid, _GONE_IGNORE)
            else:
                if not sid & 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}, which a client may not open")
                gone = self._gone.get(sid, -1) if sid <= self._peer_highest else -2
                if gone == -1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"stream {sid} opened after stream {self._peer_highest}")
            if gone >= 0:  # a stream that is gone
                self._decode(block)  # keeps the HPACK table in step
                if gone == _GONE_CLOSED:  # RFC 9113 5.1: a connection error on a closed stream
                    raise _ConnectionError(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
                return
            self._peer_highest = sid
            if self._drain_last is not None and sid > self._drain_last:
                self._refuse(sid, block, premature=False)
                return
            if len(self._streams) >= self._limits.max_concurrent_streams:
                self._refuse(sid, block, premature=True)
                return
            raw = self._decode(block)
            self._heads += 1
            if self_dep:
                self._stream_error(sid, None, PROTOCOL_ERROR, events, "stream depends on itself")
                return
            self._on_request(sid, block, raw, end_stream, events)
            return
        raw = self._decode(block)
        if st.remote_done:
            self._stream_error(sid, st, STREAM_CLOSED, events, "HEADERS after the end of the stream")
            return
        if self_dep:
            self._stream_error(sid, st, PROTOCOL_ERROR, events, "stream depends on itself")
            return
        if self._client_side and not st.responded:
            self._heads += 1
            self._on_response(sid, st, block, raw, end_stream, events)
            return
        # trailers
        if not end_stream:
            self._malformed(sid, "trailers without END_STREAM")
        _, fields, problem, _ = self._fields_of(block, raw, sid, _TRAILERS)
        if problem:
            self._kill(sid, st, CANCEL)
            events.append(H2Reset(f"trailers from the {self._who} refused: {problem}", sid))
            return
        st.trailers = fields
        self._remote_end(sid, st, events)

    def _refuse(self, sid: int, block: bytes, *, premature: bool) -> None:
        """A new stream we do not take: RST_STREAM(REFUSED_STREAM)."""
        self._decode(block)  # decode anyway: the HPACK table must stay in step with the peer's
        self._send_rst(sid, REFUSED_STREAM)
        self._remember(sid, _GONE_IGNORE)
        self._ctl += 1
        self.refused_streams += 1
        if premature:
            # opening streams past the advertised limit is abuse too: it counts as a
            # premature reset (a client that had not seen our SETTINGS yet stays far below)
            self._count_premature_reset()

    def _on_window_update(self, sid: int, payload: bytes, events: list[H2Event]) -> bool:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
        self._window_updates += 1
        lim = self._limits.max_inbound_window_update_frames_per_data_frame_sent
        if self._window_updates > lim * (1 + self._data_frames_sent):
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"WINDOW_UPDATE flood: {self._window_updates} WINDOW_UPDATE "
                                   f"frames for {self._data_frames_sent} DATA frames sent (limit {lim} per DATA frame)")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_win += inc
            if self._send_win > _MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            return True
        st = self._streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise _ConnectionError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return False
        if not inc:
            self._stream_error(sid, st, PROTOCOL_ERROR, events, "WINDOW_UPDATE of 0")
            return False
        st.send_win += inc
        if st.send_win > _MAX_WINDOW:
            self._stream_error(sid, st, FLOW_CONTROL_ERROR, events, "stream window over 2^31-1")
            return False
        return st.blocked

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> bool:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        size = len(payload)
        if flags & _ACK:
            if size:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._control_frame("SETTINGS")
            return False
        if size % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"SETTINGS of {size} bytes")
        self._control_frame("SETTINGS")
        grew = False
        for off in range(0, size, 6):
            ident, value = _SETTING.unpack_from(payload, off)
            if ident == _S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                if delta:
                    for st in self._streams.values():
                        st.send_win += delta
                        if st.send_win > _MAX_WINDOW:
                            raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                    grew = grew or delta > 0
            elif ident == _S_MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
            elif ident == _S_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif ident == _S_HEADER_TABLE_SIZE:
                self._enc.header_table_size = value
            elif ident == _S_ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            # others (MAX_HEADER_LIST_SIZE is advisory, unknown ones) are ignored
        self._buf += _SETTINGS_ACK
        self._ctl += 1
        return grew

    def _on_rst(self, sid: int, payload: bytes, events: list[H2Event]) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
        st = self._streams.pop(sid, None)
        if st is None:
            if self._idle(sid):
                raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        self._drop(sid, st)
        self._remember(sid, _GONE_CLOSED)
        code = _U32.unpack(payload)[0]
        events.append(H2Reset(f"the {self._who} reset the stream ({_code_name(code)})", sid, code))
        if not self._client_side and not st.responded:
            self._count_premature_reset()

    def _on_goaway(self, last: int, code: int, debug: bytes, events: list[H2Event]) -> None:
        self._peer_last = last if self._peer_last is None else min(last, self._peer_last)
        events.append(GoAway(last, code, debug))
        mine = 1 if self._client_side else 0
        for sid in [s for s in self._streams if s > last and s % 2 == mine]:
            st = self._streams.pop(sid)
            self._drop(sid, st)
            self._remember(sid, _GONE_IGNORE)
            events.append(H2Reset(f"the {self._who} sent GOAWAY before processing the stream", sid, REFUSED_STREAM))

    def _idle_frame(self, what: str) -> None:
        self._idle_frames += 1
        lim = self._limits.max_inbound_priority_frames_per_stream
        opened = self._heads + len(self._streams)
        if self._idle_frames > lim * (1 + opened):
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"{what} frame flood: {self._idle_frames} PRIORITY/unknown "
                                   f"frames for {opened} streams (limit {lim} per stream)")

    def _control_frame(self, what: str) -> None:
        # A PING or SETTINGS after DATA we sent since the last one is not counted: a
        # receiver measuring its bandwidth (grpc-go's BDP estimator) pings once per DATA
        # frame it gets while no ping is outstanding, so a busy gRPC connection brings a
        # ping per call, over 1,000 a second; like WINDOW_UPDATEs, these are paid for by
        # DATA frames we sent. Only the others count against the window's budget.
        if self._data_frames_sent != self._ctl_data:
            self._ctl_data = self._data_frames_sent
            return
        now = self._now()
        lim = self._limits
        if now - self._ctl_since > lim.control_frame_window:
            self._ctl_since = now
            self._ctl_in = 0
        self._ctl_in += 1
        if self._ctl_in > lim.max_inbound_control_frames_per_window:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"{what} flood: more than "
                                   f"{lim.max_inbound_control_frames_per_window} PING/SETTINGS frames "
                                   f"within {lim.control_frame_window:g}s")

    def feed_eof(self) -> list[H2Event]:
        """The peer closed the connection: an H2Reset for every stream still open."""
        self._closed = True
        events: list[H2Event] = [
            H2Reset(f"the {self._who} closed the connection with the stream open", sid)
            for sid in self._streams
        ]
        self._streams.clear()
        self._blocked.clear()
        return events

    def _fail(self, message: str, code: int, cause: BaseException | None = None) -> None:
        debug = message.encode("ascii", "replace")[:200] if code == ENHANCE_YOUR_CALM else b""
        self._send_goaway(self._peer_highest, code, debug)
        err = ProtocolError(message, self._status_bad)
        err.__cause__ = cause
        self._error = err
        self._closed = True
        raise err

    def _stream_error(self, sid: int, st: _Stream | None, code: int, events: list[H2Event], why: str) -> None:
        """RST_STREAM(code); an H2Reset event if the stream was open."""
        self._send_rst(sid, code)
        self._ctl += 1
        if st is not None and self._streams.pop(sid, None) is not None:
            self._drop(sid, st)
            events.append(H2Reset(f"stream error from the {self._who}: {why} ({_code_name(code)})", sid, code))
        self._remember(sid, _GONE_IGNORE)

    def _fields_of(self, block: bytes, raw: _Raw, sid: int,
                   kind: int) -> tuple[dict[bytes, bytes], HeaderList, str, int]:
        """``_decode_fields(raw, sid, kind)``, kept with ``block`` when the block is kept
        decoded (``_decode``): checking and converting a repeated block's fields is done
        once, and each call gets its own copy of the list."""
        e = self._dec_cache.get(block)
        if e is not None and e.raw is raw and e.kind == kind:
            return e.pseudo, list(e.fields), e.problem, e.length
        pseudo, fields, problem, length = self._decode_fields(raw, sid, kind)
        if e is not None and e.raw is raw:
            e.kind = kind
            e.pseudo = pseudo
            e.fields = list(fields)
            e.problem = problem
            e.length = length
        return pseudo, fields, problem, length

    def _decode_fields(self, raw: _Raw, sid: int,
                       kind: int) -> tuple[dict[bytes, bytes], HeaderList, str, int]:
        """(pseudo-headers, regular fields, problem or "", content-length or -1) with the
        limits applied. A malformed block (RFC 9113 8.2-8.3) fails the connection."""
        pseudo: dict[bytes, bytes] = {}
        fields: HeaderList = []
        size = 0
        host: bytes | None = None
        length = -1
        checked = _CHECKED_NAMES
        for f in raw:
            n = f[0]
            v = f[1]
            size += len(n) + len(v) + 32
            if v and (_ws(v[0]) or _ws(v[-1])):
                self._malformed(sid, f"whitespace around the value of header {n!r}: {v!r}")
            name = checked.get(n)
            if name is not None:
                fields.append((name, v.decode("latin-1")))
                continue
            if not n:
                self._malformed(sid, "empty header name")
            if _ws(n[0]) or _ws(n[-1]):
                self._malformed(sid, f"whitespace around header name {n!r}")
            if n[0] == 58:  # b":"
                if fields:
                    self._malformed(sid, f"pseudo-header {n!r} after a regular field")
                if n not in _PSEUDO_ALLOWED:
                    self._malformed(sid, f"unknown pseudo-header {n!r}")
                if n in pseudo:
                    self._malformed(sid, f"duplicate pseudo-header {n!r}")
                pseudo[n] = v
                continue
            if _UPPER.search(n) is not None:
                self._malformed(sid, f"uppercase header name {n!r}")
            if n in _CONNECTION_FIELDS:
                self._malformed(sid, f"connection-specific header {n!r}")
            if n == b"te":
                if v.lower() != b"trailers":
                    self._malformed(sid, f"te: {v!r} (only trailers is allowed)")
            elif n == b"host":
                host = v
            elif n == b"content-length":  # not cached: its value is checked every time
                if not v.isdigit() or (length >= 0 and int(v) != length):
                    self._malformed(sid, f"content-length: {v!r}")
                length = int(v)
            else:
                name = n.decode("latin-1")
                if len(checked) < _CHECKED_NAMES_MAX:
                    checked[n] = name
                fields.append((name, v.decode("latin-1")))
                continue
            fields.append((n.decode("latin-1"), v.decode("latin-1")))
        problem = _malformed_block(pseudo, host, kind)
        if problem:
            self._malformed(sid, problem)
        lim = self._limits
        if size > lim.max_header_list_size:
            return pseudo, fields, f"header list of {size} bytes is over the limit of {lim.max_header_list_size}", length
        if len(fields) > lim.max_headers:
            return pseudo, fields, f"{len(fields)} header fields is over the limit of {lim.max_headers}", length
        return pseudo, fields, "", length

    def _malformed(self, sid: int, problem: str) -> None:
        """A malformed header block: connection error (GOAWAY PROTOCOL_ERROR)."""
        raise _ConnectionError(PROTOCOL_ERROR, f"malformed header block on stream {sid}: {problem}")

    def _count_premature_reset(self) -> None:
        lim = self._limits
        now = self._now()
        q = self._resets
        q.append(now)
        cutoff = now - lim.rapid_reset_window
        while q and q[0] < cutoff:
            q.popleft()
        if len(q) > lim.rapid_reset_threshold:
            raise _ConnectionError(
                ENHANCE_YOUR_CALM,
                f"rapid reset (CVE-2023-44487): the client reset {len(q)} streams before a response "
                f"within {lim.rapid_reset_window:g}s (limit {lim.rapid_reset_threshold})",
            )

    def _on_request(self, sid: int, block: bytes, raw: _Raw, end_stream: bool, events: list[H2Event]) -> None:
        raise NotImplementedError

    def _on_response(self, sid: int, st: _Stream, block: bytes, raw: _Raw, end_stream: bool,
                     events: list[H2Event]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ bookkeeping
    def _new_stream(self) -> _Stream:
        return _Stream(self._peer_initial_window, self._limits.initial_window_size)

    def _ack_connection(self, n: int) -> None:
        """Give ``n`` consumed bytes back to the connection window (WINDOW_UPDATE once half is used)."""
        done = self._recv_done + n
        inc = _window_due(done, self._recv_win, self._limits.connection_window)
        if inc is None:
            self._recv_done = done
            return
        self._recv_done = 0
        if inc > 0:
            self._recv_win += inc
            self._buf += _pack_head(4 << 8 | _WINDOW_UPDATE, 0, 0)
            self._buf += _U32.pack(inc)

    def _ack(self, sid: int, st: _Stream, n: int) -> None:
        """Give ``n`` consumed bytes back to the stream's and the connection's windows."""
        self._ack_connection(n)
        if st.remote_done:
            return
        done = st.recv_done + n
        inc = _window_due(done, st.recv_win, self._limits.initial_window_size)
        if inc is None:
            st.recv_done = done
            return
        st.recv_done = 0
        if inc > 0:
            st.recv_win += inc
            self._buf += _pack_head(4 << 8 | _WINDOW_UPDATE, 0, sid)
            self._buf += _U32.pack(inc)

    def _remember(self, sid: int, how: int) -> None:
        gone = self._gone
        if sid in gone:
            gone[sid] = how
            return
        gone[sid] = how
        ring = self._gone_ring
        if len(ring) < _GONE_MAX:
            ring.append(sid)
            return
        at = self._gone_at  # the oldest: forgotten (a ring of ids, not next(iter(dict)): compiled,
        del gone[ring[at]]  # that is a generic call, made for every stream once the dict is full)
        ring[at] = sid
        self._gone_at = at + 1 if at + 1 < _GONE_MAX else 0

    def _drop(self, sid: int, st: _Stream) -> None:
        """A stream is gone: give back its unacked window, forget its queue."""
        if st.unacked:
            self._ack_connection(st.unacked)
            st.unacked = 0
        st.queue = None
        st.queued = 0
        if st.blocked:
            st.blocked = False
            self._blocked.pop(sid, None)

    def _forget(self, sid: int, st: _Stream, how: int) -> None:
        self._streams.pop(sid, None)
        self._remember(sid, how)
        self._drop(sid, st)

    def _kill(self, sid: int, st: _Stream, code: int) -> None:
        self._forget(sid, st, _GONE_IGNORE)
        self._send_rst(sid, code)

    def _local_end(self, sid: int, st: _Stream) -> None:
        st.local_done = True
        if st.remote_done:
            self._forget(sid, st, _GONE_CLOSED)
        elif not self._client_side and st.responded:
            # complete response, request still open: tell the client to stop (RFC 9113 8.1)
            self._kill(sid, st, NO_ERROR)

    def _window(self, st: _Stream) -> int:
        w = self._send_win
        return st.send_win if st.send_win < w else w

    def _send_end(self, sid: int, st: _Stream, trailers: HeaderList) -> None:
        if trailers:
            self._send_headers(sid, _encode_fields([], trailers), True)
        else:
            self._send_data(sid, st, b"", True)
        self._local_end(sid, st)

    def _flush(self, sid: int, st: _Stream) -> None:
        """Send queued data as far as the windows allow, then a queued end."""
        q = st.queue
        while q:
            win = self._window(st)
            if win <= 0:
                return
            take = min(win, self._peer_max_frame)
            chunk = q[0]
            if len(chunk) <= take:
                q.popleft()
                st.queued -= len(chunk)
                if not q and st.end_pending is not None and not st.end_pending:
                    st.end_pending = None
                    self._send_data(sid, st, chunk, True)
                    self._local_end(sid, st)
                    return
                self._send_data(sid, st, chunk, False)
            else:
                self._send_data(sid, st, chunk[:take], False)
                q[0] = chunk[take:]
                st.queued -= take
        if st.end_pending is not None:
            trailers, st.end_pending = st.end_pending, None
            self._send_end(sid, st, trailers)

    # ------------------------------------------------------------ public, both sides
    def data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bytes:
        """Send body bytes: what the windows allow now, the rest queued in order."""
        st = self._streams.get(stream_id)
        if st is None or self._closed:
            return self._out()
        if st.local_done or st.end_pending is not None:
            raise RuntimeError(f"stream {stream_id}: data() after the body was ended")
        n = len(data)
        if st.queue:
            if n:
                st.queue.append(memoryview(data))
                st.queued += n
            if end_stream:
                st.end_pending = []
            return self._out()
        if n <= self._peer_max_frame and n <= self._window(st):
            if n or end_stream:
                self._send_data(stream_id, st, data, end_stream)
                if end_stream:
                    self._local_end(stream_id, st)
        else:
            st.queue = deque((memoryview(data),))
            st.queued = n
            if end_stream:
                st.end_pending = []
            self._flush(stream_id, st)
        if (st.queue or self._window(st) <= 0) and not st.local_done and stream_id in self._streams:
            if not st.blocked:
                st.blocked = True
                self._blocked[stream_id] = st
        return self._out()

    def end(self, stream_id: int, trailers: Iterable[tuple[str, str]] = ()) -> bytes:
        """End the body (with trailers, as a HEADERS frame with END_STREAM)."""
        st = self._streams.get(stream_id)
        if st is None or self._closed:
            return self._out()
        if st.local_done or st.end_pending is not None:
            raise RuntimeError(f"stream {stream_id}: end() called twice")
        if st.queue:
            st.end_pending = list(trailers)
        else:
            self._send_end(stream_id, st, list(trailers))
        return self._out()

    def reset(self, stream_id: int, reason: str = "", *, error_code: int = CANCEL) -> bytes:
        """Abandon a stream (RST_STREAM, CANCEL by default). ``reason`` is for the caller's logs."""
        st = self._streams.get(stream_id)
        if st is not None and not self._closed:
            self._kill(stream_id, st, int(error_code))
        return self._out()

    def ack_received(self, stream_id: int, n: int) -> bytes:
        """The caller consumed ``n`` bytes of Data from this stream: reopen the windows."""
        st = self._streams.get(stream_id)
        if st is not None and n > 0 and not self._closed:
            n = min(n, st.unacked)
            if n:
                st.unacked -= n
                self._ack(stream_id, st, n)
        return self._out()

    def send_window(self, stream_id: int) -> int:
        """How many body bytes this stream can take now without queueing."""
        st = self._streams.get(stream_id)
        if st is None or self._closed or st.local_done:
            return 0
        return max(0, self._window(st) - st.queued)

    def queued(self, stream_id: int) -> int:
        """Body bytes of this stream waiting in the codec for window."""
        st = self._streams.get(stream_id)
        return st.queued if st is not None else 0

    def goaway(self, *, graceful: bool = True) -> bytes:
        """Stop taking new streams. Graceful: GOAWAY(NO_ERROR) naming the last
        stream we accept; open streams finish (watch ``open_streams`` fall to 0,
        then close). Not graceful: GOAWAY and the codec stops; close at once."""
        if self._closed or self._error is not None:
            return self._out()
        self._initiate()
        last = self._peer_highest
        if graceful:
            if self._drain_last is None:
                self._drain_last = last
                self._send_goaway(last, NO_ERROR)
        else:
            self._send_goaway(last, NO_ERROR)
            self._closed = True
            self._streams.clear()
            self._blocked.clear()
        return self._out()

    @property
    def open_streams(self) -> int:
        """Streams not finished both ways (and not reset)."""
        return len(self._streams)

    @property
    def keep_alive(self) -> bool:
        """New streams may still come on this connection (no GOAWAY either way, no error)."""
        return not self._closed and self._drain_last is None and self._peer_last is None

    @property
    def closed(self) -> bool:
        """The connection is over (fatal error, non-graceful GOAWAY, EOF, or drained).

        A client's GOAWAY does not end a server's connection: it only says the
        client takes no pushed streams, and it may still send PINGs and finish
        what it has (h2spec http2/7 checks that a PING after it is answered)."""
        peer_done = self._peer_last is not None and self._client_side
        return self._closed or ((self._drain_last is not None or peer_done) and not self._streams)


# ---------------------------------------------------------------- server
class H2Server(_Endpoint):
    """One downstream HTTP/2 connection, server side (prior knowledge / ALPN h2)."""

    _client_side = False
    _status_bad = 400
    _who = "client"

    def __init__(self, limits: H2Limits = _DEFAULT_LIMITS, *, now: Callable[[], float] | None = None) -> None:
        super().__init__(limits, now)

    def _on_request(self, sid: int, block: bytes, raw: _Raw, end_stream: bool, events: list[H2Event]) -> None:
        pseudo, fields, problem, length = self._fields_of(block, raw, sid, _REQUEST)
        if problem:
            self._refuse_431(sid, end_stream, problem, events)
            return
        method = pseudo.get(b":method", b"").decode("latin-1")
        authority = pseudo.get(b":authority")
        authority_s = authority.decode("latin-1") if authority is not None else (header_value(fields, "host") or "")
        path = pseudo.get(b":path", b"").decode("latin-1")
        expect = header_value(fields, "expect")
        head = RequestHead(
            method,
            authority_s if method == "CONNECT" else path,
            fields,
            "2",
            pseudo.get(b":scheme", b"https").decode("latin-1"),
            authority_s,
            path or "/",
            True,
            expect is not None and expect.strip().lower() == "100-continue",
            None,
            sid,
        )
        st = self._new_stream()
        st.length = length
        self._streams[sid] = st
        events.append(head)
        if end_stream:
            self._remote_end(sid, st, events)

    def _refuse_431(self, sid: int, ended: bool, problem: str, events: list[H2Event]) -> None:
        self._send_headers(sid, [(b":status", b"431", False), (b"content-length", b"0", False)], True)
        if not ended:
            self._send_rst(sid, NO_ERROR)
        self._remember(sid, _GONE_IGNORE)
        self._ctl += 1
        events.append(H2Reset(f"request headers refused with 431: {problem}", sid))

    def response_head(self, stream_id: int, head: ResponseHead, *, end_stream: bool = False) -> bytes:
        """The response head (1xx interim heads too; call again for the final one)."""
        st = self._streams.get(stream_id)
        if st is None or self._closed:
            return self._out()
        status = head.status
        if status == 101 or not 100 <= status <= 999:
            raise ValueError(f"status {status} cannot be sent on HTTP/2")
        if st.responded:
            raise RuntimeError(f"stream {stream_id}: a final response head was already sent")
        fields = _encode_fields([(b":status", str(status).encode(), False)], head.headers)
        if status < 200:
            if end_stream:
                raise ValueError("an interim (1xx) response cannot end the stream")
            self._send_headers(stream_id, fields, False)
            return self._out()
        st.responded = True
        self._send_headers(stream_id, fields, end_stream)
        if end_stream:
            self._local_end(stream_id, st)
        return self._out()


# ---------------------------------------------------------------- client
class H2Client(_Endpoint):
    """One upstream HTTP/2 connection (prior knowledge / ALPN h2), client side."""

    _client_side = True
    _status_bad = 502
    _who = "upstream"

    def __init__(self, limits: H2Limits = _DEFAULT_LIMITS, *, now: Callable[[], float] | None = None) -> None:
        super().__init__(limits, now)

    @property
    def can_open_stream(self) -> bool:
        """A new request fits: no GOAWAY either way, under the peer's MAX_CONCURRENT_STREAMS."""
        if self._closed or self._error is not None or self._peer_last is not None or self._drain_last is not None:
            return False
        if self._my_highest >= _MAX_WINDOW - 1:
            return False
        return len(self._streams) < self._peer_max_streams

    def request(self, head: RequestHead, *, end_stream: bool = False) -> tuple[int, bytes]:
        """Open a stream with this request head: (stream_id, bytes to send)."""
        if not self.can_open_stream:
            raise RuntimeError("this HTTP/2 connection cannot open another stream now (check can_open_stream)")
        self._initiate()
        sid = self._my_highest + 2 if self._my_highest else 1
        method = head.method
        authority = head.authority or header_value(head.headers, "host") or ""
        fields: list[_Field] = [(b":method", method.encode("ascii"), False)]
        if method == "CONNECT":
            if not authority:
                raise ValueError("CONNECT request without an authority")
            fields.append((b":authority", authority.encode("latin-1"), False))
        else:
            fields.append((b":scheme", (head.scheme or "http").encode("ascii"), False))
            if authority:
                fields.append((b":authority", authority.encode("latin-1"), False))
            fields.append((b":path", (head.path or "/").encode("latin-1"), False))
        _encode_fields(fields, head.headers)
        self._send_headers(sid, fields, end_stream)
        self._my_highest = sid
        st = self._new_stream()
        st.head_only = method == "HEAD"
        self._streams[sid] = st
        if end_stream:
            st.local_done = True
        return sid, self._out()

    def _on_response(self, sid: int, st: _Stream, block: bytes, raw: _Raw, end_stream: bool,
                     events: list[H2Event]) -> None:
        pseudo, fields, problem, length = self._fields_of(block, raw, sid, _RESPONSE)
        try:
            status = int(pseudo.get(b":status", b"0"))
        except ValueError:
            status = 0
        if status < 200:
            if end_stream:
                self._malformed(sid, f"interim response {status} with END_STREAM")
            if problem:
                self._kill(sid, st, CANCEL)
                events.append(H2Reset(f"upstream response headers refused: {problem}", sid))
                return
            events.append(ResponseHead(status, fields, "", "2", True, sid))
            return
        if problem:
            self._kill(sid, st, CANCEL)
            events.append(H2Reset(f"upstream response headers refused: {problem}", sid))
            return
        st.responded = True
        if status != 304 and status != 204:
            st.length = length
        events.append(ResponseHead(status, fields, "", "2", True, sid))
        if end_stream:
            self._remote_end(sid, st, events)

# ---------------------------------------------------------------- translation
def h1_head_to_h2(head: RequestHead) -> RequestHead:
    """An HTTP/1.x request head for an HTTP/2 upstream: Host becomes :authority,
    connection-specific fields go (te kept only as "trailers")."""
    authority = head.authority or header_value(head.headers, "host") or ""
    path = head.path or "/"
    return RequestHead(
        head.method,
        authority if head.method == "CONNECT" else path,
        _strip_connection_specific(head.headers, drop_host=True),
        "2",
        head.scheme,
        authority,
        path,
        True,
        head.expect_continue,
        None,
        0,
    )


def h2_head_to_h1(head: RequestHead) -> RequestHead:
    """An HTTP/2 request head for an HTTP/1.1 upstream: :authority becomes Host
    (first field), origin-form target."""
    authority = head.authority or header_value(head.headers, "host") or ""
    fields = _strip_connection_specific(head.headers, drop_host=True)
    if authority:
        fields.insert(0, ("host", authority))
    path = head.path or "/"
    return RequestHead(
        head.method,
        authority if head.method == "CONNECT" else path,
        fields,
        "1.1",
        head.scheme,
        authority,
        path,
        True,
        head.expect_continue,
        None,
        0,
    )
