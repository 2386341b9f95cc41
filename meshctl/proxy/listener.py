"""``ActiveListener``: a bound listener's state, and the stage chain its requests run.

Compiled with mypyc (setup.py's COMPILED): the HTTP/1.1 and HTTP/2 connection
handlers ask ``steps_for`` once per request, a native method call. The runtime
(runtime.py) owns the listener life cycle; this holds what a connection reads.
"""

from __future__ import annotations

from typing import Any, Callable

import meshctl.proxy.aio as aio
from ..model.proxyconfig import Listener
from .overload import Condition
from .request import Stage
from .snapshot import Snapshot
from .stages import default_chain

__all__ = ["ActiveListener"]

Steps = tuple[tuple[Callable[[Any], Any] | None, Stage], ...]


class ActiveListener:
    __slots__ = ("spec", "sock", "chain", "steps", "chain_snap", "scope", "active", "overload")

    def __init__(self, spec: Listener, sock: Any, snap: Snapshot) -> None:
        self.sock = sock  # the backend's listener (None in tests that serve a stream directly)
        self.scope = aio.CancelScope()
        self.active = 0  # connections accepted and not closed (overload.py's limit)
        self.overload = Condition(f"listener {spec.name}: connection limit")
        self.set_spec(spec, snap)

    def set_spec(self, spec: Listener, snap: Snapshot) -> None:
        """New connections use the new spec; open ones keep what they started with.
        The chain: the stages ``snap`` uses (stages.default_chain)."""
        self.spec = spec
        self._set_chain(default_chain(spec, snap), snap)

    def chain_for(self, snap: Snapshot) -> tuple[Stage, ...]:
        """The stages a request served under ``snap`` runs (rebuilt when the snapshot
        is not the one the chain was built for: a connection of a listener that a
        later config removed or moved still serves under the newest snapshot)."""
        self.steps_for(snap)
        return self.chain

    def steps_for(self, snap: Snapshot) -> Steps:
        """``chain_for(snap)`` as (``decide`` or None, stage) pairs: a stage with a
        synchronous ``decide`` is run without a coroutine (request.Stage). Asked once
        per request: the common case is one identity test."""
        if self.chain_snap is not snap:
            self._set_chain(default_chain(self.spec, snap), snap)
        return self.steps

    def _set_chain(self, chain: tuple[Stage, ...], snap: Snapshot) -> None:
        self.chain = chain
        self.steps = tuple((getattr(st, "decide", None), st) for st in chain)
        self.chain_snap = snap

    @property
    def bound_port(self) -> int:
        return int(self.sock.bound_port)
