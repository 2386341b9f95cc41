"""The supervisor's lifecycle rules, pure: no trio, no I/O; time comes in as ``now``.

The rules, one line each (the supervisor's async loops ask these functions and
carry out the verdict; tests/unit/test_lifecycle.py proves each rule by name):

    health check   | when                                               | verdict
    ---------------+----------------------------------------------------+----------------------------------
    app and sidecar| ok_streak >= healthy_threshold, and not registered | Register
      both pass    |   or not READY                                     |
                   | otherwise                                          | Nothing
    either fails   | registered and fail_streak >= unhealthy_threshold  | Deregister → UNHEALTHY (app failed)
                   |   (1 while RESTARTING: a process already died)     |   or RESTARTING (sidecar failed)
                   | otherwise                                          | Nothing

    process exit   | when                                               | verdict
    ---------------+----------------------------------------------------+----------------------------------
                   | the mesh is shutting down, or the process STOPPED  | GiveUp
                   | the supervisor stopped it to restart it (a reload) | Restart(after=0), backoff starts over
                   | it ran longer than STABLE_UPTIME                   | Restart(after=BACKOFF_START)
                   | otherwise                                          | Restart(after=backoff), then doubled
                   |                                                    |   up to BACKOFF_MAX
    cannot spawn   | always                                             | Restart(after=backoff), then doubled

    health checks run every FAST_CHECK seconds until an instance is first
    registered (so `up` is quick), then every healthCheck.interval.
    Registrations are renewed at the registry's cadence: its keep-alive interval,
    else a third of its TTL, else DEFAULT_KEEPALIVE; never more often than MIN_KEEPALIVE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

BACKOFF_START = 0.5  # seconds before the first restart of a process that died
BACKOFF_MAX = 30.0  # the longest wait between restarts
STABLE_UPTIME = 10.0  # a process that ran longer than this starts again at BACKOFF_START
FAST_CHECK = 0.05  # seconds between health checks until the first registration
DEFAULT_KEEPALIVE = 5.0
MIN_KEEPALIVE = 0.2


class ProcPhase(StrEnum):
    """A process's state, as status.json shows it."""

    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"  # a control-plane role or gateway whose ready check answers
    RESTARTING = "restarting"
    FAILED = "failed"  # cannot be spawned (retried with backoff)
    STOPPED = "stopped"


class InstancePhase(StrEnum):
    """A workload instance's state (app + sidecar), as status.json shows it."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"


class MeshPhase(StrEnum):
    """The whole mesh's state, as status.json shows it."""

    STARTING = "starting"
    RUNNING = "running"
    UPDATING = "updating"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# ------------------------------------------------------------------ health


@dataclass(frozen=True)
class Health:
    """What the health rules read of an instance."""

    phase: InstancePhase
    registered: bool
    ok_streak: int = 0
    fail_streak: int = 0


@dataclass(frozen=True)
class Thresholds:
    healthy: int = 1
    unhealthy: int = 1


@dataclass(frozen=True)
class Register:
    pass


@dataclass(frozen=True)
class Deregister:
    phase: InstancePhase  # the instance's state once out of the endpoints
    failed: str  # "app" or "sidecar": whose check failed
    streak: int  # how many checks failed in a row


@dataclass(frozen=True)
class Nothing:
    pass


HealthVerdict = Register | Deregister | Nothing


def on_health(h: Health, app_ok: bool, proxy_ok: bool, t: Thresholds) -> tuple[Health, HealthVerdict]:
    """One health check's outcome: the instance's new streaks and what to do."""
    if app_ok and proxy_ok:
        h = replace(h, ok_streak=h.ok_streak + 1, fail_streak=0)
        if h.ok_streak >= t.healthy and (not h.registered or h.phase != InstancePhase.READY):
            return h, Register()
        return h, Nothing()
    h = replace(h, fail_streak=h.fail_streak + 1, ok_streak=0)
    threshold = 1 if h.phase == InstancePhase.RESTARTING else t.unhealthy
    if h.registered and h.fail_streak >= threshold:
        if proxy_ok or not app_ok:
            return h, Deregister(InstancePhase.UNHEALTHY, "app", h.fail_streak)
        return h, Deregister(InstancePhase.RESTARTING, "sidecar", h.fail_streak)
    return h, Nothing()


def on_process_lost(h: Health) -> Health:
    """An instance's app or sidecar died: it is restarting and its ok streak starts over."""
    return replace(h, phase=InstancePhase.RESTARTING, ok_streak=0)


def next_check(fast: bool, registered: bool, interval: float) -> tuple[float, bool]:
    """(seconds to the next health check, whether still in the fast phase)."""
    if fast and not registered:
        return FAST_CHECK, True
    return interval, False


# ------------------------------------------------------------------ restarts


@dataclass(frozen=True)
class Restart:
    after: float  # seconds to wait before starting it again
    backoff: float  # the wait after the next exit, unless it runs long enough


@dataclass(frozen=True)
class GiveUp:
    pass


ExitVerdict = Restart | GiveUp


def on_exit(phase: ProcPhase, backoff: float, started: float, now: float, *, shutting_down: bool,
            requested: bool = False) -> ExitVerdict:
    """A supervised process exited at ``now``, having started at ``started``;
    ``backoff`` is the wait the previous exit left; ``requested``: the supervisor
    stopped it itself in order to start it again (not a crash)."""
    if shutting_down or phase == ProcPhase.STOPPED:
        return GiveUp()
    if requested:
        return Restart(after=0.0, backoff=BACKOFF_START)
    if now - started > STABLE_UPTIME:
        backoff = BACKOFF_START
    return Restart(after=backoff, backoff=min(backoff * 2, BACKOFF_MAX))


def on_spawn_failed(backoff: float) -> Restart:
    """The process could not be started at all (command missing, say): try again later."""
    return Restart(after=backoff, backoff=min(backoff * 2, BACKOFF_MAX))


# ------------------------------------------------------------------ gateways and registry


def gateway_phase(ready: bool, current: ProcPhase) -> ProcPhase | None:
    """A gateway's new state after its /ready check, or None when it stays as it is."""
    if current == ProcPhase.STOPPED:
        return None
    new = ProcPhase.READY if ready else (ProcPhase.RESTARTING if current == ProcPhase.RESTARTING else ProcPhase.STARTING)
    return None if new == current else new


def keepalive_period(keepalive_interval: float | None, ttl: float | None) -> float:
    """How often registrations are renewed (Consul: a third of the check's TTL;
    Eureka: the lease renewal interval)."""
    period = keepalive_interval
    if period is None:
        period = ttl / 3 if ttl else DEFAULT_KEEPALIVE
    return max(MIN_KEEPALIVE, float(period))


def renewal_due(renewed: float | None, now: float, period: float) -> bool:
    """Whether a gateway's registrations are due (None: never registered yet)."""
    return renewed is None or now - renewed >= period
