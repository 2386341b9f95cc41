"""A sidecar process on evloop (MESHCTL_PROXY_LOOP=evloop): it serves, times out, fails over a
dead endpoint and drains as on trio; evloop is a sidecar's default, trio is chosen by name, and
a loop that is not a runtime is refused by name. On evloop a sidecar imports no trio (nor its
dependencies): ~4 MB of resident memory per sidecar."""

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
    curl,
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


TRIO_FAMILY = ("trio", "outcome", "attr", "attrs", "sortedcontainers", "sniffio", "idna")


def _imported_after_exec(log: str) -> set[str]:
    """The top-level packages the sidecar process imported, from PYTHONPROFILEIMPORTTIME's
    lines on its stderr: those after the last header (`meshctl proxy run` execs the lean
    sidecar entry, which starts a new list)."""
    lines = log.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("import time: self [us]")]
    assert len(heads) == 2, "expected the CLI's imports, then the exec'd sidecar's"
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines[heads[-1] + 1:]
            if line.startswith("import time:")}


@pytest.mark.trio
async def test_a_sidecar_on_evloop_imports_no_trio_while_it_serves_http1_and_http2(proxy_process, upstream):
    found = {}
    for loop in ("default", "trio"):
        lp = free_port()
        p = proxy_process(_cfg([("127.0.0.1", upstream.port)], lp), loop=loop, env={"PYTHONPROFILEIMPORTTIME": "1"})
        for flags in ((), ("--http2-prior-knowledge",)):
            r = await curl(*flags, "--connect-to", f"reviews:9080:127.0.0.1:{lp}", "-s", "-o", "/dev/null",
                           "-w", "%{http_code} %{http_version}", "http://reviews:9080/")
            assert r.stdout.decode() == ("200 2" if flags else "200 1.1"), r
        assert p.stop() == 0
        found[loop] = _imported_after_exec(p.log_path.read_text(errors="replace"))
    assert {"meshctl", "httptools"} <= found["default"]  # (the lines were read)
    assert not set(TRIO_FAMILY) & found["default"], sorted(found["default"])
    assert "trio" in found["trio"]


def test_a_loop_that_is_not_a_runtime_is_refused_by_name(tmp_path, upstream):
    path = write_config(_cfg([("127.0.0.1", upstream.port)], free_port()), tmp_path / "p.json")
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(path), "--admin-port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env=sidecar_env("uvloop"), cwd=tmp_path)
    assert r.returncode == 2
    assert "MESHCTL_PROXY_LOOP='uvloop' is not a runtime" in r.stderr
