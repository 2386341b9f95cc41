"""RateLimit on a real inbound sidecar: local token bucket, global quota through a real Mixer, failure modes."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
import trio

from meshctl.loader.resources import load_resources_text
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener
from meshctl.mixer.server import Mixer, run_mixer
from meshctl.credentials import proxy_credential

from proxy_testkit import config, free_port
from test_metrics import scrape, sidecar, value, with_workload


def rate_limit(yaml_spec: str):
    text = "apiVersion: meshctl.io/v1alpha1\nkind: RateLimit\nmetadata: {name: ratings-limit}\nspec:\n" + yaml_spec
    (r,) = load_resources_text(text, "rl.yaml")
    return FrozenDict({"default/ratings-limit": r.spec})


def inbound_cfg(app_port: int, limits):
    port = free_port()
    cfg = with_workload(
        config(listeners=[Listener(name="inbound", direction="inbound", address="127.0.0.1", port=port,
                                   service="ratings", app_address="127.0.0.1", app_port=app_port)]),
        "ratings-v1-0", "ratings", "v1")
    return replace(cfg, rate_limits=limits), port


async def burst(port: int, n: int = 50, gap: float = 0.01):
    statuses, limited = [], []
    async with httpx.AsyncClient(trust_env=False) as c:
        for _ in range(n):
            r = await c.get(f"http://127.0.0.1:{port}/ratings/1", headers={"host": "ratings:9080"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                limited.append(r)
            await trio.sleep(gap)
    return statuses, limited


async def test_local_limit_of_10_per_second(upstream):
    cfg, port = inbound_cfg(upstream.port, rate_limit(
        "  local: {tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}}\n"))
    async with sidecar(cfg) as rt:
        t0 = trio.current_time()
        statuses, limited = await burst(port)
        took = trio.current_time() - t0
        m = await scrape(rt)
    ok = statuses.count(200)
    if took < 0.95:  # within one fill interval: exact
        assert ok == 10
    else:  # a slow machine: one refill of 10 may have come
        assert 10 <= ok <= 20
    assert statuses.count(429) == 50 - ok
    assert statuses[:10] == [200] * 10 and statuses[10] == 429
    r = limited[0]
    assert 1 <= int(r.headers["retry-after"]) <= 1
    assert r.headers["x-ratelimit-limit"] == "10" and r.headers["x-ratelimit-remaining"] == "0"
    assert "x-ratelimit-reset" in r.headers
    assert value(m["istio_requests_total"], reporter="destination", response_code="429", response_flags="RL") == 50 - ok
    assert value(m["istio_requests_total"], reporter="destination", response_code="200") == ok
    assert len(upstream.requests) == ok  # limited requests never reach the app


async def test_global_quota_through_mixer(upstream):
    async with trio.open_nursery() as n:
        mixer = Mixer(mesh_secret="mesh.test-secret")
        mport = await n.start(run_mixer, mixer, "127.0.0.1", 0)
        # Mixer's windows are whole minutes of the (shared, in-process) trio clock: start early in one
        left = 60 - trio.current_time() % 60
        if left < 5:
            await trio.sleep(left + 0.01)
        cfg, port = inbound_cfg(upstream.port, rate_limit("  global: {requestsPerUnit: 10, unit: MINUTE}\n"))
        async with sidecar(cfg) as rt:
            rt.ratelimits.mixer_url = f"http://127.0.0.1:{mport}"
            rt.ratelimits.mixer_credential = proxy_credential("mesh.test-secret", "ratings-v1-0")  # its own
            statuses, limited = await burst(port, n=30, gap=0.005)
            m = await scrape(rt)
        n.cancel_scope.cancel()
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert int(limited[-1].headers["retry-after"]) >= 1
    assert mixer.quotas["default/ratings-limit"].used == 10
    assert value(m["istio_requests_total"], response_code="429", response_flags="RL") == 20


@pytest.mark.parametrize("deny,expect", [(False, 200), (True, 429)])
async def test_mixer_unreachable_fails_open_or_closed(upstream, deny, expect):
    cfg, port = inbound_cfg(upstream.port, rate_limit(
        f"  global: {{requestsPerUnit: 5, unit: SECOND, failureModeDeny: {str(deny).lower()}}}\n"))
    async with sidecar(cfg) as rt:
        rt.ratelimits.mixer_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        with trio.fail_after(10):
            statuses, _ = await burst(port, n=12, gap=0.0)
    assert statuses == [expect] * 12
