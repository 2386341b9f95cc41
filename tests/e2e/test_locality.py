"""Istio's locality load balancing tasks, end to end, with four localities on one machine.

The DestinationRules are Istio's (tests/data/istio-locality, see its README):
the caller (curl) runs in region1/zone1 (the host's: `up --locality`, over
mesh.yaml's settings.locality); helloworld has one version per locality (versions[].locality). As in
the tasks: "Locality weighted distribution" sends 70 % to region1/zone1, 20 %
to region1/zone2, 10 % to region3/zone4 and none to region2/zone3; "Locality
failover" keeps traffic in region1/zone1 and, as localities fail, moves it to
region1/zone2, then region2/zone3 (failover region1 → region2), then
region3/zone4. The first locality fails by answering 503 (outlier detection
ejects it); the next ones as in the task (the sidecar drained): 503s and a
failing health check.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from .helpers import http_get, mesh_ports, meshctl_run

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
TASKS = HERE.parent / "data" / "istio-locality"
LOCALITIES = ("region1/zone1", "region1/zone2", "region2/zone3", "region3/zone4")


def _version(loc: str) -> str:
    return loc.replace("/", "-")


def _rule(work: Path, name: str) -> Path:
    text = (TASKS / name).read_text()
    assert "host: helloworld.sample.svc.cluster.local" in text
    out = work / name
    out.write_text(text.replace("host: helloworld.sample.svc.cluster.local", "host: helloworld"))
    return out


def _mesh(work: Path) -> None:
    shutil.copy(HERE / "hello_app.py", work / "hello_app.py")
    port_range, _ = mesh_ports()
    versions = []
    for loc in LOCALITIES:
        own = "" if loc == "region1/zone1" else f", locality: {loc}"  # region1/zone1: the host's
        versions.append(f"  - {{name: {_version(loc)}, command: [python3, hello_app.py]{own}, "
                        f"env: {{FAIL_IF: {work}/fail-{_version(loc)}, UNHEALTHY_IF: {work}/sick-{_version(loc)}}}}}")
    (work / "mesh.yaml").write_text(f"""
settings: {{portRange: {port_range}, locality: elsewhere/zone9}}  # `up --locality region1/zone1` overrides it
services:
- name: curl
  port: 9090
  healthCheck: {{tcp: true}}
  versions:
  - {{name: v1, command: [python3, hello_app.py]}}
- name: helloworld
  port: 5000
  healthCheck: {{http: /health, interval: 0.3s, unhealthyThreshold: 2}}
  versions:
{chr(10).join(versions)}
""")


def _where(outbound: int) -> str:
    """The locality of the helloworld instance that answered (or the status)."""
    code, body = http_get(outbound, "http://helloworld:5000/hello")
    if code != 200:
        return str(code)
    version = json.loads(body)["version"]
    return next(loc for loc in LOCALITIES if _version(loc) == version)


def _settles_on(outbound: int, loc: str, timeout: float = 30.0) -> Counter:
    """Send requests until 20 in a row come from ``loc``; everything seen on the way."""
    seen: Counter = Counter()
    run = 0
    deadline = time.monotonic() + timeout
    while run < 20:
        assert time.monotonic() < deadline, f"traffic did not move to {loc}: {seen}"
        where = _where(outbound)
        seen[where] += 1
        run = run + 1 if where == loc else 0
    return seen


def test_istios_locality_tasks_distribute_then_fail_over_in_priority_order(tmp_path):
    _mesh(tmp_path)
    sd = str(tmp_path / ".meshctl")
    meshctl_run("up", "-d", "-f", str(tmp_path / "mesh.yaml"), "--locality", "region1/zone1", timeout=120)
    try:
        st = json.loads(meshctl_run("status", "--json", "--state-dir", sd).stdout)
        assert st["locality"] == "region1/zone1"
        curl = next(w for w in st["workloads"] if w["name"] == "curl-v1-0")
        outbound = int(curl["outbound_address"].rsplit(":", 1)[1])
        # No locality load balancing yet: every locality answers.
        assert set(_where(outbound) for _ in range(40)) == set(LOCALITIES)

        # -- Locality weighted distribution: 70 / 20 / 0 / 10
        meshctl_run("route", "apply", "--wait", "-f", str(_rule(tmp_path, "helloworld-distribute.yaml")), "--state-dir", sd)
        got = Counter(_where(outbound) for _ in range(600))
        assert got["region2/zone3"] == 0 and sum(got.values()) == 600, got
        assert 0.62 < got["region1/zone1"] / 600 < 0.78, got
        assert 0.13 < got["region1/zone2"] / 600 < 0.27, got
        assert 0.05 < got["region3/zone4"] / 600 < 0.16, got
        out = meshctl_run("route", "explain", "GET", "http://helloworld:5000/hello", "--from", "curl", "--state-dir", sd).stdout
        assert "locality: caller region1/zone1: distribute[0] (from region1/zone1/*)" in out, out
        assert "region1/zone1: share 70%" in out and "region3/zone4: share 10%" in out, out

        # -- Locality failover: region1/zone1, then region1/zone2, region2/zone3, region3/zone4
        meshctl_run("route", "apply", "--wait", "-f", str(_rule(tmp_path, "helloworld-failover.yaml")), "--state-dir", sd)
        assert Counter(_where(outbound) for _ in range(30)) == Counter({"region1/zone1": 30})
        out = meshctl_run("route", "explain", "GET", "http://helloworld:5000/hello", "--from", "curl", "--state-dir", sd).stdout
        assert "failover by locality; failover region1→region2" in out, out
        for p, loc in enumerate(LOCALITIES):
            assert f"  priority {p}: {loc}, 1/1 endpoint eligible" in out, out
        # region1/zone1 answers 503: outlier detection ejects it (consecutive5xxErrors: 1), its
        # health check still passes; explain asks the caller's proxy which endpoints it ejected.
        (tmp_path / "fail-region1-zone1").write_text("x")
        seen = _settles_on(outbound, "region1/zone2")
        assert set(seen) <= {"region1/zone2", "503"}, seen
        out = meshctl_run("route", "explain", "GET", "http://helloworld:5000/hello", "--from", "curl", "--state-dir", sd).stdout
        assert "  priority 0: region1/zone1, 0/1 endpoint eligible" in out, out
        assert "  → priority 1 takes 100% of requests" in out, out
        # the next ones fail as in the task (the sidecar drained): 503s and a failing health
        # check (the first ejection is the only one maxEjectionPercent's 10 % allows)
        for failed, nxt in zip(LOCALITIES[1:], LOCALITIES[2:]):
            (tmp_path / f"fail-{_version(failed)}").write_text("x")
            (tmp_path / f"sick-{_version(failed)}").write_text("x")
            seen = _settles_on(outbound, nxt)
            # on the way only the failed locality (its last answers, 503s) and the next one
            later = set(LOCALITIES[LOCALITIES.index(nxt) + 1:])
            assert not later & set(seen), (failed, nxt, seen)
    finally:
        meshctl_run("down", "--state-dir", sd)
