"""`meshctl up -f mesh.yaml` on a running mesh with a changed ``settings`` block:
proxy settings reach the running sidecars and gateways (started again with them,
their apps left running); settings a running mesh cannot change are refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import free_port, http_get, mesh_ports, start_hello, stop

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


def write_mesh(work: Path, port_range: str, gw: int, extra: str = "") -> None:
    (work / "mesh.yaml").write_text(f"""
settings:
  portRange: {port_range}
{extra}services:
- name: hello
  port: 9080
  versions:
  - name: v1
    command: [python3, hello_app.py]
gateways:
- name: gw
  labels: {{istio: ingressgateway}}
  ports: {{80: {gw}}}
""")


def meshctl(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in __import__("os").environ.items()
                            if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")})
    if check and r.returncode:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def status(work: Path) -> dict:
    return json.loads(meshctl("status", "--json", "--state-dir", str(work / ".meshctl"), cwd=work).stdout)


@pytest.fixture
def mesh(tmp_path):
    shutil.copy(HERE / "hello_app.py", tmp_path / "hello_app.py")
    port_range, gw = mesh_ports()
    write_mesh(tmp_path, port_range, gw)
    outside_port = free_port()  # a server outside the mesh: what ALLOW_ANY lets apps reach
    outside = start_hello(outside_port, "outside", tmp_path / "outside.log")
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=tmp_path)
    try:
        yield {"dir": tmp_path, "range": port_range, "gw": gw, "outside": outside_port}
    finally:
        meshctl("down", cwd=tmp_path, check=False)
        stop(outside)


def test_a_changed_proxy_setting_reaches_the_running_sidecars_and_gateways(mesh):
    work = mesh["dir"]
    before = status(work)
    w = before["workloads"][0]
    outbound = int(w["outbound_address"].rsplit(":", 1)[1])
    target = f"http://127.0.0.1:{mesh['outside']}/"
    assert http_get(outbound, target, host=f"127.0.0.1:{mesh['outside']}")[0] == 200  # ALLOW_ANY, the default

    write_mesh(work, mesh["range"], mesh["gw"], "  outboundTrafficPolicy: REGISTRY_ONLY\n")
    r = meshctl("up", "-f", "mesh.yaml", cwd=work)
    assert "mesh updated" in r.stdout

    after = status(work)
    assert after["state"] == "running" and not after["error"]
    w2 = after["workloads"][0]
    assert w2["state"] == "ready"
    assert w2["proxy_pid"] != w["proxy_pid"]  # the sidecar was started again with the setting...
    assert w2["app_pid"] == w["app_pid"]  # ...its app kept running
    assert w2["restarts"] == 0  # a restart asked for is no crash
    assert after["gateways"][0]["pid"] != before["gateways"][0]["pid"] and after["gateways"][0]["state"] == "ready"
    # the running sidecar now refuses hosts outside the registry, as Istio's REGISTRY_ONLY
    assert http_get(outbound, target, host=f"127.0.0.1:{mesh['outside']}")[0] == 502
    # and the mesh's own service still answers through it
    assert http_get(outbound, "http://hello:9080/", host="hello:9080")[0] == 200


def test_a_setting_a_running_mesh_cannot_change_is_refused_by_name_and_nothing_changes(mesh):
    work = mesh["dir"]
    before = status(work)
    write_mesh(work, mesh["range"], mesh["gw"], "  trustDomain: example.org\n  namespace: shop\n")
    r = meshctl("up", "-f", "mesh.yaml", cwd=work, check=False)
    assert r.returncode != 0
    assert "settings.trustDomain, settings.namespace changed in mesh.yaml" in r.stderr + r.stdout
    assert "`meshctl down`, then `up` again" in r.stderr + r.stdout
    after = status(work)
    assert after["state"] == "running"
    assert [w["proxy_pid"] for w in after["workloads"]] == [w["proxy_pid"] for w in before["workloads"]]
    node = json.loads((work / ".meshctl" / "nodes" / "hello-v1-0.json").read_text())
    assert "example.org" not in json.dumps(node)  # the running sidecar's identity is untouched
