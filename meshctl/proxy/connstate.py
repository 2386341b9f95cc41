"""One downstream connection as the runtime's watchdog and drain see it (``ConnState``,
and ``H2ConnState`` for an HTTP/2 one).

Compiled with mypyc (setup.py's COMPILED), in the library every sidecar loads: the
HTTP/1.1 loop (http.py) stores a connection's deadline, busy flag, request and start
time here on every request, native attribute writes when compiled. H2ConnState
(whose connection, h2conn.py, is in the HTTP/2 library) subclasses ConnState here:
a compiled class can only inherit from compiled ones.
"""

from __future__ import annotations

import math
from typing import Any

import meshctl.proxy.aio as aio


class ConnState:
    """One downstream connection, as the runtime sees it.

    ``deadline`` (trio clock) is when the connection is closed if it is still
    waiting for a request head: the runtime's watchdog checks it a few times
    a second. A float store per request is much cheaper than moving a cancel
    scope's deadline, and header/idle timeouts don't need finer resolution.
    ``busy`` is False between requests (drain closes those at once)."""

    __slots__ = ("scope", "busy", "deadline", "rq", "since", "stream", "backend", "server", "accepted_on")

    def __init__(self, stream: Any = None, backend: Any = None, accepted_on: Any = None) -> None:
        self.accepted_on = accepted_on  # the listener (backend's) it came in on: a removed one drains it
        self.server: Any = None  # HTTP/1.1: its H1Server; the watchdog asks it whether a head has begun
        self.scope = aio.CancelScope()
        self.busy = False
        self.deadline = math.inf
        self.rq: Any = None  # the request.Request in progress, or None
        self.since = 0.0  # when it started
        self.stream = stream  # the downstream stream
        self.backend = backend  # the runtime's network backend (backend.py): it tells a gone peer

    def client_gone(self) -> bool:
        """Has the client closed its side while we wait for the upstream?
        (The backend looks: one MSG_PEEK on sockets; pipelined bytes mean it is
        still there.) Like Envoy, a downstream half-close before the response
        counts as gone."""
        rq = self.rq
        if self.stream is None or self.backend is None or rq is None or rq.response_started:
            return False
        if not rq.body_read():
            return False  # still reading the body: a close shows up there
        return bool(self.backend.peer_gone(self.stream))


class H2ConnState(ConnState):
    """A downstream HTTP/2 connection as the runtime sees it: always ``busy``
    (drain sends GOAWAY instead of cutting it), ``deadline`` is the idle
    timeout while no stream is open. ``h2`` is h2conn's connection."""

    __slots__ = ("h2",)

    def __init__(self, base: ConnState, h2conn: Any) -> None:
        super().__init__(base.stream, base.backend, base.accepted_on)
        self.scope = base.scope
        self.busy = True
        self.h2 = h2conn

    def drain(self) -> None:
        self.h2.start_drain()
