"""What the supervisor knows of the mesh while it runs: plain mutable records.

``MeshContext`` is what every part of the supervisor shares (the state
directory, mesh.yaml as now in force, the mesh's phase, whether it is
stopping, the nursery its tasks run in, and how to report an event); the
Supervisor makes it and hands it to each collaborator it declares. ``ProcState``
is one supervised process, ``InstanceState`` one workload instance (its app,
its sidecar, its health streaks and registration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from ..model.mesh import MeshSpec
from ..model.proxyconfig import Node
from .lifecycle import Health, InstancePhase, MeshPhase, ProcPhase
from .plan import WorkloadPlan


@dataclass
class MeshContext:
    state_dir: Path
    logs: Path
    spec: MeshSpec  # mesh.yaml as now in force (replaced by a reload)
    event: Callable[[str], None]  # log, tell `up`, write status.json
    changed: Callable[[], None]  # write status.json only
    phase: MeshPhase = MeshPhase.STARTING
    shutting_down: bool = False
    nursery: trio.Nursery | None = None  # the supervisor's, while it runs

    def tasks(self) -> trio.Nursery:
        assert self.nursery is not None, "the supervisor is not running"
        return self.nursery


@dataclass
class ProcState:
    name: str
    kind: str  # app | sidecar | gateway | control-plane
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: Path
    pid: int | None = None
    restarts: int = 0
    state: ProcPhase = ProcPhase.STARTING
    last_event: str = ""
    process: trio.Process | None = None
    # control-plane roles: (port, path) that answers once the process serves; after a
    # restart the state goes starting → ready by it (not "restarting" for ever)
    ready_check: tuple[int, str] | None = None
    # why the supervisor itself stopped it to start it again at once (a reload), or ""
    restart_requested: str = ""


@dataclass
class InstanceState:
    plan: WorkloadPlan
    node: Node  # what its sidecar was started with (nodes/<name>.json)
    app: ProcState | None
    proxy: ProcState
    state: InstancePhase = InstancePhase.STARTING
    registered: bool = False
    ok_streak: int = 0
    fail_streak: int = 0
    fast_checks: bool = True  # health checks every FAST_CHECK until first registered (lifecycle.next_check)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    # One registry call at a time per instance: a renewal that finds the
    # instance gone re-registers it, which must not undo a deregistration.
    lock: trio.Lock = field(default_factory=trio.Lock)

    def health(self) -> Health:
        return Health(self.state, self.registered, self.ok_streak, self.fail_streak)

    def set_health(self, h: Health) -> None:
        self.state, self.ok_streak, self.fail_streak = h.phase, h.ok_streak, h.fail_streak
