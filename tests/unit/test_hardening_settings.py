"""mesh.yaml's hardening settings (issue 13): checked at load with file:line and
the field, and handed to every sidecar and gateway through Pilot's Node."""

import pytest

from meshctl.loader.codec import LoadError
from meshctl.model.base import Duration
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.registry import make_snapshot
from meshctl.supervisor.plan import load_mesh, proxy_settings

MESH = """settings:
  portRange: 21000-21999
  {extra}
services:
- name: hello
  port: 9080
  versions:
  - {{name: v1, command: [python3, hello.py]}}
"""


@pytest.mark.parametrize("extra, field, words", [
    ("pathNormalization: DECODE_SLASHES", "settings.pathNormalization", "is not one of NONE, BASE"),
    ("upgradeTypes: [websocket, h2c]", "settings.upgradeTypes[1]", "h2c is never relayed"),
    ("upgradeTypes: [spdy/3]", "settings.upgradeTypes[0]", "meshctl relays only"),
    ("maxConnections: -1", "settings.maxConnections", "must be >= 0"),
])
def test_bad_hardening_settings_are_refused_with_file_line_and_field(tmp_path, extra, field, words):
    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(extra=extra))
    with pytest.raises(LoadError) as e:
        load_mesh(f)
    msg = str(e.value)
    assert f"{f}:3" in msg and field in msg and words in msg, msg


def test_mesh_settings_reach_the_proxy_config(tmp_path):
    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(extra="pathNormalization: MERGE_SLASHES\n  drainDuration: 7s\n  maxConnections: 500"))
    spec = load_mesh(f)
    s = proxy_settings(spec)
    assert (s.path_normalization, s.drain_duration, s.max_connections) == ("MERGE_SLASHES", Duration(7.0), 500)
    defaults = proxy_settings(load_mesh(_write(tmp_path, MESH.format(extra=""))))
    assert defaults.path_normalization == "BASE" and float(defaults.drain_duration) == 5.0
    assert defaults.upgrade_types == ("websocket",)
    node = Node(workload=_workload(), settings=s)
    cfg = compile_proxy(Inputs([], make_snapshot({})), node)
    assert cfg.settings.path_normalization == "MERGE_SLASHES" and cfg.settings.max_connections == 500


def _write(tmp_path, text):
    f = tmp_path / "mesh2.yaml"
    f.write_text(text)
    return f


def _workload():
    from meshctl.model.proxyconfig import Workload

    return Workload(name="hello-v1-0", service="hello")
