"""`meshctl up` with Istio's Bookinfo, end to end: real processes, real sockets,
curl through the ingress gateway, Istio's sample rules applied with the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import BOOKINFO, bookinfo_workdir, mesh_ports

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "HTTP_PROXY", "http_proxy")}
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def curl(url: str, *extra: str) -> tuple[int, str]:
    r = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "-m", "15", "-o", "-", "-w", "\n%{http_code}", *extra, url],
        capture_output=True, text=True, timeout=20,
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def version_of(page: str) -> str:
    """Which reviews version rendered the page: v1 no stars, v2 black, v3 red."""
    if 'color="red"' in page:
        return "v3"
    if 'color="black"' in page:
        return "v2"
    return "v1"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("bookinfo")
    gw_port = bookinfo_workdir(work)
    started = time.monotonic()
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    up_seconds = time.monotonic() - started
    try:
        yield {"dir": work, "gw": f"http://127.0.0.1:{gw_port}", "up_seconds": up_seconds}
    finally:
        meshctl("down", cwd=work, check=False)


def status(mesh) -> dict:
    return json.loads(meshctl("status", "--json", cwd=mesh["dir"]).stdout)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def apply(mesh, *files: str) -> None:
    args = []
    for f in files:
        args += ["-f", f"rules/{f}"]
    meshctl("route", "apply", "--wait", *args, cwd=mesh["dir"])


def test_up_brings_every_instance_ready_and_status_json_is_stable(mesh):
    st = status(mesh)
    assert st["state"] == "running"
    names = sorted(w["name"] for w in st["workloads"])
    assert names == ["details-v1-0", "productpage-v1-0", "ratings-v1-0", "reviews-v1-0", "reviews-v2-0", "reviews-v3-0"]
    for w in st["workloads"]:
        assert w["state"] == "ready"
        for key in ("app_address", "inbound_address", "outbound_address", "admin_address"):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", w[key])
    assert [g["name"] for g in st["gateways"]] == ["istio-ingressgateway"]


def test_productpage_works_through_the_gateway(mesh):
    apply(mesh, "bookinfo-gateway.yaml")
    code, page = wait_for(lambda: (r := curl(mesh["gw"] + "/productpage"))[0] == 200 and r)
    assert "William Shakespeare" in page or "PublisherA" in page
    assert "Reviewer1" in page


def test_all_v1_gives_only_reviews_v1(mesh):
    apply(mesh, "bookinfo-gateway.yaml", "destination-rule-all.yaml", "virtual-service-all-v1.yaml")
    versions = {version_of(curl(mesh["gw"] + "/productpage")[1]) for _ in range(15)}
    assert versions == {"v1"}


def test_reviews_test_v2_sends_only_jason_to_v2(mesh):
    apply(mesh, "bookinfo-gateway.yaml", "destination-rule-all.yaml", "virtual-service-all-v1.yaml", "virtual-service-reviews-test-v2.yaml")
    jason = {version_of(curl(mesh["gw"] + "/productpage", "-b", "user=jason")[1]) for _ in range(10)}
    others = {version_of(curl(mesh["gw"] + "/productpage")[1]) for _ in range(10)}
    assert jason == {"v2"}
    assert others == {"v1"}


def test_reviews_50_v3_splits_between_v1_and_v3(mesh):
    apply(mesh, "bookinfo-gateway.yaml", "destination-rule-all.yaml", "virtual-service-reviews-50-v3.yaml")
    counts = {"v1": 0, "v2": 0, "v3": 0}
    n = 80
    for _ in range(n):
        counts[version_of(curl(mesh["gw"] + "/productpage")[1])] += 1
    assert counts["v2"] == 0
    # Binomial(80, 0.5): 20..60 holds with probability > 0.99999.
    assert 20 <= counts["v1"] <= 60 and counts["v1"] + counts["v3"] == n, counts


def test_a_killed_app_is_restarted_and_comes_back(mesh):
    before = next(w for w in status(mesh)["workloads"] if w["name"] == "details-v1-0")
    os.kill(before["app_pid"], signal.SIGKILL)

    def back():
        w = next(w for w in status(mesh)["workloads"] if w["name"] == "details-v1-0")
        return w["state"] == "ready" and w["app_pid"] != before["app_pid"] and w

    after = wait_for(back, timeout=30)
    assert after["restarts"] >= 1
    code, page = wait_for(lambda: (r := curl(mesh["gw"] + "/productpage"))[0] == 200 and "PublisherA" in r[1] and r, timeout=15)
    assert code == 200


def test_up_on_a_running_mesh_applies_only_the_difference(mesh):
    work = mesh["dir"]
    st = status(mesh)
    pids = {w["name"]: w["proxy_pid"] for w in st["workloads"]}
    text = (work / "mesh.yaml").read_text()
    (work / "mesh.yaml").write_text(text.replace("    command: [python3, apps/ratings.py]\n", "    command: [python3, apps/ratings.py]\n    replicas: 2\n"))
    try:
        meshctl("up", "-f", "mesh.yaml", cwd=work)
        st = status(mesh)
        names = {w["name"] for w in st["workloads"]}
        assert "ratings-v1-1" in names
        assert all(w["state"] == "ready" for w in st["workloads"])
        # Nothing that existed before was restarted.
        for w in st["workloads"]:
            if w["name"] in pids:
                assert w["proxy_pid"] == pids[w["name"]], w["name"]
    finally:
        (work / "mesh.yaml").write_text(text)


def test_down_leaves_no_process_and_no_port(tmp_path):
    work = tmp_path
    (work / "apps").mkdir()
    shutil.copy(BOOKINFO / "apps" / "common.py", work / "apps")
    shutil.copy(BOOKINFO / "apps" / "ratings.py", work / "apps")
    port_range, gw = mesh_ports()
    (work / "mesh.yaml").write_text(
        f"settings: {{portRange: {port_range}}}\n"
        "services:\n- name: ratings\n  port: 9080\n  healthCheck: {http: /health}\n"
        "  versions: [{name: v1, command: [python3, apps/ratings.py]}]\n"
        f"gateways:\n- name: gw\n  labels: {{istio: ingressgateway}}\n  ports: {{80: {gw}}}\n"
    )
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    st = json.loads(meshctl("status", "--json", cwd=work).stdout)
    pids = [st["control_plane"]["pid"]] + [w[k] for w in st["workloads"] for k in ("app_pid", "proxy_pid")] + [g["pid"] for g in st["gateways"]]
    ports = [int(w[k].rsplit(":", 1)[1]) for w in st["workloads"] for k in ("app_address", "inbound_address", "outbound_address", "admin_address")] + [gw]
    meshctl("down", cwd=work)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still bound"


def test_bad_mesh_file_and_missing_command_are_named_and_nothing_runs(tmp_path):
    (tmp_path / "mesh.yaml").write_text("services:\n- name: a\n  port: 9080\n  versions: [{name: v1, command: [no-such-program-xyz]}]\n")
    r = meshctl("up", "-f", "mesh.yaml", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "no-such-program-xyz" in r.stderr and "not found" in r.stderr
    (tmp_path / "mesh.yaml").write_text("services:\n- name: a\n  prot: 9080\n")
    r = meshctl("up", "-f", "mesh.yaml", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "mesh.yaml:3: services[0].prot: unknown field (did you mean port?)" in r.stderr
    assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()

def test_an_app_that_keeps_crashing_fails_up_with_its_own_last_words(tmp_path):
    port_range, _ = mesh_ports()
    (tmp_path / "crash.py").write_text(
        "import sys\nprint('loading settings.ini', flush=True)\n"
        "sys.exit('fatal: settings.ini: no such file')\n"
    )
    (tmp_path / "mesh.yaml").write_text(
        f"settings: {{portRange: {port_range}, readyTimeout: 4s}}\n"
        "services:\n- name: a\n  port: 9080\n  versions: [{name: v1, command: [python3, crash.py]}]\n"
    )
    started = time.monotonic()
    r = meshctl("up", "-d", "-f", "mesh.yaml", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert time.monotonic() - started < 30
    assert "not ready after 4s: a-v1-0" in r.stderr
    assert "exited with code 1" in r.stderr
    assert "fatal: settings.ini: no such file" in r.stderr
    assert not (tmp_path / ".meshctl" / "supervisor.pid").exists()
