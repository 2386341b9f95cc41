"""mesh.yaml's settings.outboundTrafficPolicy reaches every proxy's settings."""

from __future__ import annotations

import pytest

from meshctl.loader.codec import LoadError
from meshctl.supervisor.plan import load_mesh, proxy_settings

MESH = """\
settings:
  portRange: 30000-30099
{extra}services:
- name: web
  port: 9080
  versions:
  - {{name: v1, address: "127.0.0.1:7000"}}
"""


def _load(tmp_path, extra: str):
    p = tmp_path / "mesh.yaml"
    p.write_text(MESH.format(extra=extra))
    return load_mesh(p)


def test_default_is_allow_any_as_in_istio(tmp_path):
    assert proxy_settings(_load(tmp_path, "")).outbound_traffic_policy == "ALLOW_ANY"


def test_registry_only_is_passed_to_proxies(tmp_path):
    spec = _load(tmp_path, "  outboundTrafficPolicy: REGISTRY_ONLY\n")
    assert proxy_settings(spec).outbound_traffic_policy == "REGISTRY_ONLY"


def test_an_unknown_mode_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(LoadError) as e:
        _load(tmp_path, "  outboundTrafficPolicy: DENY_ALL\n")
    assert "settings.outboundTrafficPolicy" in str(e.value) and "REGISTRY_ONLY" in str(e.value)
