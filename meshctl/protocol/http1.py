"""Sans-IO HTTP/1.1 codec over httptools (llhttp), for both legs of a proxy hop.

``H1Server`` parses requests from one downstream connection and serializes the
responses; ``H1Client`` serializes requests to one upstream connection and
parses the responses. Both speak the events of ``meshctl.protocol.events``.
No sockets, no trio, no clock: bytes in, events out; events in, bytes out.

Rules this module keeps
-----------------------
* Parsing is llhttp's (strict mode, no leniencies). llhttp already refuses,
  with a 400: Content-Length with Transfer-Encoding, duplicate Content-Length
  (identical duplicates too -- llhttp's and Envoy's legacy http-parser codec
  both refuse them, so do we), non-numeric/negative Content-Length, obs-fold,
  whitespace before the colon, non-token header names, CTLs (bare CR/LF/NUL)
  in values, bad chunk sizes, a missing CRLF after chunk data and request-line
  garbage. This module adds, before the request's first event is produced:
  400 for HTTP/1.1 without Host and for several Host headers, 501 for any
  Transfer-Encoding that is not exactly ``chunked`` (case-insensitive), 505
  for versions other than 1.0/1.1, and 431 for heads over the limits.
* The head-size limit is counted from what llhttp hands over (target plus each
  complete header line); a head still incomplete at the end of a ``feed`` is
  also bounded by the bytes fed to it since.  A head can therefore overrun
  ``max_header_bytes`` by at most one ``feed`` before it is refused.
* Upstream (H1Client) errors have status 502: the proxy answers its client with it.
* ``ResponseHead.keep_alive=False`` passed to ``H1Server.response_head`` closes
  the connection after that response (``connection: close`` is written).
* Framing on output belongs to the codec: caller ``transfer-encoding``,
  ``connection`` and ``keep-alive`` headers are replaced by the codec's own
  (except ``connection`` on a 101, which is kept), ``content-length`` is kept.
* Upgrade: after a request with ``Connection: upgrade`` + ``Upgrade`` (or a
  CONNECT), the server codec stops parsing after that request and holds
  further bytes. A 101 (2xx to CONNECT) hands them over (``upgrade_accepted``
  or an ``Upgraded`` event from the next ``feed``); any other response resumes
  HTTP parsing of the held bytes at the next ``feed`` call (``feed(b"")`` works).
  An Upgrade request that carries a body (curl's h2c upgrade on a POST) is
  treated as a plain request (``upgrade=None``), as the body must be read as
  HTTP/1.1 anyway; CONNECT with a body is refused (400). So is one whose token
  is not in ``Limits.upgrades`` (h2c: Envoy strips it, else an h2c tunnel would
  carry requests past the proxy's routing and authorization); requests
  pipelined behind it are parsed and served.
* After a request or response that closes the connection, further input is ignored.
* A head-level error found behind complete pipelined requests of the same
  ``feed`` is deferred: their events are returned, ``keep_alive`` turns False,
  and the next ``feed``/``feed_eof`` raises it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Sequence

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from .events import (
    Data,
    EndOfMessage,
    Event,
    HeaderList,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Upgraded,
)

__all__ = ["Limits", "H1Server", "H1Client", "H1Codec"]


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # the whole request/response head
    max_headers: int = 100
    # Upgrade tokens the server codec honours (Envoy's upgrade_configs: WebSocket by
    # default). Any other (h2c above all) is served as a plain HTTP/1.1 request.
    upgrades: frozenset[str] = frozenset({"websocket"})


_DEFAULT_LIMITS: Final = Limits()

_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_REASONS.setdefault(425, "Too Early")

# headers the parser callbacks look at while collecting a head
_SPECIAL: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
)
# headers the serializer owns (framing and connection management)
_HOST_COUNT: Final = "\0host-count"  # key in the framing view when Host is repeated
_OWNED: Final = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
# methods for which H1Client does not invent a chunked body when the caller
# did not say end_stream=True
_BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})

# A header name as sent -> its lower-case str, and whether it is one of _SPECIAL (one
# dict lookup instead of two per field): the few spellings a connection's peers use come
# back on every message. Bounded (names are the peer's choice): once full, further
# spellings are converted each time and not kept.
_NAMES: Final[dict[bytes, tuple[str, bool]]] = {}
_NAMES_MAX: Final = 512


def _name(raw: bytes) -> tuple[str, bool]:
    name = raw.lower().decode()
    entry = (name, name in _SPECIAL)
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[raw] = entry
    return entry


# A connection's peer sends much the same head every time (same fields, same order, most
# values unchanged): each codec remembers, per position in the head, the field it last
# decoded there with the bytes it came from. A field whose name and value bytes are those
# at its position last time is that same (name, value) tuple again: no name look-up, no
# decoding, no new objects. Bounded: the first _MEMO_FIELDS fields, values up to
# _MEMO_VALUE_BYTES bytes, and at most _MEMO_BYTES bytes of names and values (of lines,
# for heads serialized) per codec: what an idle keep-alive connection holds on to, with
# fields as large as its peer likes (a gateway may hold thousands of such connections).
_MEMO_FIELDS: Final = 32
_MEMO_VALUE_BYTES: Final = 256
_MEMO_BYTES: Final = 2048
_NO_FIELD: Final[Any] = ("", "")  # a position not remembered (names are never empty)


class _ReleasedParser:
    """What a codec parses with once released (``release``): any bytes fed are refused."""

    def feed_data(self, data: bytes) -> None:
        raise ProtocolError("the connection's codec was released", 400)

    def get_http_version(self) -> str:
        return "1.1"


_RELEASED: Final[Any] = _ReleasedParser()


class _Field:
    """A decoded head field and the bytes llhttp handed over for it (see _MEMO_FIELDS)."""

    __slots__ = ("raw_name", "raw_value", "field", "name", "value", "special")

    def __init__(self, raw_name: bytes, raw_value: bytes, field: Any, special: bool) -> None:
        self.raw_name = raw_name  # b"": a position not remembered (names are never empty)
        self.raw_value = raw_value
        # the (name, value) tuple itself, typed Any: mypyc keeps a tuple[str, str] attribute
        # unboxed, and reading it would make a new tuple every time
        self.field = field
        self.name: str = field[0]
        self.value: str = field[1]
        self.special = special


# output framing
_NONE: Final = 0  # no body may follow (HEAD, 1xx, 204, 304, upgrades)
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CLOSE: Final = 3  # body ends when the connection closes (HTTP/1.0 clients)

_LAST_CHUNK: Final = b"0\r\n\r\n"

# ---------------------------------------------------------------- states (h11's idea)
#
# Each codec keeps one state per direction, and every change of state goes
# through the transition tables below (``_go``): a pair missing from a table is
# a transition that cannot happen. What is not state (the pending exchanges, a
# deferred error, held bytes, framing counters) stays plain data.
#
# Receive side: the messages the peer sends (requests for H1Server, responses
# for H1Client).
#
#   IDLE       no message arriving (H1Client: none expected either)
#   AWAIT      H1Client: a request is out, its (next) response has not begun
#   HEAD       a message head is arriving
#   BODY       its body is arriving
#   DONE       H1Client: the final response is complete (keep-alive)
#   HOLD       H1Server: an Upgrade/CONNECT request is complete; further bytes are held
#              until the response says whether the protocol switches
#   SWITCHED   the connection carries opaque bytes (after a 101 / 2xx to CONNECT)
#   CLOSED     no further message will be parsed; input is ignored
#   ABANDONED  H1Server: CLOSED while a request was still arriving (EOF is then a Reset)
#   ERROR      a protocol error was raised; every later feed raises it again
#
# Send side: the messages this codec serializes.
#
#   H1Server (responses)                    H1Client (requests)
#   WAIT       no response begun             IDLE   no request on this connection yet
#   BODY       a response is in progress      BODY   head sent, body still to come
#   DONE       a response ended, kept alive   DONE   the request is complete
#   SWITCHING  101 (2xx to CONNECT) sent: the next bytes either way are opaque
#   SWITCHED   switched
#
# Whether the connection outlives the current exchange (keep-alive) is a flag
# beside the states, as in h11.

IDLE: Final = 0
AWAIT: Final = 1
HEAD: Final = 2
BODY: Final = 3
DONE: Final = 4
HOLD: Final = 5
SWITCHED: Final = 6
CLOSED: Final = 7
ABANDONED: Final = 8
ERROR: Final = 9
WAIT: Final = 10  # send side only (with BODY, DONE, SWITCHED, IDLE)
SWITCHING: Final = 11
_STATE_NAMES = ("IDLE", "AWAIT", "HEAD", "BODY", "DONE", "HOLD", "SWITCHED", "CLOSED", "ABANDONED", "ERROR",
                "WAIT", "SWITCHING")

# events that move the states
E_BEGIN: Final = 0  # a message head begins (llhttp on_message_begin)
E_HEAD_DONE: Final = 1  # its head is complete
E_COMPLETE: Final = 2  # the message is complete (1xx for H1Client: back to AWAIT)
E_FINAL: Final = 3  # H1Client: the final response is complete
E_ASK_UPGRADE: Final = 4  # H1Server: the complete request asked for an upgrade: hold further bytes
E_RESUME: Final = 5  # H1Server: the upgrade was refused: parse the held bytes as HTTP/1.1
E_CLOSE: Final = 6  # no more messages this way (Connection: close, EOF, a response that closes)
E_SWITCH: Final = 7  # the protocol switched
E_FAIL: Final = 8  # protocol error
E_SEND: Final = 9  # send side: a head goes out (its body follows)
E_SEND_ALL: Final = 10  # send side: a head goes out with the whole message (end_stream)
E_END: Final = 11  # send side: the message is complete
E_SEND_SWITCH: Final = 12  # H1Server: 101 / 2xx to CONNECT goes out
E_RESET: Final = 13  # H1Client: ready for the next exchange on a kept-alive connection
E_REQUEST: Final = 14  # H1Client receive side: a request went out, a response is due
_EVENT_NAMES = ("BEGIN", "HEAD_DONE", "COMPLETE", "FINAL", "ASK_UPGRADE", "RESUME", "CLOSE", "SWITCH", "FAIL",
                "SEND", "SEND_ALL", "END", "SEND_SWITCH", "RESET", "REQUEST")


def _table(rules: dict[tuple[int, int], int], *, close: dict[int, int], switch_from: tuple[int, ...],
           states: tuple[int, ...]) -> dict[int, int]:
    """A transition table keyed by state * 16 + event (one int: cheap on every request)."""
    out: dict[int, int] = {}
    for (state, event), nxt in rules.items():
        out[state * 16 + event] = nxt
    for state, nxt in close.items():
        out[state * 16 + E_CLOSE] = nxt
    for state in switch_from:
        out[state * 16 + E_SWITCH] = SWITCHED
    for state in states:
        out[state * 16 + E_FAIL] = ERROR
    return out


_SERVER_RX: Final = _table(
    {
        (IDLE, E_BEGIN): HEAD,
        (HEAD, E_HEAD_DONE): BODY,
        (BODY, E_COMPLETE): IDLE,
        (IDLE, E_ASK_UPGRADE): HOLD,  # the upgrade request completed
        (HOLD, E_ASK_UPGRADE): HOLD,  # llhttp then stops at it (HttpParserUpgrade)
        (CLOSED, E_ASK_UPGRADE): HOLD,  # ... also with Connection: close (a refusal then closes)
        (HOLD, E_RESUME): IDLE,
    },
    close={IDLE: CLOSED, HOLD: CLOSED, CLOSED: CLOSED, HEAD: ABANDONED, BODY: ABANDONED, ABANDONED: ABANDONED,
           SWITCHED: SWITCHED},
    switch_from=(IDLE, HEAD, BODY, HOLD, CLOSED, ABANDONED, SWITCHED),
    states=(IDLE, HEAD, BODY, HOLD, SWITCHED, CLOSED, ABANDONED, ERROR),
)
_SERVER_TX: Final = _table(
    {
        (WAIT, E_SEND): BODY,
        (DONE, E_SEND): BODY,
        (WAIT, E_SEND_SWITCH): SWITCHING,
        (DONE, E_SEND_SWITCH): SWITCHING,
        (BODY, E_END): DONE,
        # a head while another is in progress replaces it (the caller's choice); once a
        # 101 is out the switch stands, whatever is serialized after it
        (BODY, E_SEND): BODY,
        (BODY, E_SEND_SWITCH): SWITCHING,
        (SWITCHING, E_SEND): SWITCHING,
        (SWITCHING, E_SEND_SWITCH): SWITCHING,
        (SWITCHING, E_END): SWITCHING,
    },
    close={},
    switch_from=(SWITCHING, SWITCHED),
    states=(),
)
_CLIENT_RX: Final = _table(
    {
        (IDLE, E_REQUEST): AWAIT,
        (CLOSED, E_REQUEST): CLOSED,  # on a connection already closed: nothing will be parsed
        (ERROR, E_REQUEST): ERROR,
        (SWITCHED, E_REQUEST): SWITCHED,
        (AWAIT, E_BEGIN): HEAD,  # from IDLE or DONE there is no request outstanding: a protocol error
        (HEAD, E_HEAD_DONE): BODY,
        (BODY, E_COMPLETE): AWAIT,  # a 1xx: the final response follows
        (BODY, E_FINAL): DONE,
        (DONE, E_RESET): IDLE,
        (IDLE, E_RESET): IDLE,
    },
    close={IDLE: CLOSED, AWAIT: CLOSED, HEAD: CLOSED, BODY: CLOSED, DONE: CLOSED, CLOSED: CLOSED},
    switch_from=(AWAIT, HEAD, BODY, DONE, CLOSED),  # (a 2xx to CONNECT may be complete, even say close)
    states=(IDLE, AWAIT, HEAD, BODY, DONE, SWITCHED, CLOSED, ERROR),
)
_CLIENT_TX: Final = _table(
    {
        (IDLE, E_SEND): BODY,
        (IDLE, E_SEND_ALL): DONE,
        (BODY, E_END): DONE,
        (DONE, E_END): DONE,
        (IDLE, E_END): DONE,
        (DONE, E_RESET): IDLE,
        (IDLE, E_RESET): IDLE,
    },
    close={},
    switch_from=(),
    states=(),
)


def _go(table: dict[int, int], state: int, event: int, side: str) -> int:
    """The state after ``event``; a pair the table lacks is a bug in this module."""
    nxt = table.get(state * 16 + event, -1)
    if nxt < 0:
        raise RuntimeError(f"HTTP/1.1 {side}: no transition from {_STATE_NAMES[state]} on {_EVENT_NAMES[event]}")
    return nxt


def _http1x(d: bytes, i: int) -> str:
    """"1.1" or "1.0" when ``d[i:i + 8]`` is b"HTTP/1.1" or b"HTTP/1.0", else "": the
    version as the bytes fed carry it (httptools' get_http_version() formats a new str
    each time, ~2,300 instructions; byte compares, not a slice, under mypyc)."""
    if (len(d) > i + 7 and d[i] == 72 and d[i + 1] == 84 and d[i + 2] == 84 and d[i + 3] == 80
            and d[i + 4] == 47 and d[i + 5] == 49 and d[i + 6] == 46):
        minor = d[i + 7]
        if minor == 49:
            return "1.1"
        if minor == 48:
            return "1.0"
    return ""


def _protocol_error_from(exc: HttpParserError, status: int, who: str) -> ProtocolError:
    """Turn an httptools exception into our ProtocolError (keeping ours as is)."""
    ctx = exc.__context__
    if isinstance(exc, HttpParserCallbackError) and isinstance(ctx, ProtocolError):
        return ctx
    reason = str(exc) or type(exc).__name__
    if status == 400 and "Transfer-Encoding" in reason and "Content-Length" not in reason:
        # llhttp refuses "chunked, gzip" and repeated Transfer-Encoding itself
        status = 501
    err = ProtocolError(f"malformed HTTP/1.1 {who}: {reason}", status)
    err.__cause__ = exc
    return err


def _serialize_fields(lines: list[str], what: str) -> bytes:
    """Join head lines (given without their CRLF) into a head, refusing CR or LF
    inside any of them (smuggled in a value). Their text is joined once to look for
    CR and LF (`in`: a memchr) and once with the CRLFs: cheaper than counting CR and
    LF over the head (count() visits every character), ~3,000 instructions less for
    a 10-field head under mypyc."""
    content = "".join(lines)
    if "\r" in content or "\n" in content:
        bad = next(p for p in lines if "\r" in p or "\n" in p)
        raise ValueError(f"{what}: CR or LF inside a header line: {bad!r}")
    lines.append("")
    lines.append("")
    text = "\r\n".join(lines)  # (the two empty lines: the last line's CRLF and the blank line)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what}: header text is not latin-1: {exc}") from None


def _trailer_bytes(trailers: Sequence[tuple[str, str]]) -> bytes:
    if not trailers:
        return _LAST_CHUNK
    parts = ["0"]  # (the last chunk)
    for k, v in trailers:
        parts.append(f"{k}: {v}")
    return _serialize_fields(parts, "trailers")


# status -> (reason, "HTTP/1.1 <status> <reason>"): the last status line written for it
_STATUS_LINES: Final[dict[int, tuple[str, str]]] = {}


def _status_line(status: int, reason: str) -> str:
    """``HTTP/1.1 <status> <reason>`` (the standard phrase when ``reason`` is empty),
    made once per status and phrase (str(status) and the formatting: ~700 instructions)."""
    if not reason:
        reason = _REASONS.get(status, "")
    hit = _STATUS_LINES.get(status)
    if hit is not None and hit[0] == reason:
        return hit[1]
    line = f"HTTP/1.1 {status} {reason}"
    if hit is not None or len(_STATUS_LINES) < 128:
        _STATUS_LINES[status] = (reason, line)
    return line


def _chunk(data: bytes) -> bytes:
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


def _split_absolute(target: str) -> tuple[str, str, str] | None:
    """``http://h:p/x?y`` -> ("http", "h:p", "/x?y"); None if not absolute-form."""
    sep = target.find("://")
    if sep <= 0:
        return None
    scheme = target[:sep].lower()
    rest = target[sep + 3 :]
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if "@" in authority:  # drop userinfo, never forwarded as Host
        authority = authority.rsplit("@", 1)[1]
    path = rest[end:]
    hash_at = path.find("#")
    if hash_at >= 0:
        path = path[:hash_at]
    if not path.startswith("/"):
        path = "/" + path
    return scheme, authority, path


class _Exchange:
    """What the server remembers about a request until its response is done."""

    __slots__ = ("method", "version", "keep_alive", "upgrade", "complete")

    def __init__(self, method: str, version: str, keep_alive: bool, upgrade: str | None) -> None:
        self.method = method
        self.version = version
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.complete = False


# An exchange for answering a request that never parsed (400 to garbage).
def _error_exchange() -> _Exchange:
    ex = _Exchange("GET", "1.1", False, None)
    ex.complete = True
    return ex


class _HeadCollector:
    """Parser callbacks shared by both sides: collect one head's fields, body, trailers."""

    _who = "message"
    _status_bad = 400
    # llhttp's parser, set by H1Server and H1Client; _RELEASED once released. Declared here
    # only (with release()): mypyc gives an attribute a subclass declares again a second
    # entry in the class's GC traversal, and a child visited twice made the codec and its
    # parser a cycle the collector never freed.
    _parser: Any

    def _init_collector(self, limits: Limits, rx_table: dict[int, int]) -> None:
        self._rx_table = rx_table
        self._rx = IDLE  # receive-side state (see the tables at the top)
        self._limits = limits
        self._max_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._events: list[Event] = []
        self._raw: list[tuple[bytes, bytes]] = []  # trailer fields as llhttp hands them over
        # the head being collected: its fields decoded (on_header), the framing view (the
        # first value of each _SPECIAL name; _repeated: one of them came again), and the
        # bytes of its names and values as llhttp handed them over (for the size limit)
        self._headers: HeaderList = []
        self._first: dict[str, str] = {}
        self._repeated = False
        self._head_bytes = 0
        self._memo: list[_Field] = []  # the last head's fields by position (see _MEMO_FIELDS)
        self._memo_bytes = 0  # the bytes of the names and values remembered there
        # the same for heads serialized: the plain fields written last time by position in
        # the caller's list, and their lines (see _line)
        self._out_fields: list[tuple[str, str]] = []
        self._out_lines: list[str] = []
        self._out_bytes = 0  # the length of the lines remembered there
        self._msg_seq = 0
        self._head_carry = 0  # bytes fed to a still incomplete head, first feed excluded
        self._head_upper = 0  # bytes fed since the incomplete head began, first feed included
        self._feed_len = 0
        # The version of a message is read from its first line when that line is at the
        # start of the bytes fed (the common case): httptools' get_http_version() formats
        # a new str each time (~2,300 instructions). _line_data: the bytes of this feed if
        # a message may begin at their start; _begin: those of the current message.
        self._line_data = b""
        self._begin = b""

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; the events it completed (H1Server and H1Client say which)."""
        raise NotImplementedError

    def feed_eof(self) -> list[Event]:
        """The peer closed: the events that ends (or a ProtocolError)."""
        raise NotImplementedError

    def release(self) -> None:
        """The connection is over: drop the parser. llhttp's parser holds the codec's
        bound methods (its callbacks), a reference cycle, so without this a codec gone
        with its connection, and all it holds (the memo of the last head's fields), waits
        for the cyclic GC; a sidecar's young generation is collected only every 5,000
        net allocations (proxy/main.py), so under connection churn hundreds of them
        pile up, and the allocator keeps the pages of that peak (bench/README.md,
        rss.sh). Feeding a released codec raises ProtocolError."""
        self._parser = _RELEASED

    # The callbacks stay tiny (they run once per field); the head is decoded
    # and checked in one go by _take_head() once llhttp has seen all of it.
    def _rx_go(self, event: int) -> None:
        self._rx = _go(self._rx_table, self._rx, event, self._who)

    def _new_head(self) -> None:
        self._headers = []
        self._first = {}
        self._repeated = False
        self._head_bytes = 0
        if self._raw:
            self._raw = []

    def on_message_begin(self) -> None:
        self._new_head()
        self._rx_go(E_BEGIN)
        self._msg_seq += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        """One field: of the head (decoded at once: lower-case name, latin-1 value
        without trailing whitespace) or of the trailers (kept as bytes)."""
        if self._rx != HEAD:
            self._raw.append((name, value))
            return
        headers = self._headers
        i = len(headers)
        self._head_bytes += len(name) + len(value)
        memo = self._memo
        m: _Field | None = None
        if i < len(memo):
            m = memo[i]
            if m.raw_name == name and m.raw_value == value:  # (bytes compares: a length and a memcmp)
                headers.append(m.field)  # (the same tuple: nothing made)
                if m.special:
                    if m.name in self._first:
                        self._repeated = True
                    else:
                        self._first[m.name] = m.value
                return
        # names are token characters (llhttp checked): ASCII; each spelling seen is
        # lower-cased and decoded once (_NAMES)
        entry = _NAMES.get(name)
        if entry is None:
            entry = _name(name)
        lname, special = entry
        v = value
        if len(v) and (v[-1] == 32 or v[-1] == 9):  # (a method call only for a value that needs it)
            v = v.rstrip(b" \t")
        decoded = v.decode("latin-1")
        field: Any = (lname, decoded)  # (boxed once: the tuple the memo hands out again)
        headers.append(field)
        if special:
            if lname in self._first:
                self._repeated = True
            else:
                self._first[lname] = decoded
        if i < _MEMO_FIELDS:
            size = len(name) + len(value)
            held = self._memo_bytes - (len(m.raw_name) + len(m.raw_value) if m is not None else 0)  # without position i
            if len(value) > _MEMO_VALUE_BYTES or held + size > _MEMO_BYTES:  # not remembered: nothing held
                name = value = b""
                field = _NO_FIELD
                size = 0
            self._memo_bytes = held + size
            if m is not None:
                m.raw_name = name
                m.raw_value = value
                m.field = field
                m.name = field[0]
                m.value = field[1]
                m.special = special
            elif i == len(memo):
                memo.append(_Field(name, value, field, special))

    def _take_head(self, line_bytes: int) -> tuple[HeaderList, dict[str, str]]:
        """The head's fields (decoded by on_header) once the limits are checked, and
        the framing view: the first (only) value of each framing header (_SPECIAL),
        rebuilt by _specials_slow when one of them is repeated."""
        headers = self._headers
        if len(headers) > self._max_headers:
            self._too_big()
        if self._head_upper + self._feed_len > self._max_bytes:
            # the head may be over the limit (it can't be when the bytes fed
            # since it began are fewer): measure it
            if line_bytes + self._head_bytes + 4 * len(headers) > self._max_bytes:
                self._too_big()
        self._head_upper = 0
        if self._repeated:
            return headers, self._specials_slow(headers)
        return headers, self._first

    @staticmethod
    def _specials_slow(headers: HeaderList) -> dict[str, str]:
        """First value of each framing header; Connection/Transfer-Encoding values
        joined; "\0host-count" holds how many Host headers there were (if > 1)."""
        first: dict[str, str] = {}
        nhost = 0
        for n, v in headers:
            if n not in _SPECIAL:
                continue
            if n == "host":
                nhost += 1
            if n not in first:
                first[n] = v
            elif n == "connection" or n == "transfer-encoding":
                first[n] = f"{first[n]}, {v}"
        if nhost > 1:
            first[_HOST_COUNT] = str(nhost)
        return first

    def _take_trailers(self) -> HeaderList:
        raw = self._raw
        if not raw:
            return []
        self._raw = []
        if len(raw) > self._max_headers:
            raise ProtocolError(f"too many trailer fields (limit {self._max_headers})", self._status_bad)
        return [(n.lower().decode(), v.rstrip(b" \t").decode("latin-1")) for n, v in raw]

    def _line(self, i: int, field: tuple[str, str]) -> str:
        """``name: value`` for the plain field at position ``i`` of a head being
        serialized, remembered for the next head (its callers first look whether the
        field at ``i`` is the one remembered there, and take its line: no formatting)."""
        line = f"{field[0]}: {field[1]}"
        if i >= _MEMO_FIELDS:
            return line
        fields = self._out_fields
        lines = self._out_lines
        while len(fields) <= i:  # (positions of framing fields: a placeholder, with its own line)
            fields.append(_NO_FIELD)
            lines.append(": ")
        held = self._out_bytes - len(lines[i])  # without position i
        keep: Any = field
        kept = line
        if len(line) > _MEMO_VALUE_BYTES or held + len(line) > _MEMO_BYTES:  # not remembered: nothing held
            keep = _NO_FIELD
            kept = ": "
        fields[i] = keep
        lines[i] = kept
        self._out_bytes = held + len(kept)
        return line

    def _too_big(self) -> None:
        status = 431 if self._status_bad == 400 else self._status_bad
        raise ProtocolError(
            f"{self._who} head too large: more than {self._max_bytes} bytes or "
            f"{self._max_headers} header fields",
            status,
        )

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def _check_transfer_encoding(self, te: str | None) -> bool:
        """True if the message is chunked; refuses every other coding."""
        if te is None:
            return False
        if te.strip().lower() != "chunked":
            status = 501 if self._status_bad == 400 else self._status_bad
            raise ProtocolError(
                f"unsupported Transfer-Encoding {te!r} in {self._who}: only 'chunked' is accepted",
                status,
            )
        return True

    def _account_partial_head(self, seq_before: int, was_in_head: bool, nbytes: int) -> None:
        """Bound a head still incomplete after a feed (see the module notes)."""
        if self._rx == HEAD:
            if was_in_head and seq_before == self._msg_seq:
                self._head_carry += nbytes
                self._head_upper += nbytes
                if self._head_carry > self._max_bytes:
                    self._too_big()
            else:
                self._head_carry = 0
                self._head_upper = nbytes
        else:
            self._head_carry = 0
            self._head_upper = 0


def _connection_tokens(value: str | None) -> tuple[bool, bool]:
    """(has close, has keep-alive) among the Connection tokens."""
    if value is None:
        return False, False
    if value == "keep-alive":  # (the usual values, one token: no lower(), split or list)
        return False, True
    if value == "close":
        return True, False
    toks = [t.strip() for t in value.lower().split(",")]
    return "close" in toks, "keep-alive" in toks


# what pool.EventReader feeds: either side's codec
H1Codec = _HeadCollector


class H1Server(_HeadCollector):
    """One client connection, server side: parses requests, serializes responses."""

    _who = "request"
    _status_bad = 400

    def __init__(self, limits: Limits = _DEFAULT_LIMITS) -> None:
        self._init_collector(limits, _SERVER_RX)
        self._tx = WAIT  # send-side state
        self._parser = HttpRequestParser(self)
        self._url = b""
        self._pending: deque[_Exchange] = deque()
        self._error: ProtocolError | None = None  # raised again by every feed once rx is ERROR
        self._deferred: ProtocolError | None = None  # raised by the next feed (see the module notes)
        self._silent = False  # parsing the synthetic head (see _resume_body)
        self._body_after_upgrade: tuple[str, str] | None = None
        self._plain_after_upgrade = False  # an upgrade token we do not honour: go on as HTTP/1.1
        self._held = b""  # bytes received in HOLD (replayed after a refused upgrade)
        self._closing = False  # keep-alive is off: a response or EOF decided to close the connection
        # response in progress
        self._resp: _Exchange | None = None
        self._framing = _NONE
        self._remaining = 0
        self._resp_keep = True

    def _tx_go(self, event: int) -> None:
        self._tx = _go(_SERVER_TX, self._tx, event, "response")

    def _close_rx(self) -> None:
        self._rx = _go(_SERVER_RX, self._rx, E_CLOSE, "request")

    def _switch(self) -> None:
        self._rx = _go(_SERVER_RX, self._rx, E_SWITCH, "request")
        self._tx = _go(_SERVER_TX, self._tx, E_SWITCH, "response")

    # ----------------------------------------------------------- parsing
    def on_url(self, url: bytes) -> None:
        self._url = self._url + url if len(self._url) else url  # (no += on an empty bytes: a generic call)

    def on_message_begin(self) -> None:
        # inlined _HeadCollector.on_message_begin: this runs once per request
        self._new_head()
        rx = self._rx
        self._rx = HEAD if rx == IDLE else _go(_SERVER_RX, rx, E_BEGIN, "request")  # (the common pair inline)
        self._msg_seq += 1
        self._url = b""
        self._begin = self._line_data
        self._line_data = b""

    def _version(self, method: str) -> str:
        """The request's HTTP version: from its request line as fed when it is there
        whole (method SP target SP "HTTP/" DIGIT "." DIGIT CR, single spaces: llhttp is
        strict), else from httptools."""
        d = self._begin
        self._begin = b""
        at = len(method) + len(self._url) + 2  # "HTTP/"
        if len(d) > at + 8 and d[at + 8] == 13 and d[at - 1] == 32 and d[len(method)] == 32 and d[0] != 13 and d[0] != 10:
            version = _http1x(d, at)
            if version:
                return version
        parsed: str = self._parser.get_http_version()
        return parsed

    def on_headers_complete(self) -> None:
        self._head_carry = 0
        p = self._parser
        if self._silent:
            self._silent = False
            self._rx = _go(_SERVER_RX, self._rx, E_HEAD_DONE, "request")
            self._raw = []
            return
        url = self._url
        headers, first = self._take_head(len(url) + 16)
        # GET and POST from the request line as fed (see _version), else from httptools
        # (get_method() makes a bytes object, then decoded: ~650 instructions)
        d = self._begin
        if len(d) > 5 and d[0] == 71 and d[1] == 69 and d[2] == 84 and d[3] == 32:
            method = "GET"
        elif len(d) > 5 and d[0] == 80 and d[1] == 79 and d[2] == 83 and d[3] == 84 and d[4] == 32:
            method = "POST"
        else:
            method = p.get_method().decode("ascii")
        version = self._version(method)
        if version != "1.1" and version != "1.0":
            raise ProtocolError(f"HTTP version {version} not supported by the HTTP/1 codec", 505)
        host = first.get("host")
        if _HOST_COUNT in first:
            raise ProtocolError(f"request has {first[_HOST_COUNT]} Host headers", 400)
        if host is None and version == "1.1":
            raise ProtocolError("HTTP/1.1 request without a Host header", 400)
        chunked = self._check_transfer_encoding(first.get("transfer-encoding"))
        cl = first.get("content-length")
        has_body = chunked or (cl is not None and cl != "0" and cl.strip("0") != "")
        target = url.decode("latin-1")
        scheme = "http"
        authority = host or ""
        path = target
        upgrade: str | None = None
        if method == "CONNECT":
            upgrade = "connect"
            authority = target
            path = ""
            if has_body:
                raise ProtocolError("CONNECT request with a body", 400)
        else:
            if not target.startswith("/") and target != "*":
                parts = _split_absolute(target)
                if parts is None:
                    raise ProtocolError(f"request target {target!r} is neither origin- nor absolute-form", 400)
                scheme, authority, path = parts
                if not authority:
                    raise ProtocolError(f"absolute-form target {target!r} has no host", 400)
            # (llhttp's upgrade flag needs an Upgrade header but for CONNECT, served above)
            if "upgrade" in first and p.should_upgrade():
                token = first.get("upgrade", "").split(",", 1)[0].strip().lower()
                if has_body:
                    # the body has to be read as HTTP anyway: serve it as a plain request
                    self._body_after_upgrade = ("chunked", "") if chunked else ("length", cl or "0")
                elif token not in self._limits.upgrades:
                    self._plain_after_upgrade = True
                else:
                    upgrade = token or None
        keep_alive = p.should_keep_alive()
        expect = first.get("expect")
        head = RequestHead(
            method,
            target,
            headers,
            version,
            scheme,
            authority,
            path,
            keep_alive,
            expect is not None and expect.lower() == "100-continue",
            upgrade,
        )
        rx = self._rx
        self._rx = BODY if rx == HEAD else _go(_SERVER_RX, rx, E_HEAD_DONE, "request")
        self._events.append(head)
        self._pending.append(_Exchange(method, version, keep_alive, upgrade))

    def on_message_complete(self) -> None:
        rx = self._rx
        self._rx = IDLE if rx == BODY else _go(_SERVER_RX, rx, E_COMPLETE, "request")
        if self._body_after_upgrade is not None and not self._silent:
            # llhttp skipped the body of an Upgrade request; it is parsed next
            return
        ex = self._pending[-1]
        ex.complete = True
        self._events.append(EndOfMessage(self._take_trailers() if self._raw else []))
        if not ex.keep_alive:
            self._close_rx()
        elif ex.upgrade is not None:
            self._rx = _go(_SERVER_RX, self._rx, E_ASK_UPGRADE, "request")

    def feed(self, data: bytes) -> list[Event]:
        """Parse bytes from the client; return the events they complete."""
        rx = self._rx
        if rx == ERROR:
            assert self._error is not None
            raise self._error
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            self._error = err
            self._rx_go(E_FAIL)
            raise err
        if rx == SWITCHED:
            return [Data(data)] if data else []
        if self._tx == SWITCHING:
            self._switch()
            leftover = self._held + data
            self._held = b""
            return [Upgraded(leftover)]
        if rx == HOLD or rx == CLOSED or rx == ABANDONED:
            if rx == HOLD:
                self._held += data
            return []
        if self._held:  # after a refused upgrade: what arrived meanwhile comes first
            data = self._held + data
            self._held = b""
        if not data:
            return []
        self._run(data)
        events = self._events
        self._events = []
        return events

    def _run(self, data: bytes) -> None:
        seq, was_in_head = self._msg_seq, self._rx == HEAD
        self._feed_len = len(data)
        self._line_data = data if self._rx == IDLE else b""
        upgrade_at = -1
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as up:
            upgrade_at = up.args[0]
        except HttpParserError as exc:
            if self._rx == CLOSED or self._rx == ABANDONED:
                return  # llhttp refuses data after "Connection: close": ignore it
            self._fail(_protocol_error_from(exc, 400, "request"))
        except ProtocolError as exc:  # raised outside a callback (not expected)
            self._fail(exc)
        if upgrade_at >= 0:
            # (outside the except clause: the requests after it are parsed by a nested
            # _run, and an error there must keep its own cause, not the HttpParserUpgrade
            # being handled, as the __context__ _protocol_error_from reads)
            self._after_upgrade_request(data[upgrade_at:])
            return
        if self._rx == HEAD:
            try:
                self._account_partial_head(seq, was_in_head, len(data))
            except ProtocolError as exc:
                self._fail(exc)

    def _fail(self, err: ProtocolError) -> None:
        if self._events and self._rx != BODY:
            # earlier pipelined requests completed in this feed: hand them out first
            self._deferred = err
            return
        self._error = err
        self._rx_go(E_FAIL)
        self._events = []
        raise err

    def _after_upgrade_request(self, rest: bytes) -> None:
        if self._plain_after_upgrade:
            # llhttp stops after any Upgrade request: go on with a fresh parser
            self._plain_after_upgrade = False
            self._parser = HttpRequestParser(self)
            if rest and self._rx != CLOSED and self._rx != ABANDONED:
                self._run(rest)
            return
        if self._body_after_upgrade is not None:
            kind, cl = self._body_after_upgrade
            self._resume_body(kind, cl)
            if rest:
                self._run(rest)
            return
        self._rx_go(E_ASK_UPGRADE)
        self._held = rest

    def _resume_body(self, kind: str, cl: str) -> None:
        """Continue an Upgrade request's body on a fresh parser primed with a
        synthetic head carrying the same framing (its events are suppressed)."""
        ex = self._pending[-1]
        framing = "transfer-encoding: chunked" if kind == "chunked" else f"content-length: {cl}"
        close = "" if ex.keep_alive else "connection: close\r\n"
        synthetic = f"POST / HTTP/1.1\r\nhost: x\r\n{framing}\r\n{close}\r\n".encode("latin-1")
        self._parser = HttpRequestParser(self)
        self._silent = True
        self._parser.feed_data(synthetic)  # (IDLE -> HEAD -> BODY, no events)
        self._body_after_upgrade = None

    def feed_eof(self) -> list[Event]:
        """The client closed its side: [Reset] if it did so mid-request."""
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            self._error = err
            self._rx_go(E_FAIL)
            raise err
        self._closing = True
        rx = self._rx
        if rx == ERROR or rx == SWITCHED:
            return []
        self._close_rx()
        if rx == HEAD or rx == BODY or rx == ABANDONED:
            return [Reset("client closed the connection in the middle of a request")]
        return []

    # ----------------------------------------------------------- serializing
    def _current(self) -> _Exchange:
        if self._pending:
            return self._pending[0]
        return _error_exchange()

    def informational(self, head: ResponseHead) -> bytes:
        """A 1xx interim response (100 Continue, 103 Early Hints); b"" for HTTP/1.0 clients."""
        status = head.status
        if not 100 <= status < 200 or status == 101:
            raise ValueError(f"informational() takes a 1xx status other than 101, not {status}")
        if self._current().version == "1.0":
            return b""
        parts = [f"HTTP/1.1 {status} {head.reason or _REASONS.get(status, '')}"]
        for k, v in head.headers:
            if k not in _OWNED:
                parts.append(f"{k}: {v}")
        return _serialize_fields(parts, "informational response")

    def response_head(self, head: ResponseHead, *, end_stream: bool = False) -> bytes:
        """Serialize the final response head to the oldest unanswered request."""
        ex = self._current()
        status = head.status
        if status < 200 and status != 101:
            raise ValueError(f"status {status} is interim: use informational()")
        method = ex.method
        parts = [_status_line(status, head.reason)]
        cl: str | None = None
        close = not head.keep_alive
        switching = status == 101 or (method == "CONNECT" and status < 300)
        out_fields = self._out_fields
        i = -1
        for h in head.headers:
            i += 1
            if i < len(out_fields) and out_fields[i] == h:  # (a plain field written here last time)
                parts.append(self._out_lines[i])
                continue
            k, v = h
            if k in _OWNED:
                if k == "content-length":
                    cl = v
                elif k == "connection":
                    if switching:
                        parts.append(f"{k}: {v}")
                    elif "close" in v.lower():
                        close = True
                continue
            parts.append(self._line(i, h))
        if switching:
            if ex.upgrade is None:
                raise ValueError(f"status {status} answers a request that asked for no upgrade")
            framing = _NONE
            keep = False
            if status == 101 and not any(p.startswith("connection:") for p in parts):
                parts.append("connection: upgrade")
        else:
            if status == 204 or status < 200:
                framing = _NONE
            elif method == "HEAD" or status == 304:
                framing = _NONE
                if cl is not None:
                    parts.append(f"content-length: {cl}")
            elif cl is not None:
                cl = cl.strip()
                if not cl.isdigit():
                    raise ValueError(f"response content-length {cl!r} is not a number")
                framing = _LENGTH
                self._remaining = int(cl)
                parts.append(f"content-length: {cl}")
            elif end_stream:
                framing = _LENGTH
                self._remaining = 0
                parts.append("content-length: 0")
            elif ex.version == "1.1":
                framing = _CHUNKED
                parts.append("transfer-encoding: chunked")
            else:
                framing = _CLOSE
                close = True
            keep = (
                ex.keep_alive
                and not close
                and not self._closing
                and self._error is None
                and self._deferred is None
                and ex.upgrade != "connect"
            )
            if not keep:
                parts.append("connection: close")
            elif ex.version == "1.0":
                parts.append("connection: keep-alive")
        out = _serialize_fields(parts, "response head")
        self._resp = ex
        tx = self._tx
        if not switching and (tx == WAIT or tx == DONE):
            self._tx = BODY  # (the common pair inline)
        else:
            self._tx = _go(_SERVER_TX, tx, E_SEND_SWITCH if switching else E_SEND, "response")
        self._framing = framing
        self._resp_keep = keep
        if not keep:
            self._closing = True
        if end_stream and not switching:
            self._finish(ex)
        return out

    def data(self, data: bytes) -> bytes:
        """Frame a piece of response body (b"" where no body is allowed)."""
        framing = self._framing
        if framing == _CHUNKED:
            return _chunk(data) if data else b""
        if framing == _LENGTH:
            self._remaining -= len(data)
            if self._remaining < 0:
                raise ValueError("response body longer than its content-length")
            return data
        if framing == _CLOSE:
            return data
        return b""

    def end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """Finish the response body; trailers are only sent with chunked framing."""
        ex = self._resp
        if ex is None:
            raise RuntimeError("end() without response_head()")
        framing = self._framing
        out = b""
        if framing == _CHUNKED:
            out = _trailer_bytes(trailers)
        elif framing == _LENGTH and self._remaining > 0:
            raise ValueError(f"response body {self._remaining} bytes shorter than its content-length")
        self._finish(ex)
        return out

    def _finish(self, ex: _Exchange) -> None:
        self._resp = None
        tx = self._tx
        self._tx = DONE if tx == BODY else _go(_SERVER_TX, tx, E_END, "response")
        self._framing = _NONE
        if self._pending and self._pending[0] is ex:
            self._pending.popleft()
        if not ex.complete:  # answered before the request body was read
            self._closing = True
        if self._closing:
            self._close_rx()
        elif ex.upgrade is not None and self._tx != SWITCHING:
            # upgrade refused: the connection goes on as HTTP/1.1 (held bytes first)
            self._rx_go(E_RESUME)
            self._parser = HttpRequestParser(self)

    @property
    def keep_alive(self) -> bool:
        """Can another request follow on this connection after this exchange."""
        tx = self._tx
        if tx == DONE:  # the last exchange is over and kept the connection
            current_ok = True
        elif self._resp is not None:
            current_ok = self._resp_keep
        else:  # the oldest request is not answered yet
            current_ok = not self._pending or self._pending[0].keep_alive
        return (
            current_ok
            and not self._closing
            and self._rx != ERROR
            and self._deferred is None
            and tx != SWITCHING
            and tx != SWITCHED
        )

    @property
    def receiving_head(self) -> bool:
        """The first bytes of a request have arrived and its head is not complete yet."""
        return self._rx == HEAD

    def upgrade_accepted(self) -> bytes:
        """After a 101 (2xx to CONNECT): the bytes received past the request, to relay as is."""
        if self._tx != SWITCHING:
            raise RuntimeError("upgrade_accepted() before a 101 / 2xx-to-CONNECT response_head()")
        self._switch()
        self._resp = None
        leftover = self._held
        self._held = b""
        return leftover


class H1Client(_HeadCollector):
    """One upstream connection, client side: serializes requests, parses responses."""

    _who = "upstream response"
    _status_bad = 502

    def __init__(self, limits: Limits = _DEFAULT_LIMITS) -> None:
        self._init_collector(limits, _CLIENT_RX)
        self._tx = IDLE  # send-side state
        self._parser = HttpResponseParser(self)
        self._reason = b""
        self._method: str | None = None  # of the outstanding request
        self._head_only = False  # HEAD/CONNECT: stop llhttp at the end of the final head
        self._buf = b""
        self._status = 0
        self._close_delimited = False
        self._resp_keep = True  # keep-alive, as far as the response goes
        self._req_close = False
        self._asked_upgrade = False
        self._framing = _NONE
        self._remaining = 0
        self._error: ProtocolError | None = None

    def _tx_go(self, event: int) -> None:
        self._tx = _go(_CLIENT_TX, self._tx, event, "request")

    @property
    def _awaiting(self) -> bool:
        """A final response is still expected."""
        rx = self._rx
        return rx == AWAIT or rx == HEAD or rx == BODY

    # ----------------------------------------------------------- serializing
    def request_head(self, head: RequestHead, *, end_stream: bool = False) -> bytes:
        """Serialize a request head (origin-form target, Host from authority)."""
        if self._tx != IDLE:
            if not (self._tx == DONE and (self._rx == DONE or self._rx == CLOSED)):
                raise RuntimeError("previous exchange on this connection is not finished")
            self.reset_for_next()
        method = head.method
        if method == "CONNECT":
            target = head.authority or head.target
        else:
            target = head.path or "/"
        parts = [f"{method} {target} HTTP/1.1", ""]
        have_host = False
        cl: str | None = None
        chunked = False
        close = False
        asked_upgrade = False
        out_fields = self._out_fields
        i = -1
        for h in head.headers:
            i += 1
            if i < len(out_fields) and out_fields[i] == h:  # (a plain field written here last time)
                parts.append(self._out_lines[i])
                continue
            k, v = h
            if k == "host":
                if have_host:
                    continue
                have_host = True
                parts[1] = f"host: {v}"
                continue
            if k == "content-length":
                cl = v
                continue
            if k == "transfer-encoding":
                chunked = "chunked" in v.lower()
                continue
            if k == "connection":
                lv = v.lower()
                close = close or "close" in lv
                asked_upgrade = asked_upgrade or "upgrade" in lv
                parts.append(f"{k}: {v}")
                continue
            parts.append(self._line(i, h))
        if not have_host:
            if not head.authority:
                raise ValueError("request has neither a host header nor an authority")
            parts[1] = f"host: {head.authority}"
        if cl is not None:
            cl = cl.strip()
            if not cl.isdigit():
                raise ValueError(f"request content-length {cl!r} is not a number")
            framing = _LENGTH
            self._remaining = int(cl)
            parts.append(f"content-length: {cl}")
        elif chunked or (not end_stream and method not in _BODYLESS_METHODS):
            framing = _CHUNKED
            parts.append("transfer-encoding: chunked")
        else:
            framing = _NONE
        out = _serialize_fields(parts, "request head")
        self._method = method
        self._head_only = method == "HEAD" or method == "CONNECT"
        self._framing = framing
        self._req_close = close
        self._asked_upgrade = asked_upgrade
        if end_stream:
            if framing == _CHUNKED:
                out += _LAST_CHUNK
            elif framing == _LENGTH and self._remaining:
                raise ValueError("end_stream=True with a non-zero content-length")
        tx, rx = self._tx, self._rx
        if tx == IDLE:  # (the common pairs inline)
            self._tx = DONE if end_stream else BODY
        else:
            self._tx = _go(_CLIENT_TX, tx, E_SEND_ALL if end_stream else E_SEND, "request")
        self._rx = AWAIT if rx == IDLE else _go(_CLIENT_RX, rx, E_REQUEST, "upstream response")
        return out

    def data(self, data: bytes) -> bytes:
        """Frame a piece of request body."""
        framing = self._framing
        if framing == _CHUNKED:
            return _chunk(data) if data else b""
        if framing == _LENGTH:
            self._remaining -= len(data)
            if self._remaining < 0:
                raise ValueError("request body longer than its content-length")
            return data
        if data:
            raise ValueError(
                f"{self._method} request was sent without body framing: give it a "
                "content-length or transfer-encoding, or don't pass end_stream=True"
            )
        return b""

    def end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """Finish the request body."""
        framing = self._framing
        self._tx_go(E_END)
        self._framing = _NONE
        if framing == _CHUNKED:
            return _trailer_bytes(trailers)
        if framing == _LENGTH and self._remaining > 0:
            raise ValueError(f"request body {self._remaining} bytes shorter than its content-length")
        return b""

    # ----------------------------------------------------------- parsing
    def on_message_begin(self) -> None:
        if self._rx != AWAIT:
            raise ProtocolError("upstream sent a response with no request outstanding", 502)
        # inlined _HeadCollector.on_message_begin: this runs once per response
        self._new_head()
        self._rx = HEAD  # (AWAIT, BEGIN) -> HEAD
        self._msg_seq += 1
        self._reason = b""
        self._begin = self._line_data
        self._line_data = b""

    def _version(self) -> str:
        """The response's HTTP version: from its status line as fed when it is there
        ("HTTP/" DIGIT "." DIGIT SP), else from httptools."""
        d = self._begin
        self._begin = b""
        if len(d) > 8 and d[8] == 32:
            version = _http1x(d, 0)
            if version:
                return version
        parsed: str = self._parser.get_http_version()
        return parsed

    def on_status(self, reason: bytes) -> None:
        self._reason = self._reason + reason if len(self._reason) else reason

    def on_headers_complete(self) -> None:
        rx = self._rx
        self._rx = BODY if rx == HEAD else _go(_CLIENT_RX, rx, E_HEAD_DONE, "upstream response")
        self._head_carry = 0
        p = self._parser
        headers, first = self._take_head(len(self._reason) + 16)
        status: int = p.get_status_code()  # (typed: compared natively, not as an Any six times)
        version = self._version()
        if version != "1.1" and version != "1.0":
            raise ProtocolError(f"upstream answered with HTTP version {version}", 502)
        self._status = status
        reason = self._reason.decode("latin-1")
        if status == 101 and not self._asked_upgrade:
            raise ProtocolError("upstream switched protocols (101) without being asked to", 502)
        if status < 200 and status != 101:
            self._events.append(ResponseHead(status, headers, reason, version, True))
            return
        chunked = self._check_transfer_encoding(first.get("transfer-encoding"))
        cl = first.get("content-length")
        close, ka = _connection_tokens(first.get("connection"))
        keep = (ka and not close) if version == "1.0" else not close
        method = self._method
        bodyless = method == "HEAD" or status == 204 or status == 304 or status == 101
        if method == "CONNECT" and status < 300:
            bodyless = True
        self._close_delimited = not bodyless and not chunked and cl is None
        if self._close_delimited or self._req_close:
            keep = False
        self._resp_keep = keep
        self._events.append(ResponseHead(status, headers, reason, version, keep))

    def on_message_complete(self) -> None:
        if self._status < 200:  # 1xx: the final response follows (101: Upgraded follows)
            self._rx = _go(_CLIENT_RX, self._rx, E_COMPLETE, "upstream response")
            return
        self._final_done()

    def _final_done(self) -> None:
        rx = self._rx
        self._rx = DONE if rx == BODY else _go(_CLIENT_RX, rx, E_FINAL, "upstream response")
        self._events.append(EndOfMessage(self._take_trailers() if self._raw else []))
        if not self._resp_keep:
            self._rx = _go(_CLIENT_RX, self._rx, E_CLOSE, "upstream response")

    def feed(self, data: bytes) -> list[Event]:
        """Parse bytes from upstream; return the events they complete."""
        rx = self._rx
        if rx == ERROR:
            assert self._error is not None
            raise self._error
        if rx == SWITCHED:
            return [Data(data)] if data else []
        if rx == CLOSED or not data:
            return []
        if self._head_only:
            self._feed_head_only(data)
        else:
            self._run(data)
        events = self._events
        self._events = []
        return events

    def _run(self, data: bytes) -> None:
        seq, was_in_head = self._msg_seq, self._rx == HEAD
        self._feed_len = len(data)
        self._line_data = data if self._rx == AWAIT else b""
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as up:  # 101 Switching Protocols
            self._upgrade(data[up.args[0] :])
            return
        except HttpParserError as exc:
            if self._rx == CLOSED:
                return
            self._fail(_protocol_error_from(exc, 502, "upstream response"))
        except ProtocolError as exc:
            self._fail(exc)
        if self._rx == HEAD:
            try:
                self._account_partial_head(seq, was_in_head, len(data))
            except ProtocolError as exc:
                self._fail(exc)

    def _feed_head_only(self, data: bytes) -> None:
        """Responses to HEAD and CONNECT: llhttp cannot be told they have no
        body, so hand it exactly one head at a time and decide here."""
        buf = self._buf + data if self._buf else data
        self._buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                lf = buf.find(b"\n\n")
                if lf >= 0:  # a head ended by bare LFs: llhttp (strict) refuses it
                    try:
                        self._parser.feed_data(buf[: lf + 2])
                    except HttpParserError as exc:
                        self._fail(_protocol_error_from(exc, 502, "upstream response"))
                    self._fail(ProtocolError("malformed upstream response: head ends with bare LF", 502))
                if len(buf) > self._max_bytes:
                    self._fail(ProtocolError(f"upstream response head larger than {self._max_bytes} bytes", 502))
                self._buf = buf
                return
            head, buf = buf[: end + 4], buf[end + 4 :]
            self._feed_len = len(head)
            self._line_data = head
            try:
                self._parser.feed_data(head)
            except HttpParserUpgrade:
                self._upgrade(buf)
                return
            except HttpParserError as exc:
                self._fail(_protocol_error_from(exc, 502, "upstream response"))
            if self._status < 200:  # interim response, llhttp completed it
                continue
            self._head_only = False
            if self._method == "CONNECT" and self._status < 300:
                self._upgrade(buf)
                return
            if self._method == "HEAD":
                if self._awaiting:  # llhttp waits for a body that will not come
                    self._final_done()
                self._parser = HttpResponseParser(self)
            if buf and self._rx != CLOSED:
                self._run(buf)
            return

    def _upgrade(self, leftover: bytes) -> None:
        self._rx = _go(_CLIENT_RX, self._rx, E_SWITCH, "upstream response")
        self._events.append(Upgraded(leftover))

    def _fail(self, err: ProtocolError) -> None:
        self._error = err
        self._rx = _go(_CLIENT_RX, self._rx, E_FAIL, "upstream response")
        self._events = []
        raise err

    def feed_eof(self) -> list[Event]:
        """Upstream closed: EndOfMessage ends a close-delimited body; Reset if truncated."""
        rx = self._rx
        if rx == ERROR or rx == SWITCHED or rx == CLOSED:
            return []
        self._resp_keep = False
        if rx == BODY and self._close_delimited:
            self._final_done()  # (-> DONE -> CLOSED: the response did not keep the connection)
            events = self._events
            self._events = []
            return events
        self._rx = _go(_CLIENT_RX, rx, E_CLOSE, "upstream response")
        if rx == AWAIT or rx == HEAD or rx == BODY:
            if rx != AWAIT or self._buf:
                return [Reset("upstream closed the connection in the middle of the response")]
            return [Reset("upstream closed the connection before responding")]
        return []

    @property
    def keep_alive(self) -> bool:
        """Can the connection carry another request once this exchange is over."""
        rx = self._rx
        return (
            rx != ERROR
            and rx != SWITCHED
            and rx != CLOSED
            and self._resp_keep
            and (self._tx == IDLE or (self._tx == DONE and rx == DONE))
        )

    def reset_for_next(self) -> None:
        """Make the codec ready for the next request on a kept-alive connection."""
        if not self.keep_alive:
            raise RuntimeError("this connection cannot carry another request")
        self.next_exchange()

    def next_exchange(self) -> None:
        """``reset_for_next`` for a caller that has just seen ``keep_alive`` True."""
        self._method = None
        tx, rx = self._tx, self._rx
        self._tx = IDLE if tx == DONE else _go(_CLIENT_TX, tx, E_RESET, "request")
        self._rx = IDLE if rx == DONE else _go(_CLIENT_RX, rx, E_RESET, "upstream response")
        self._head_only = False
        self._status = 0
        self._close_delimited = False
        self._framing = _NONE
        self._remaining = 0
