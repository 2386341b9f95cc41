"""The version-neutral event vocabulary between codecs and the proxy pipeline.

HTTP/1.1 (protocol.http1) and HTTP/2 (protocol.http2) codecs both turn bytes
into these events and these events into bytes, so routing, filters and
telemetry never know which version is on the wire.

Headers are lists of ``(name, value)`` str pairs: names lower-case, values
as received (latin-1 decoded), order and repeats kept. HTTP/2 pseudo-headers
never appear here: they are carried by the fields of the head events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dataclass_slots import DATACLASS_SLOTS
from ..model.base import HeaderList as HeaderList  # re-exported (defined in model/: core/ uses it too)

# The event classes have __slots__ in the pure-Python build, none under mypyc (DATACLASS_SLOTS).

# The events made for every request (RequestHead, ResponseHead, Data, EndOfMessage) write
# their __init__ out: dataclass() keeps an __init__ the class defines. Under mypyc the
# one dataclass() generates is interpreted Python (exec'd at import, storing each field
# through a descriptor: ~3,300 instructions per RequestHead against a few hundred for a
# compiled one); in the pure build the two are the same code. Same parameters, order and
# defaults as the fields.


@dataclass(**DATACLASS_SLOTS)
class RequestHead:
    method: str
    target: str  # as sent: origin-form "/a?b", absolute-form "http://h/a", authority-form for CONNECT
    headers: HeaderList
    http_version: str = "1.1"  # "1.0" | "1.1" | "2"
    scheme: str = "http"
    authority: str = ""  # Host header or :authority; for absolute-form, the URL's host[:port]
    path: str = "/"  # path and query, origin-form
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: str | None = None  # "websocket", "h2c", ... when the client asked for one
    stream_id: int = 0  # HTTP/2 stream; 0 for HTTP/1

    def __init__(self, method: str, target: str, headers: HeaderList, http_version: str = "1.1",
                 scheme: str = "http", authority: str = "", path: str = "/", keep_alive: bool = True,
                 expect_continue: bool = False, upgrade: str | None = None, stream_id: int = 0) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.stream_id = stream_id


@dataclass(**DATACLASS_SLOTS)
class ResponseHead:
    status: int
    headers: HeaderList
    reason: str = ""
    http_version: str = "1.1"
    keep_alive: bool = True
    stream_id: int = 0

    def __init__(self, status: int, headers: HeaderList, reason: str = "", http_version: str = "1.1",
                 keep_alive: bool = True, stream_id: int = 0) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.stream_id = stream_id


@dataclass(**DATACLASS_SLOTS)
class Data:
    data: bytes
    stream_id: int = 0

    def __init__(self, data: bytes, stream_id: int = 0) -> None:
        self.data = data
        self.stream_id = stream_id


@dataclass(**DATACLASS_SLOTS)
class EndOfMessage:
    trailers: HeaderList = field(default_factory=list)
    stream_id: int = 0

    def __init__(self, trailers: HeaderList | None = None, stream_id: int = 0) -> None:
        self.trailers = [] if trailers is None else trailers  # (a new list each: default_factory's rule)
        self.stream_id = stream_id


@dataclass(**DATACLASS_SLOTS)
class Reset:
    """The peer abandoned the message (RST_STREAM, or a connection closed mid-body)."""

    reason: str = ""
    stream_id: int = 0


@dataclass(**DATACLASS_SLOTS)
class Upgraded:
    """After a 101 (or a 2xx to CONNECT) the connection carries opaque bytes.

    ``leftover`` holds bytes already received past the head, to be relayed first.
    """

    leftover: bytes = b""


Event = RequestHead | ResponseHead | Data | EndOfMessage | Reset | Upgraded


class ProtocolError(Exception):
    """The peer broke the protocol. ``status`` is what to answer a client with
    (400, 431, 501, ...); the connection is closed after answering."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def header_value(headers: HeaderList, name: str) -> str | None:
    """The first value of ``name`` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None
