"""supervisor/lifecycle.py: the supervisor's rules for health checks, restarts and
gateway readiness, one test per rule of the table at the top of the module."""

from __future__ import annotations

from meshctl.supervisor.lifecycle import (
    BACKOFF_MAX,
    BACKOFF_START,
    FAST_CHECK,
    Deregister,
    GiveUp,
    Health,
    InstancePhase,
    Nothing,
    ProcPhase,
    Register,
    Restart,
    Thresholds,
    gateway_phase,
    keepalive_period,
    next_check,
    on_exit,
    on_health,
    on_process_lost,
    on_spawn_failed,
    renewal_due,
)

STARTING = Health(InstancePhase.STARTING, registered=False)


def checks(h: Health, results: list[tuple[bool, bool]], t: Thresholds):
    verdicts = []
    for app_ok, proxy_ok in results:
        h, v = on_health(h, app_ok, proxy_ok, t)
        verdicts.append(v)
    return h, verdicts


# ------------------------------------------------------------------ health


def test_registered_after_healthy_threshold_passes_in_a_row() -> None:
    h, vs = checks(STARTING, [(True, True)] * 3, Thresholds(healthy=3, unhealthy=2))
    assert vs == [Nothing(), Nothing(), Register()]
    assert (h.ok_streak, h.fail_streak) == (3, 0)


def test_a_failure_resets_the_ok_streak_before_registration() -> None:
    h, vs = checks(STARTING, [(True, True), (True, True), (True, False), (True, True), (True, True)],
                   Thresholds(healthy=3, unhealthy=5))
    assert Register() not in vs and h.ok_streak == 2


def test_a_registered_ready_instance_is_not_registered_again() -> None:
    h = Health(InstancePhase.READY, registered=True, ok_streak=4)
    assert on_health(h, True, True, Thresholds(healthy=1))[1] == Nothing()


def test_an_unhealthy_instance_that_passes_again_is_registered_again() -> None:
    # registered but not READY (a registration that raced a failure): register again, harmless
    h = Health(InstancePhase.UNHEALTHY, registered=False, fail_streak=3)
    h, vs = checks(h, [(True, True), (True, True)], Thresholds(healthy=2, unhealthy=3))
    assert vs == [Nothing(), Register()] and h.fail_streak == 0


def test_deregistered_after_unhealthy_threshold_failures_of_the_app() -> None:
    h = Health(InstancePhase.READY, registered=True, ok_streak=9)
    h, vs = checks(h, [(False, False)] * 3, Thresholds(healthy=1, unhealthy=3))
    assert vs == [Nothing(), Nothing(), Deregister(InstancePhase.UNHEALTHY, "app", 3)]
    assert (h.ok_streak, h.fail_streak) == (0, 3)


def test_a_failing_sidecar_takes_the_instance_out_as_restarting() -> None:
    h = Health(InstancePhase.READY, registered=True)
    _, v = on_health(h, True, False, Thresholds(unhealthy=1))
    assert v == Deregister(InstancePhase.RESTARTING, "sidecar", 1)


def test_one_failure_is_enough_while_a_process_is_restarting() -> None:
    h = on_process_lost(Health(InstancePhase.READY, registered=True, ok_streak=7))
    assert h.phase == InstancePhase.RESTARTING and h.ok_streak == 0
    assert on_health(h, False, False, Thresholds(unhealthy=5))[1] == Deregister(InstancePhase.UNHEALTHY, "app", 1)


def test_an_unregistered_instance_is_never_deregistered() -> None:
    _, vs = checks(STARTING, [(False, False)] * 10, Thresholds(unhealthy=1))
    assert set(vs) == {Nothing()}


def test_checks_are_fast_until_the_first_registration_then_at_the_interval() -> None:
    assert next_check(True, False, 10.0) == (FAST_CHECK, True)
    assert next_check(True, True, 10.0) == (10.0, False)
    assert next_check(False, False, 10.0) == (10.0, False)  # deregistered later: no fast checks again


# ------------------------------------------------------------------ restarts


def test_no_restart_once_the_mesh_shuts_down_or_the_process_was_stopped() -> None:
    assert on_exit(ProcPhase.RUNNING, 1.0, 0.0, 1.0, shutting_down=True) == GiveUp()
    assert on_exit(ProcPhase.STOPPED, 1.0, 0.0, 1.0, shutting_down=False) == GiveUp()


def test_restart_backoff_doubles_up_to_the_maximum() -> None:
    waits, backoff, now = [], BACKOFF_START, 0.0
    for _ in range(10):
        v = on_exit(ProcPhase.RUNNING, backoff, now, now + 1.0, shutting_down=False)
        assert isinstance(v, Restart)
        waits.append(v.after)
        backoff, now = v.backoff, now + 1.0 + v.after
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert max(waits) == BACKOFF_MAX


def test_a_process_that_ran_long_restarts_at_the_first_backoff_again() -> None:
    assert on_exit(ProcPhase.RUNNING, 16.0, 100.0, 110.5, shutting_down=False) == Restart(after=0.5, backoff=1.0)
    # exactly the stable uptime is not longer than it
    assert on_exit(ProcPhase.READY, 16.0, 100.0, 110.0, shutting_down=False) == Restart(after=16.0, backoff=30.0)


def test_a_restart_the_supervisor_asked_for_is_at_once_and_starts_the_backoff_over() -> None:
    # a reload restarts a sidecar with new settings: no crash backoff, no wait
    assert on_exit(ProcPhase.RUNNING, 16.0, 100.0, 101.0, shutting_down=False, requested=True) == Restart(after=0.0, backoff=0.5)
    # but never once the mesh stops, or the process was stopped for good
    assert on_exit(ProcPhase.RUNNING, 1.0, 0.0, 1.0, shutting_down=True, requested=True) == GiveUp()
    assert on_exit(ProcPhase.STOPPED, 1.0, 0.0, 1.0, shutting_down=False, requested=True) == GiveUp()


def test_a_process_that_cannot_be_spawned_is_retried_with_backoff() -> None:
    assert on_spawn_failed(0.5) == Restart(after=0.5, backoff=1.0)
    assert on_spawn_failed(20.0) == Restart(after=20.0, backoff=30.0)


# ------------------------------------------------------------------ gateways and registry


def test_gateway_ready_by_its_ready_check_and_back_to_starting_when_it_stops_answering() -> None:
    assert gateway_phase(True, ProcPhase.STARTING) == ProcPhase.READY
    assert gateway_phase(True, ProcPhase.READY) is None
    assert gateway_phase(False, ProcPhase.READY) == ProcPhase.STARTING
    assert gateway_phase(False, ProcPhase.STARTING) is None


def test_a_restarting_gateway_stays_restarting_until_ready_and_a_stopped_one_stays_stopped() -> None:
    assert gateway_phase(False, ProcPhase.RESTARTING) is None
    assert gateway_phase(True, ProcPhase.RESTARTING) == ProcPhase.READY
    assert gateway_phase(True, ProcPhase.STOPPED) is None


def test_registrations_are_renewed_at_the_registrys_cadence() -> None:
    assert keepalive_period(7.0, 21.0) == 7.0  # Eureka: its renewal interval
    assert keepalive_period(None, 9.0) == 3.0  # Consul: a third of the TTL
    assert keepalive_period(None, None) == 5.0
    assert keepalive_period(0.01, None) == 0.2  # never busier than that


def test_a_gateway_registers_at_once_then_renews_each_period() -> None:
    assert renewal_due(None, 0.0, 5.0)
    assert not renewal_due(100.0, 104.9, 5.0)
    assert renewal_due(100.0, 105.0, 5.0)


def test_states_read_as_the_strings_status_json_always_showed() -> None:
    assert [str(s) for s in InstancePhase] == ["starting", "ready", "unhealthy", "restarting", "draining", "stopped"]
    assert ProcPhase.READY == "ready" and f"{ProcPhase.RESTARTING}" == "restarting"
