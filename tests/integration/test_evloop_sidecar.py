"""A sidecar process on evloop (MESHCTL_PROXY_LOOP=evloop, issue 12's experiment): it serves,
times out, fails over a dead endpoint and drains as on trio, and refuses by name what it cannot
run yet (clients that live on trio: Pilot, Mixer, span export, ext-authz, DNS)."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from proxy_testkit import (
    MESHCTL,
    cluster,
    config,
    free_port,
    outbound_listener,
    route_to,
    sidecar_env,
    vhost,
    write_config,
)
from meshctl.model.proxyconfig import Settings
from meshctl.model.base import Duration

pytestmark = pytest.mark.e2e


def _cfg(endpoints, lp: int, settings: Settings | None = None, **route_kw):
    return config(
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, **route_kw),))],
        clusters=[cluster("reviews", 9080, endpoints)],
        settings=settings,
    )


def test_a_sidecar_on_evloop_serves_times_out_fails_over_and_drains(proxy_process, upstream):
    dead = free_port()  # nothing listens: connect refused
    lp = free_port()
    p = proxy_process(_cfg([("127.0.0.1", upstream.port), ("127.0.0.1", dead)], lp, timeout=0.5),
                      loop="evloop")
    assert "running on evloop" in p.log()
    proxy = f"http://127.0.0.1:{lp}"
    with httpx.Client(proxy=proxy, timeout=10) as c:  # keep-alive: one downstream connection
        # every request answered, though half of the picks are the dead endpoint (connect-failure retried)
        for i in range(20):
            r = c.get(f"http://reviews:9080/n{i}")
            assert r.status_code == 200, r.text
            assert r.json()["upstream"] == "up"
        t0 = time.monotonic()
        r = c.get("http://reviews:9080/slow?ms=3000")
        assert r.status_code == 504  # the route's 0.5 s timeout, on evloop's clock
        assert time.monotonic() - t0 < 2.5
        assert c.get("http://reviews:9080/after").status_code == 200
    stats = httpx.get(p.admin + "/stats").text
    assert 'meshctl_downstream_rq_total{listener="outbound"} 22' in stats
    assert 'meshctl_response_flags_total{flag="UT"} 1' in stats
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHCTL, "proxy", "run", *args, "--admin-port", str(free_port())],
                          capture_output=True, text=True, timeout=60, env=sidecar_env("evloop"), cwd=tmp_path)


def test_evloop_refuses_by_name_what_it_cannot_run_yet(tmp_path, upstream):
    lp = free_port()
    traced = Settings(connect_timeout=Duration(1.0), tracing_zipkin="zipkin://127.0.0.1:9411")
    path = write_config(_cfg([("127.0.0.1", upstream.port)], lp, settings=traced), tmp_path / "t.json")
    r = _run(tmp_path, "--config", str(path))
    assert r.returncode == 2
    assert "tracing" in r.stderr and "MESHCTL_PROXY_LOOP=evloop" in r.stderr
    plain = write_config(_cfg([("127.0.0.1", upstream.port)], lp), tmp_path / "p.json")
    r = _run(tmp_path, "--config", str(plain), "--mixer", "http://127.0.0.1:1")
    assert r.returncode == 2 and "Mixer" in r.stderr
    node = tmp_path / "node.json"
    node.write_text('{"name": "a-0", "service": "a"}')
    r = _run(tmp_path, "--pilot", "http://127.0.0.1:1", "--node", str(node))
    assert r.returncode == 2 and "Pilot" in r.stderr


def test_a_loop_that_is_not_a_runtime_is_refused_by_name(tmp_path, upstream):
    path = write_config(_cfg([("127.0.0.1", upstream.port)], free_port()), tmp_path / "p.json")
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(path), "--admin-port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env=sidecar_env("uvloop"), cwd=tmp_path)
    assert r.returncode == 2
    assert "MESHCTL_PROXY_LOOP='uvloop' is not a runtime" in r.stderr
