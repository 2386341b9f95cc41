"""A Telemetry tracing setting on a mesh with no tracing backend would do nothing: refused by
name at `route apply` against the running mesh's settings (what Pilot hands its proxies, not
the mesh.yaml on disk), and at `route validate --mesh mesh.yaml`; offline without a mesh file,
validate cannot know and passes. Istio's own mesh-default example (randomSamplingPercentage: 10)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
DATA = HERE.parent / "data" / "istio-telemetry"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    return subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, timeout=60,
                          env=e, cwd=cwd)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("no-tracing")
    shutil.copy(HERE / "hello_app.py", work / "hello_app.py")
    ports, _ = mesh_ports()
    (work / "mesh.yaml").write_text(f"""settings: {{portRange: {ports}}}
services:
- name: hello
  port: 9080
  versions: [{{name: v1, command: [python3, hello_app.py]}}]
""")
    meshctl_run("up", "-d", "-f", str(work / "mesh.yaml"))
    try:
        yield work
    finally:
        meshctl_run("down", "--state-dir", str(work / ".meshctl"), timeout=60)


def test_offline_validate_cannot_know_and_passes(tmp_path):
    r = run("route", "validate", "-f", str(DATA / "mesh-default.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_validate_with_the_mesh_file_refuses_sampling_without_a_backend(mesh, tmp_path):
    r = run("route", "validate", "--mesh", str(mesh / "mesh.yaml"), "-f", str(DATA / "mesh-default.yaml"), cwd=tmp_path)
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "mesh-default.yaml:9: spec.tracing[0].randomSamplingPercentage:" in err, err
    assert "no tracing backend" in err and "settings.tracing" in err


def test_apply_to_a_running_mesh_without_a_backend_refuses_sampling(mesh):
    sd = str(mesh / ".meshctl")
    # mesh.yaml on disk names a collector, but the running mesh was not restarted with it:
    # what counts is what the proxies run with
    text = (mesh / "mesh.yaml").read_text()
    (mesh / "mesh.yaml").write_text(text.replace("settings: {", "settings: {tracing: {otlp: 'http://127.0.0.1:4318'}, "))
    try:
        r = run("route", "apply", "--state-dir", sd, "-f", str(DATA / "mesh-default.yaml"), cwd=mesh)
    finally:
        (mesh / "mesh.yaml").write_text(text)
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    assert "mesh-default.yaml:9: spec.tracing[0].randomSamplingPercentage:" in err, err
    assert "the running mesh has no tracing backend" in err and "settings.tracing" in err
    assert "nothing applied" in err
    got = run("route", "get", "--state-dir", sd, cwd=mesh)
    assert "mesh-default" not in got.stdout, got.stdout
    # disableSpanReporting: true asks for no spans, which is what this mesh does: applied
    ok = run("route", "apply", "--state-dir", sd, "-f", str(DATA / "foo-tracing.yaml"), cwd=mesh)
    assert ok.returncode == 0, ok.stderr
    assert "foo-tracing" in run("route", "get", "--state-dir", sd, cwd=mesh).stdout
