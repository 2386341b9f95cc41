"""supervisor/roles.py: the three control roles `up` runs, as one list of records."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from meshctl.citadel.store import init_ca
from meshctl.model.base import FrozenDict
from meshctl.model.mesh import MeshSettings
from meshctl.supervisor.errors import UpError
from meshctl.supervisor.plan import Plan
from meshctl.supervisor.roles import CONTROL_ROLES, RoleContext

PLAN = Plan(workloads=(), gateways=(), pilot_port=15010, allocations=FrozenDict(), mixer_port=15011, citadel_port=15012)


def ctx(tmp_path, **settings) -> RoleContext:
    return RoleContext(PLAN, MeshSettings(**settings), tmp_path, consul_token=None)


def test_pilot_mixer_and_citadel_each_on_the_port_the_plan_gave_it_started_and_stopped_in_that_order(tmp_path):
    c = ctx(tmp_path, trust_domain="example.org")
    assert [(r.name, r.port(PLAN), r.ready_path) for r in CONTROL_ROLES] == [
        ("pilot", 15010, "/healthz"), ("mixer", 15011, "/ready"), ("citadel", 15012, "/healthz")]
    for r in CONTROL_ROLES:
        argv = r.argv(c)
        assert argv[argv.index("--port") + 1] == str(r.port(PLAN)) and r.name in argv
    assert "example.org" in CONTROL_ROLES[2].argv(c) and "example.org" in CONTROL_ROLES[0].argv(c)


def test_pilot_gets_the_consul_token_by_environment_and_no_other_role_does(tmp_path):
    c = RoleContext(PLAN, MeshSettings(registry="consul://127.0.0.1:8500"), tmp_path, consul_token="s3cret")
    envs = {r.name: r.env(c) for r in CONTROL_ROLES}
    assert envs["pilot"]["CONSUL_HTTP_TOKEN"] == "s3cret"
    assert not any("s3cret" in " ".join(r.argv(c)) for r in CONTROL_ROLES)  # never in argv
    assert envs["mixer"].get("CONSUL_HTTP_TOKEN") != "s3cret" and envs["citadel"].get("CONSUL_HTTP_TOKEN") != "s3cret"


def test_citadels_pre_start_creates_the_ca_and_refuses_one_of_another_trust_domain(tmp_path):
    citadel = next(r for r in CONTROL_ROLES if r.name == "citadel")
    assert citadel.pre_start is not None
    citadel.pre_start(ctx(tmp_path / "fresh", trust_domain="example.org"))
    assert (tmp_path / "fresh" / "ca").is_dir()
    init_ca(tmp_path / "old", "old.example", now=datetime.now(timezone.utc))
    with pytest.raises(UpError, match="'old.example', but mesh settings say 'example.org'"):
        citadel.pre_start(ctx(tmp_path / "old", trust_domain="example.org"))
