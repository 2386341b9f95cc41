"""`meshctl inject-fault` against a real Pilot process: the fault reaches a proxy's
config, `route explain` shows it, the user's rules stay as they were, and Pilot
ends it at its TTL with no CLI running. Bad input gets a clear error and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshctl.credentials import bearer, mesh_credential

from .helpers import meshctl_popen, stop

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
RULES = ROOT / "examples" / "bookinfo" / "rules"


def meshctl(*args: str, sd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    env["COLUMNS"] = "200"
    r = subprocess.run([sys.executable, "-m", "meshctl", *args, "--state-dir", str(sd)], capture_output=True, text=True,
                       timeout=60, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    sd = tmp_path_factory.mktemp("faults") / ".meshctl"
    sd.mkdir()
    proc = meshctl_popen("pilot", "serve", "--port", "0", "--state-dir", str(sd), log=sd.parent / "pilot.log")
    try:
        deadline = time.monotonic() + 20
        url = None
        while url is None:
            assert proc.poll() is None, (sd.parent / "pilot.log").read_text()
            assert time.monotonic() < deadline, "pilot did not start"
            try:
                url = json.loads((sd / "control.json").read_text()).get("pilot")
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
        client = httpx.Client(base_url=url, trust_env=False, timeout=30,
                              headers=bearer(mesh_credential(sd, create=False)))  # the CLI's credential
        inst = {"id": "ratings-v1-0", "service": "ratings", "address": "127.0.0.1", "port": 9,
                "labels": {"app": "ratings", "version": "v1"}, "meta": {"meshctl.io/service-port": "9080"}}
        client.put("/v1/registry/instances/ratings-v1-0", json={"instance": inst, "ttl": 600}).raise_for_status()
        node = {"workload": {"name": "reviews-v2-0", "service": "reviews", "labels": {"app": "reviews", "version": "v2"}},
                "listeners": [{"name": "outbound", "direction": "outbound", "address": "127.0.0.1", "port": 15001}]}
        client.put("/v1/proxies/reviews-v2-0", json=node).raise_for_status()
        meshctl("route", "apply", "-f", str(RULES / "destination-rule-all.yaml"), "-f",
                str(RULES / "virtual-service-ratings-test-abort.yaml"), sd=sd)
        yield {"sd": sd, "client": client}
        client.close()
    finally:
        stop(proc)


def config(p, have: str = "", wait: str = "0s") -> dict:
    r = p["client"].get("/v1/config/reviews-v2-0", params={"version": have, "wait": wait})
    if r.status_code == 304:
        return {"version": have}
    r.raise_for_status()
    return r.json()


def ratings_routes(cfg: dict) -> list[dict]:
    table = cfg["routeTables"]["outbound"] if "routeTables" in cfg else cfg["route_tables"]["outbound"]
    vhosts = table["virtualHosts"] if "virtualHosts" in table else table["virtual_hosts"]
    vh = next(v for v in vhosts if v["name"].startswith("ratings.default.svc.cluster.local:"))
    return vh["routes"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch", "--delay", "1s"], "unknown service 'nosuch'"),
        (["ratings", "--delay", "soon"], "bad --delay"),
        (["ratings", "--delay", "1s", "--percent", "150"], "between 0 and 100"),
        (["ratings", "--abort", "700"], "200-599"),
        (["ratings"], "--delay"),
        (["ratings", "--delay", "1s", "--ttl", "later"], "bad --ttl"),
        (["ratings", "--delay", "1s", "--match", "cookie=x"], "bad --match"),
        (["ratings", "--delay", "1s", "--subset", "v9"], "subset 'v9' of ratings: no DestinationRule defines it"),
        (["list", "--delay", "1s"], "only for injecting"),
        (["clear", "nosuch"], "no injected fault for 'nosuch'"),
    ],
)
def test_bad_requests_exit_1_with_the_cause(pilot, args, message):
    r = meshctl("inject-fault", *args, sd=pilot["sd"], check=False)
    assert r.returncode in (1, 2), r
    assert message in " ".join(r.stderr.split()), r.stderr
    assert "no injected faults" in meshctl("inject-fault", "list", sd=pilot["sd"]).stdout


def test_fault_reaches_the_proxy_is_explained_and_ends_at_its_ttl(pilot):
    sd = pilot["sd"]
    before = config(pilot)
    rules_before = meshctl("route", "get", "virtualservice", "ratings", "-o", "yaml", sd=sd).stdout
    assert [r.get("fault") is not None for r in ratings_routes(before)] == [True, False]  # the user's own abort for jason

    started = time.monotonic()
    # TTL 15 s: the five CLI calls below must run while the fault lasts, on a loaded CI machine too
    out = meshctl("inject-fault", "ratings", "--delay", "2s", "--match", "header:end-user=jason", "--ttl", "15s",
                  "--no-wait", sd=sd).stdout
    assert "injected into ratings: delay 2s for 100% of header:end-user=jason" in out

    during = config(pilot, before["version"], "5s")
    assert during["version"] != before["version"]
    routes = ratings_routes(during)
    # The fault's copy of each user route comes first; the user's routes follow unchanged.
    assert len(routes) == 4
    assert [r["name"].split(" ")[0] if r.get("name") else None for r in routes] == ["inject-fault", None, "inject-fault", None]
    assert routes[1] == ratings_routes(before)[0] and routes[3] == ratings_routes(before)[1]
    assert routes[2]["fault"]["delay"]["fixedDelay"] == "2s"

    listed = meshctl("inject-fault", "list", sd=sd).stdout
    assert "ratings" in listed and "delay 2s for 100%" in listed and "header:end-user=jason" in listed
    explained = meshctl("route", "explain", "GET", "http://ratings:9080/ratings/0", "-H", "end-user: jason", sd=sd).stdout
    assert "inject-fault" in explained and "fault injection configured" in explained
    plain = meshctl("route", "explain", "GET", "http://ratings:9080/ratings/0", "-H", "end-user: bob", sd=sd).stdout
    assert "route 3" in plain and "fault injection configured" not in plain
    assert meshctl("route", "get", "virtualservice", "ratings", "-o", "yaml", sd=sd).stdout == rules_before

    # No CLI runs now: Pilot alone ends the fault at its TTL and pushes the old config back.
    after = config(pilot, during["version"], "25s")
    elapsed = time.monotonic() - started
    assert after["version"] == before["version"]
    assert 14.0 < elapsed < 24.0, elapsed  # the TTL, plus the CLI start-up before the fault was stored
    assert json.loads((sd / "faults.json").read_text())["faults"] == []
    assert "no injected faults" in meshctl("inject-fault", "list", sd=sd).stdout
    assert meshctl("route", "get", "virtualservice", "ratings", "-o", "yaml", sd=sd).stdout == rules_before


def test_clear_by_service_removes_only_that_service_and_restores_the_config(pilot):
    sd = pilot["sd"]
    before = config(pilot)
    out = meshctl("inject-fault", "ratings", "--abort", "503", "--percent", "50", "--no-wait", sd=sd).stdout
    fid = out.split()[1]
    during = config(pilot, before["version"], "5s")
    assert ratings_routes(during)[0]["fault"]["abort"] == {"httpStatus": 503, "percentage": {"value": 50.0}}
    assert fid in meshctl("inject-fault", "list", sd=sd).stdout
    cleared = meshctl("inject-fault", "clear", "ratings", "--no-wait", sd=sd).stdout
    assert f"fault {fid} on ratings cleared" in cleared
    assert config(pilot, during["version"], "5s")["version"] == before["version"]
    assert "no injected faults" in meshctl("inject-fault", "clear", sd=sd).stdout


def test_shell_completion_offers_the_verbs_and_the_mesh_services(pilot):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("meshctl_state_dir",)}
    env.update(_MESHCTL_COMPLETE="complete_bash", COMP_WORDS="meshctl inject-fault ", COMP_CWORD="2")
    r = subprocess.run([sys.executable, "-c", "from meshctl.cli.main import app; app(prog_name='meshctl')"],
                       capture_output=True, text=True, env=env, cwd=pilot["sd"].parent, timeout=30)
    assert {"list", "clear", "ratings"} <= set(r.stdout.split()), r
