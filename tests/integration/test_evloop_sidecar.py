"""A sidecar process on evloop (MESHCTL_PROXY_LOOP=evloop): it serves, times out, fails over a
dead endpoint and drains as on trio; evloop is a sidecar's default, trio is chosen by name, and
a loop that is not a runtime is refused by name."""

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


def test_evloop_is_the_default_and_trio_can_be_chosen(proxy_process, upstream):
    for loop, runs_on in (("default", "evloop"), ("trio", "trio")):
        lp = free_port()
        p = proxy_process(_cfg([("127.0.0.1", upstream.port)], lp), loop=loop)
        assert f"running on {runs_on}" in p.log()
        assert httpx.get("http://reviews:9080/", proxy=f"http://127.0.0.1:{lp}", timeout=10).status_code == 200


def test_a_loop_that_is_not_a_runtime_is_refused_by_name(tmp_path, upstream):
    path = write_config(_cfg([("127.0.0.1", upstream.port)], free_port()), tmp_path / "p.json")
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(path), "--admin-port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env=sidecar_env("uvloop"), cwd=tmp_path)
    assert r.returncode == 2
    assert "MESHCTL_PROXY_LOOP='uvloop' is not a runtime" in r.stderr
