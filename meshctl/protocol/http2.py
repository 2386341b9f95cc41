"""Sans-IO HTTP/2 codec over jh2 (h2's API, native HPACK), for both legs of a proxy hop.

``H2Server`` serves one downstream connection; ``H2Client`` carries many
multiplexed requests on one upstream connection. Both speak the events of
``meshctl.protocol.events`` (every event carries its ``stream_id``), so the
proxy pipeline is the one it runs for HTTP/1.1, plus three HTTP/2-only
events defined here: ``GoAway``, ``WindowUpdated`` and ``H2Reset`` (a
``Reset`` with the RST_STREAM error code). No sockets, no trio, no clock of
its own (the rapid-reset clock is injected).

Rules this module keeps
-----------------------
* Bytes out: every method that changes the connection returns ALL bytes the
  connection has pending, in order (including PING/SETTINGS ACKs and
  WINDOW_UPDATEs queued by an earlier ``feed``). After ``feed`` call
  ``data_to_send()``. Write what you get, in the order you get it.
  Bytes are counted as "sent" once handed out: the control-frame flood cap
  counts ACKs queued since the last hand-out, so take bytes only when the
  connection can write them.
* Inbound flow control is the caller's: each ``Data`` event must be followed,
  once the bytes have been passed on, by ``ack_received(stream_id, n)``, which
  reopens the windows (WINDOW_UPDATE). Not acking is backpressure: the peer
  stops after ``initial_window_size`` bytes per stream and
  ``connection_window`` per connection. Padding is acked by the codec; so is
  whatever is unacked when a stream is reset or completes both ways.
* Outbound flow control is the codec's: ``data()`` sends what the windows
  allow and queues the rest (``end()`` and trailers queue behind it). Queued
  bytes go out from later calls as the peer's WINDOW_UPDATEs arrive. When
  ``send_window(stream_id)`` is 0 the caller should stop reading that
  stream's source until ``feed`` returns ``WindowUpdated(stream_id)``, which
  is emitted once a stream that was blocked has room again.
* Connection-fatal errors raise ``ProtocolError`` from ``feed`` (status 400 for
  a downstream client, 502 for an upstream); ``data_to_send()`` then holds a
  GOAWAY, and the connection should be closed after writing it. Malformed
  header blocks are connection errors (GOAWAY PROTOCOL_ERROR), as in Envoy's
  default (``stream_error_on_invalid_http_messaging: false``). The rules are
  h2's inbound validation (RFC 9113 8.2-8.3: empty or uppercase names,
  whitespace around names and values, unknown, duplicate, misplaced or
  missing pseudo-headers, connection-specific fields, ``te`` other than
  trailers, an empty ``:path``, ``:authority`` and Host that disagree),
  checked here in one pass over the decoded fields instead of h2's chain of
  generators.
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
  frames per ``control_frame_window`` seconds even when their ACKs are sent.
* A response that completes while its request is still open is followed by
  RST_STREAM(NO_ERROR) (RFC 9113 8.1), so the client stops sending.
* GOAWAY both ways is graceful: h2 itself treats any GOAWAY as the end of the
  connection, so this module sends its own graceful GOAWAY frame and reads the
  peer's without closing h2's state. Streams at or below the last-stream-id
  finish; later ones are refused (server: RST_STREAM REFUSED_STREAM; client:
  an ``H2Reset`` with ``refused`` true, safe to retry elsewhere).
* Calls naming a stream that is gone (reset by the peer, finished) are ignored
  and return the pending bytes: the proxy may race a Reset it has not seen yet.
* Output headers are the caller's ``HeaderList``; names are lower-cased,
  connection-specific fields are dropped (``te`` kept only as ``trailers``),
  CR/LF/NUL in values raise ``ValueError``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

# jh2: h2's API with a native HPACK (measured 1.6x h2 per gRPC exchange, bench/h2_codec_bench.py).
# The HPACK errors are the ones jh2.connection raises (native or pure, whichever it loaded).
from jh2.config import H2Configuration
from jh2.connection import H2Connection
from jh2.connection import HPACKError, OversizedHeaderListError
from jh2.errors import ErrorCodes
from jh2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from jh2.events import WindowUpdated as _H2WindowUpdated
from jh2.exceptions import DenialOfServiceError, H2Error, StreamClosedError, TooManyStreamsError
from jh2.exceptions import ProtocolError as _H2ProtocolError
from jh2.frame_buffer import FrameBuffer
from jh2.hpack import Decoder as _PureDecoder
from jh2.hpack.exceptions import HPACKError as _PureHPACKError
from jh2.hpack.exceptions import OversizedHeaderListError as _PureOversized
from jh2.hyperframe.frame import ContinuationFrame, GoAwayFrame, RstStreamFrame
from jh2.settings import SettingCodes, Settings
from jh2.stream import StreamClosedBy

# jh2 falls back to a pure-Python HPACK where its native one does not load; that one
# logs every integer it codes at DEBUG (~60 calls per exchange): never worth it here
logging.getLogger("jh2.hpack.hpack").disabled = True

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

_MAX_WINDOW = (1 << 31) - 1


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


_DEFAULT_LIMITS = H2Limits()

# ---------------------------------------------------------------- inbound header validation
# h2's inbound rules (jh2.utilities.validate_headers), checked in _Endpoint._decode_fields
_REQUEST, _RESPONSE, _TRAILERS = 0, 1, 2  # what a header block is
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_UPPER = re.compile(b"[A-Z]")
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_PSEUDO_ALLOWED = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_PSEUDO_REQUEST_ONLY = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# regular field names that passed the name checks, decoded (names repeat from request to
# request: the checks run once per name); bounded, so a peer inventing names cannot grow it
_CHECKED_NAMES: dict[bytes, str] = {}
_CHECKED_NAMES_MAX = 2048


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
@dataclass(slots=True)
class GoAway:
    """The peer sent GOAWAY: no new streams on this connection. Streams up to
    ``last_stream_id`` may still complete; later ones were not processed."""

    last_stream_id: int
    error_code: int = 0
    debug: bytes = b""


@dataclass(slots=True)
class WindowUpdated:
    """A stream that had no send window (or queued data) can take more data now."""

    stream_id: int


@dataclass(slots=True)
class H2Reset(Reset):
    """A Reset with the HTTP/2 error code (0 when the codec reset the stream itself)."""

    error_code: int = 0

    @property
    def refused(self) -> bool:
        """The peer did not process the request (REFUSED_STREAM or above GOAWAY): safe to retry."""
        return self.error_code == ErrorCodes.REFUSED_STREAM


H2Event = Event | GoAway | WindowUpdated


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"


# ---------------------------------------------------------------- headers
# connection-specific fields, never sent on HTTP/2 (RFC 9113 8.2.2); "te" is
# handled apart (only "trailers" is allowed)
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_DROP_OUT = CONNECTION_SPECIFIC | {"te", "host"}


def _strip_connection_specific(headers: HeaderList, *, drop_host: bool) -> HeaderList:
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


def _encode_fields(out: list[tuple[bytes, bytes]], headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[bytes, bytes]]:
    """Append the caller's fields to ``out`` as h2 wants them (bytes, lower-case names)."""
    for k, v in headers:
        if not k.islower():
            k = k.lower()
        if k in drop:
            if k == "te" and v.strip().lower() == "trailers":
                out.append((b"te", b"trailers"))
            continue
        if k[:1] == ":" or not k:
            raise ValueError(f"header name {k!r} is not allowed in a header list (pseudo-headers come from the head)")
        if "\r" in v or "\n" in v or "\0" in v:
            raise ValueError(f"CR, LF or NUL in the value of header {k!r}: {v!r}")
        try:
            out.append((k.encode("ascii"), v.strip().encode("latin-1")))
        except UnicodeEncodeError as exc:
            raise ValueError(f"header {k!r} is not encodable as latin-1: {exc}") from None
    return out


# ---------------------------------------------------------------- h2 hooks
class _StrictDecoder(_PureDecoder):
    """HPACK decoding for header blocks from untrusted clients (the server
    side): jh2's pure-Python decoder, which is h2's and refuses what RFC 7541
    forbids and jh2's native decoder lets through (a dynamic table size update
    after the first field, Huffman padding that is not EOS bits: h2spec
    hpack/4.2 and 5.2). Errors are raised as the ones jh2.connection catches."""

    def decode(self, data, raw=False):  # type: ignore[no-untyped-def]
        try:
            return super().decode(data, raw)
        except _PureOversized as exc:
            raise OversizedHeaderListError(str(exc)) from exc
        except _PureHPACKError as exc:
            raise HPACKError(str(exc)) from exc


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer with a configurable CONTINUATION cap (h2 hard-codes 64)."""

    def __init__(self, server: bool, max_continuations: int) -> None:
        super().__init__(server=server)
        self._max_continuations = max_continuations

    def _update_header_buffer(self, f):  # type: ignore[no-untyped-def]
        buf = self._headers_buffer
        if buf and isinstance(f, ContinuationFrame) and len(buf) > self._max_continuations:
            raise DenialOfServiceError(
                f"CONTINUATION flood: more than {self._max_continuations} CONTINUATION frames in one header block"
            )
        return super()._update_header_buffer(f)


class _Conn(H2Connection):
    """h2's connection with two changes: streams over the limit (or above our
    graceful GOAWAY) are refused with RST_STREAM(REFUSED_STREAM) instead of
    killing the connection, and a received GOAWAY does not close h2's state,
    so in-flight streams can finish. Pinned to h2 4.x internals (tests cover both)."""

    def __init__(self, config: H2Configuration, endpoint: "_Endpoint") -> None:
        super().__init__(config)
        self._mesh = endpoint

    def _receive_headers_frame(self, frame):  # type: ignore[no-untyped-def]
        sid = frame.stream_id
        ep = self._mesh
        if ep._drain_last is not None and sid > ep._drain_last and sid not in self.streams:
            return self._refuse(frame, "after GOAWAY")
        try:
            return super()._receive_headers_frame(frame)
        except TooManyStreamsError:
            return self._refuse(frame, "max_concurrent_streams")

    def _refuse(self, frame, why: str):  # type: ignore[no-untyped-def]
        sid = frame.stream_id
        ep = self._mesh
        if sid % 2 != (0 if self.config.client_side else 1):
            raise _H2ProtocolError(f"HEADERS on stream {sid}, which the peer may not open")
        try:  # decode anyway: the HPACK table must stay in step with the peer's
            self.decoder.decode(frame.data, raw=True)
        except OversizedHeaderListError as exc:
            raise DenialOfServiceError(f"oversized header block: {exc}") from exc
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise _H2ProtocolError(f"error decoding header block: {exc}") from exc
        if sid > self.highest_inbound_stream_id:  # type: ignore[has-type]  # h2's attribute (jh2: no types)
            self.highest_inbound_stream_id = sid
        self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
        ep._ctl += 1
        ep.refused_streams += 1
        if why == "max_concurrent_streams":
            # opening streams past the advertised limit is abuse too: it counts as a
            # premature reset (a client that had not seen our SETTINGS yet stays far below)
            ep._count_premature_reset()
        return [RstStreamFrame(sid, error_code=ErrorCodes.REFUSED_STREAM)], []

    # -- flood accounting (Envoy's per-connection frame budgets); each raises
    # DenialOfServiceError, which feed() turns into GOAWAY(ENHANCE_YOUR_CALM)
    def _receive_priority_frame(self, frame):  # type: ignore[no-untyped-def]
        self._mesh._idle_frame("PRIORITY")
        return super()._receive_priority_frame(frame)

    def _receive_unknown_frame(self, frame):  # type: ignore[no-untyped-def]
        self._mesh._idle_frame("unknown-type")
        return super()._receive_unknown_frame(frame)

    def _receive_window_update_frame(self, frame):  # type: ignore[no-untyped-def]
        ep = self._mesh
        ep._window_updates += 1
        lim = ep._limits.max_inbound_window_update_frames_per_data_frame_sent
        if ep._window_updates > lim * (1 + ep._data_frames_sent):
            raise _Flood(f"WINDOW_UPDATE flood: {ep._window_updates} WINDOW_UPDATE frames for "
                         f"{ep._data_frames_sent} DATA frames sent (limit {lim} per DATA frame)")
        return super()._receive_window_update_frame(frame)

    def _receive_ping_frame(self, frame):  # type: ignore[no-untyped-def]
        self._mesh._control_frame("PING")
        return super()._receive_ping_frame(frame)

    def _receive_settings_frame(self, frame):  # type: ignore[no-untyped-def]
        self._mesh._control_frame("SETTINGS")
        return super()._receive_settings_frame(frame)

    def send_data(self, stream_id, data, end_stream=False, pad_length=None):  # type: ignore[no-untyped-def]
        self._mesh._data_frames_sent += 1  # every caller sends at most one frame's worth
        return super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)

    def _receive_goaway_frame(self, frame):  # type: ignore[no-untyped-def]
        ev = ConnectionTerminated()
        try:
            ev.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            ev.error_code = frame.error_code
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class _Flood(DenialOfServiceError):
    """A frame budget exceeded: the connection ends with GOAWAY(ENHANCE_YOUR_CALM)."""


class _Stream:
    __slots__ = ("queue", "queued", "end_pending", "unacked", "trailers", "local_done", "remote_done",
                 "responded", "blocked")

    def __init__(self) -> None:
        self.queue: deque[memoryview] | None = None  # outbound data waiting for window
        self.queued = 0
        self.end_pending: list[tuple[str, str]] | None = None  # trailers (maybe []) to send after the queue
        self.unacked = 0  # inbound bytes handed out in Data events, not acked yet
        self.trailers: HeaderList = []
        self.local_done = False  # we sent END_STREAM
        self.remote_done = False  # the peer sent END_STREAM
        self.responded = False  # server: a final response head went out; client: one came in
        self.blocked = False


# ---------------------------------------------------------------- common
class _Endpoint:
    _client_side = False
    _status_bad = 400
    _who = "client"

    def __init__(self, limits: H2Limits, now: Callable[[], float] | None) -> None:
        self._limits = limits
        self._now = now or time.monotonic
        cfg = H2Configuration(
            client_side=self._client_side,
            header_encoding=None,
            # inbound validation stays on for untrusted peers: _decode_fields does it,
            # in one pass (h2's generator chain cost ~13% of a gRPC exchange's codec time)
            validate_inbound_headers=False,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,  # _encode_fields and the head builders guarantee it
            normalize_outbound_headers=False,
        )
        conn = _Conn(cfg, self)
        values = {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window_size,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            SettingCodes.HEADER_TABLE_SIZE: 4096,  # RFC 9113's default (jh2 would offer 64 KiB per connection)
        }
        if self._client_side:
            values[SettingCodes.ENABLE_PUSH] = 0
        # initial values take effect at once and are what initiate_connection advertises
        conn.local_settings = Settings(client=self._client_side, initial_values=values)
        conn.decoder.max_allowed_table_size = 4096
        if not self._client_side and type(conn.decoder) is not _PureDecoder:
            conn.decoder = _StrictDecoder()  # (max_allowed_table_size 4096 too)
        conn.max_inbound_frame_size = limits.max_frame_size
        conn.incoming_buffer = _FrameBuffer(not self._client_side, limits.max_continuation_frames)
        # HPACK aborts (fatally) only far above the limit; the limit itself is stream-level
        conn.decoder.max_header_list_size = 2 * limits.max_header_list_size
        self._conn = conn
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._pending = bytearray()  # bytes taken from h2 ahead of a frame of our own
        self._initiated = False
        self._error: ProtocolError | None = None
        self._closed = False  # GOAWAY sent non-gracefully or connection gone
        self._drain_last: int | None = None  # our graceful GOAWAY's last-stream-id
        self._peer_last: int | None = None  # the peer's GOAWAY last-stream-id
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
        conn = self._conn
        conn.initiate_connection()
        extra = self._limits.connection_window - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        """Everything pending: call after ``feed`` (also after a ProtocolError: the GOAWAY)."""
        return self._out()

    def _out(self) -> bytes:
        self._ctl = 0
        data = self._conn.data_to_send()
        if self._pending:
            data = bytes(self._pending) + data
            self._pending.clear()
        return data

    # ------------------------------------------------------------ input
    def feed(self, data: bytes) -> list[H2Event]:
        """Bytes from the peer -> events. Raises ProtocolError if the connection must close."""
        if self._error is not None:
            raise self._error
        if self._closed or not data:
            return []
        if not self._initiated:
            self._initiate()
        try:
            h2events = self._conn.receive_data(data)
        except _Flood as exc:
            self._conn.clear_outbound_data_buffer()
            self._pending.clear()
            self._fail(f"{exc} from the {self._who}", exc, calm=True)
        except H2Error as exc:
            self._fail(f"HTTP/2 protocol error from the {self._who}: {exc}", exc)
        events: list[H2Event] = []
        flush = False
        streams = self._streams
        for ev in h2events:
            t = type(ev)
            if t is DataReceived:
                sid = ev.stream_id
                st = streams.get(sid)
                n = len(ev.data)
                fcl = ev.flow_controlled_length
                if st is None:
                    self._conn.acknowledge_received_data(fcl, sid)
                    continue
                if fcl > n:  # padding: nobody downstream will ack it
                    self._conn.acknowledge_received_data(fcl - n, sid)
                if n:
                    self._empty = 0
                    st.unacked += n
                    events.append(Data(ev.data, sid))
                elif ev.stream_ended is None:
                    self._empty += 1
                    if self._empty > self._limits.max_consecutive_empty_frames:
                        self._fail(f"empty DATA frame flood from the {self._who}: more than "
                                   f"{self._limits.max_consecutive_empty_frames} in a row", calm=True)
            elif t is StreamEnded:
                st = streams.get(ev.stream_id)
                if st is None:
                    continue
                st.remote_done = True
                events.append(EndOfMessage(st.trailers, ev.stream_id))
                if st.local_done:
                    self._forget(ev.stream_id, st)
            elif t is RequestReceived or t is ResponseReceived or t is InformationalResponseReceived:
                self._heads += 1
                self._on_head(ev, events)
            elif t is _H2WindowUpdated or t is RemoteSettingsChanged:
                if t is RemoteSettingsChanged:
                    self._ctl += 1
                if self._blocked:
                    flush = True
            elif t is TrailersReceived:
                self._on_trailers(ev, events)
            elif t is StreamReset:
                self._on_reset(ev, events)
            elif t is PingReceived:
                self._ctl += 1
            elif t is ConnectionTerminated:
                self._on_goaway(ev, events)
        if self._ctl > self._limits.max_queued_control_frames:
            self._conn.clear_outbound_data_buffer()
            self._pending.clear()
            self._fail(
                f"control frame flood from the {self._who}: more than "
                f"{self._limits.max_queued_control_frames} PING/SETTINGS ACKs or RST_STREAMs queued",
                calm=True,
            )
        if flush:
            for sid, st in list(self._blocked.items()):
                self._flush(sid, st)
                if sid not in self._blocked:  # the queue ran out and the stream finished
                    continue
                if not st.queue and self._window(sid) > 0:
                    st.blocked = False
                    del self._blocked[sid]
                    events.append(WindowUpdated(sid))
        return events

    def _idle_frame(self, what: str) -> None:
        self._idle_frames += 1
        lim = self._limits.max_inbound_priority_frames_per_stream
        opened = self._heads + len(self._conn.streams)
        if self._idle_frames > lim * (1 + opened):
            raise _Flood(f"{what} frame flood: {self._idle_frames} PRIORITY/unknown frames for "
                         f"{opened} streams (limit {lim} per stream)")

    def _control_frame(self, what: str) -> None:
        now = self._now()
        lim = self._limits
        if now - self._ctl_since > lim.control_frame_window:
            self._ctl_since = now
            self._ctl_in = 0
        self._ctl_in += 1
        if self._ctl_in > lim.max_inbound_control_frames_per_window:
            raise _Flood(f"{what} flood: more than {lim.max_inbound_control_frames_per_window} PING/SETTINGS "
                         f"frames within {lim.control_frame_window:g}s")

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

    def _fail(self, message: str, cause: BaseException | None = None, *, calm: bool = False) -> None:
        if calm:
            self._conn.close_connection(
                error_code=ErrorCodes.ENHANCE_YOUR_CALM, additional_data=message.encode("ascii", "replace")[:200]
            )
        err = ProtocolError(message, self._status_bad)
        err.__cause__ = cause
        self._error = err
        self._closed = True
        raise err

    def _decode_fields(self, raw: Iterable[tuple[bytes, bytes]], sid: int,
                       kind: int) -> tuple[dict[bytes, bytes], HeaderList, str]:
        """(pseudo-headers, regular fields, problem or "") with the limits applied.
        A malformed block (h2's inbound validation rules) fails the connection."""
        pseudo: dict[bytes, bytes] = {}
        fields: HeaderList = []
        size = 0
        host: bytes | None = None
        ws = _WHITESPACE
        checked = _CHECKED_NAMES
        for n, v in raw:
            size += len(n) + len(v) + 32
            if v and (v[0] in ws or v[-1] in ws):
                self._malformed(sid, f"whitespace around the value of header {n!r}: {v!r}")
            name = checked.get(n)
            if name is not None:
                fields.append((name, v.decode("latin-1")))
                continue
            if not n:
                self._malformed(sid, "empty header name")
            if n[0] in ws or n[-1] in ws:
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
            return pseudo, fields, f"header list of {size} bytes is over the limit of {lim.max_header_list_size}"
        if len(fields) > lim.max_headers:
            return pseudo, fields, f"{len(fields)} header fields is over the limit of {lim.max_headers}"
        return pseudo, fields, ""

    def _malformed(self, sid: int, problem: str) -> None:
        """A malformed header block: connection error (GOAWAY PROTOCOL_ERROR), as h2's own validation."""
        self._conn.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
        self._fail(f"HTTP/2 protocol error from the {self._who}: malformed header block on stream {sid}: {problem}")

    def _on_trailers(self, ev: TrailersReceived, events: list[H2Event]) -> None:
        sid = ev.stream_id
        st = self._streams.get(sid)
        if st is None:
            return
        _, fields, problem = self._decode_fields(ev.headers, sid, _TRAILERS)
        if problem:
            self._kill(sid, st, ErrorCodes.CANCEL)
            events.append(H2Reset(f"trailers from the {self._who} refused: {problem}", sid))
            return
        st.trailers = fields

    def _on_reset(self, ev: StreamReset, events: list[H2Event]) -> None:
        sid = ev.stream_id
        st = self._streams.pop(sid, None)
        if st is None:
            return
        self._drop(sid, st)
        code = int(ev.error_code)
        who = self._who if ev.remote_reset else "codec"
        events.append(H2Reset(f"the {who} reset the stream ({_code_name(code)})", sid, code))
        if ev.remote_reset and not self._client_side and not st.responded:
            self._count_premature_reset()

    def _count_premature_reset(self) -> None:
        lim = self._limits
        now = self._now()
        q = self._resets
        q.append(now)
        cutoff = now - lim.rapid_reset_window
        while q and q[0] < cutoff:
            q.popleft()
        if len(q) > lim.rapid_reset_threshold:
            self._fail(
                f"rapid reset (CVE-2023-44487): the client reset {len(q)} streams before a response "
                f"within {lim.rapid_reset_window:g}s (limit {lim.rapid_reset_threshold})",
                calm=True,
            )

    def _on_goaway(self, ev: ConnectionTerminated, events: list[H2Event]) -> None:
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        self._peer_last = last if self._peer_last is None else min(last, self._peer_last)
        events.append(GoAway(last, int(ev.error_code or 0), ev.additional_data or b""))
        mine = 1 if self._client_side else 0
        for sid in [s for s in self._streams if s > last and s % 2 == mine]:
            st = self._streams.pop(sid)
            self._drop(sid, st)
            events.append(H2Reset(f"the {self._who} sent GOAWAY before processing the stream", sid,
                                  int(ErrorCodes.REFUSED_STREAM)))

    def _on_head(self, ev, events: list[H2Event]) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError

    # ------------------------------------------------------------ bookkeeping
    def _drop(self, sid: int, st: _Stream) -> None:
        """A stream is gone: give back its unacked window, forget its queue."""
        if st.unacked:
            self._conn.acknowledge_received_data(st.unacked, sid)
            st.unacked = 0
        st.queue = None
        st.queued = 0
        if st.blocked:
            st.blocked = False
            self._blocked.pop(sid, None)

    def _forget(self, sid: int, st: _Stream) -> None:
        self._streams.pop(sid, None)
        self._drop(sid, st)

    def _kill(self, sid: int, st: _Stream, code: ErrorCodes) -> None:
        self._forget(sid, st)
        try:
            self._conn.reset_stream(sid, error_code=code)
        except StreamClosedError:
            pass

    def _local_end(self, sid: int, st: _Stream) -> None:
        st.local_done = True
        if st.remote_done:
            self._forget(sid, st)
        elif not self._client_side and st.responded:
            # complete response, request still open: tell the client to stop (RFC 9113 8.1)
            self._kill(sid, st, ErrorCodes.NO_ERROR)

    def _window(self, sid: int) -> int:
        try:
            return self._conn.local_flow_control_window(sid)
        except H2Error:
            return 0

    def _send_end(self, sid: int, st: _Stream, trailers: HeaderList) -> None:
        if trailers:
            self._conn.send_headers(sid, _encode_fields([], trailers, _DROP_OUT), end_stream=True)
        else:
            self._conn.end_stream(sid)
        self._local_end(sid, st)

    def _flush(self, sid: int, st: _Stream) -> None:
        """Send queued data as far as the windows allow, then a queued end."""
        conn = self._conn
        q = st.queue
        while q:
            win = self._window(sid)
            if win <= 0:
                return
            take = min(win, conn.max_outbound_frame_size)
            chunk = q[0]
            if len(chunk) <= take:
                q.popleft()
                st.queued -= len(chunk)
                if not q and st.end_pending is not None and not st.end_pending:
                    st.end_pending = None
                    conn.send_data(sid, bytes(chunk), end_stream=True)
                    self._local_end(sid, st)
                    return
                conn.send_data(sid, bytes(chunk))
            else:
                conn.send_data(sid, bytes(chunk[:take]))
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
        conn = self._conn
        if n <= conn.max_outbound_frame_size and n <= self._window(stream_id):
            if n or end_stream:
                conn.send_data(stream_id, data, end_stream=end_stream)
                if end_stream:
                    self._local_end(stream_id, st)
        else:
            st.queue = deque((memoryview(data),))
            st.queued = n
            if end_stream:
                st.end_pending = []
            self._flush(stream_id, st)
        if (st.queue or self._window(stream_id) <= 0) and not st.local_done and stream_id in self._streams:
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

    def reset(self, stream_id: int, reason: str = "", *, error_code: int = ErrorCodes.CANCEL) -> bytes:
        """Abandon a stream (RST_STREAM, CANCEL by default). ``reason`` is for the caller's logs."""
        st = self._streams.get(stream_id)
        if st is not None and not self._closed:
            self._kill(stream_id, st, ErrorCodes(error_code))
        return self._out()

    def ack_received(self, stream_id: int, n: int) -> bytes:
        """The caller consumed ``n`` bytes of Data from this stream: reopen the windows."""
        st = self._streams.get(stream_id)
        if st is not None and n > 0 and not self._closed:
            n = min(n, st.unacked)
            if n:
                st.unacked -= n
                self._conn.acknowledge_received_data(n, stream_id)
        return self._out()

    def send_window(self, stream_id: int) -> int:
        """How many body bytes this stream can take now without queueing."""
        st = self._streams.get(stream_id)
        if st is None or self._closed or st.local_done:
            return 0
        return max(0, self._window(stream_id) - st.queued)

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
        conn = self._conn
        last = conn.highest_inbound_stream_id
        if graceful:
            if self._drain_last is None:
                self._drain_last = last
                self._pending += conn.data_to_send()
                self._pending += GoAwayFrame(0, last_stream_id=last, error_code=ErrorCodes.NO_ERROR).serialize()
        else:
            conn.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=last)
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

    def _on_head(self, ev, events: list[H2Event]) -> None:  # type: ignore[no-untyped-def]
        sid = ev.stream_id
        pseudo, fields, problem = self._decode_fields(ev.headers, sid, _REQUEST)
        if problem:
            self._refuse_431(sid, ev.stream_ended is not None, problem, events)
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
        self._streams[sid] = _Stream()
        events.append(head)

    def _refuse_431(self, sid: int, ended: bool, problem: str, events: list[H2Event]) -> None:
        conn = self._conn
        conn.send_headers(sid, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
        if not ended:
            try:
                conn.reset_stream(sid, error_code=ErrorCodes.NO_ERROR)
            except StreamClosedError:
                pass
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
        fields = _encode_fields([(b":status", str(status).encode())], head.headers, _DROP_OUT)
        if status < 200:
            if end_stream:
                raise ValueError("an interim (1xx) response cannot end the stream")
            self._conn.send_headers(stream_id, fields)
            return self._out()
        st.responded = True
        self._conn.send_headers(stream_id, fields, end_stream=end_stream)
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
        conn = self._conn
        if conn.highest_outbound_stream_id >= _MAX_WINDOW - 1:
            return False
        return conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams

    def request(self, head: RequestHead, *, end_stream: bool = False) -> tuple[int, bytes]:
        """Open a stream with this request head: (stream_id, bytes to send)."""
        if not self.can_open_stream:
            raise RuntimeError("this HTTP/2 connection cannot open another stream now (check can_open_stream)")
        self._initiate()
        conn = self._conn
        sid = conn.get_next_available_stream_id()
        method = head.method
        authority = head.authority or header_value(head.headers, "host") or ""
        fields: list[tuple[bytes, bytes]] = [(b":method", method.encode("ascii"))]
        if method == "CONNECT":
            if not authority:
                raise ValueError("CONNECT request without an authority")
            fields.append((b":authority", authority.encode("latin-1")))
        else:
            fields.append((b":scheme", (head.scheme or "http").encode("ascii")))
            if authority:
                fields.append((b":authority", authority.encode("latin-1")))
            fields.append((b":path", (head.path or "/").encode("latin-1")))
        _encode_fields(fields, head.headers, _DROP_OUT)
        conn.send_headers(sid, fields, end_stream=end_stream)
        st = _Stream()
        self._streams[sid] = st
        if end_stream:
            st.local_done = True
        return sid, self._out()

    def _on_head(self, ev, events: list[H2Event]) -> None:  # type: ignore[no-untyped-def]
        sid = ev.stream_id
        st = self._streams.get(sid)
        if st is None:
            return
        pseudo, fields, problem = self._decode_fields(ev.headers, sid, _RESPONSE)
        if problem:
            self._kill(sid, st, ErrorCodes.CANCEL)
            events.append(H2Reset(f"upstream response headers refused: {problem}", sid))
            return
        try:
            status = int(pseudo.get(b":status", b"0"))
        except ValueError:
            status = 0
        if type(ev) is ResponseReceived:
            st.responded = True
        events.append(ResponseHead(status, fields, "", "2", True, sid))


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
