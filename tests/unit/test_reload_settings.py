"""supervisor/reload.py: what `up` on a running mesh does with each changed setting."""

from __future__ import annotations

from dataclasses import fields, replace

from meshctl.model.base import Duration
from meshctl.model.mesh import MeshSettings, TracingSettings
from meshctl.supervisor.reload import PROXIES, REFUSED, SUPERVISOR, settings_change

BASE = MeshSettings()


def test_every_setting_has_exactly_one_rule() -> None:
    # a setting added to MeshSettings without a rule would be refused (never ignored),
    # but it must be decided here: carried out, or refused by name
    names = [f.name for f in fields(MeshSettings)]
    ruled = REFUSED + SUPERVISOR + PROXIES
    assert sorted(names) == sorted(ruled)
    assert len(set(ruled)) == len(ruled)


def test_identity_addresses_and_the_registry_are_refused_by_their_mesh_yaml_names() -> None:
    c = settings_change(BASE, replace(BASE, trust_domain="example.org", port_range="23000-23099", namespace="shop"))
    assert c.refused == ("settings.trustDomain", "settings.namespace", "settings.portRange")
    assert not c.proxies and not c.supervisor
    assert "settings.trustDomain, settings.namespace, settings.portRange changed in mesh.yaml" in c.refusal()
    assert "`meshctl down`, then `up` again" in c.refusal()


def test_proxy_settings_restart_the_proxies_and_ready_timeout_is_the_supervisors() -> None:
    new = replace(BASE, outbound_traffic_policy="REGISTRY_ONLY", request_timeout=Duration(5.0),
                  tracing=TracingSettings(sampling=10.0), ready_timeout=Duration(90.0))
    c = settings_change(BASE, new)
    assert c.proxies == ("settings.requestTimeout", "settings.outboundTrafficPolicy", "settings.tracing")
    assert c.supervisor == ("settings.readyTimeout",)
    assert c.refused == ()


def test_nothing_changed_is_no_change() -> None:
    assert settings_change(BASE, MeshSettings()) == settings_change(BASE, BASE)
    assert not settings_change(BASE, BASE).refused and not settings_change(BASE, BASE).proxies
