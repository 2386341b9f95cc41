"""The inbound rate-limit stage: meshctl RateLimit resources (core.ratelimit decides).

Every RateLimit that selects this workload (``ProxyConfig.rate_limits``,
by "namespace/name") gets one ``RateLimiter``, kept across config versions
while its spec is unchanged (so buckets and quota are not reset by an
unrelated push). A request must pass every one of them, in name order.

Limited requests are answered here: 429 with ``retry-after`` and
``x-ratelimit-*`` headers, response flag ``RL`` (counted in the metrics).

Global quotas are drawn from Mixer (``POST {mixer}/v1/quota``) in batches by
core.ratelimit.QuotaBatcher. Asks run as background tasks; a request that
finds no tokens while an ask is in flight waits for it (at most
``ASK_TIMEOUT``). Mixer unreachable, or no Mixer configured: the batcher
fails open or closed as its ``failureModeDeny`` says.
"""

from __future__ import annotations

import logging

import meshctl.proxy.aio as aio
from ..core.ratelimit import Allowed, AskMixer, Grant, Limited, RateLimitConfigError, RateLimiter, WaitForGrant
from ..plainhttp import HTTPError
from .ctlhttp import ClientPool
from .request import LocalReply

log = logging.getLogger("meshctl.proxy.ratelimit")

ASK_TIMEOUT = 1.0
RL = "RL"


class RateLimits:
    """The RateLimiters of one sidecar, and its conversation with Mixer."""

    def __init__(self, mixer_url: str | None = None, proxy_name: str = "") -> None:
        self.mixer_url = mixer_url.rstrip("/") if mixer_url else None
        self.proxy_name = proxy_name
        self.mixer_credential = ""  # this proxy's control-plane credential (meshctl/credentials.py)
        self.limiters: list[RateLimiter] = []
        self._specs: dict[str, object] = {}
        self._cfg = None
        self._changed = aio.Event()  # set whenever a grant or a failure comes back
        self._clients: ClientPool | None = None  # asks run concurrently (one per batcher due)
        self.asks_sent = 0

    def sync(self, cfg, now: float) -> None:
        """Build limiters for ``cfg`` (once per config object)."""
        if cfg is self._cfg:
            return
        self._cfg = cfg
        if not self.proxy_name:
            self.proxy_name = cfg.workload.name
        specs = dict(getattr(cfg, "rate_limits", None) or {})
        old = {lim.name: lim for lim in self.limiters}
        out = []
        for name in sorted(specs):
            spec = specs[name]
            if name in old and self._specs.get(name) == spec:
                out.append(old[name])
                continue
            try:
                out.append(RateLimiter(name, spec, now))
            except RateLimitConfigError as exc:  # Pilot validates; a hand-written config may not
                log.error("RateLimit %s ignored: %s", name, exc)
        self.limiters = out
        self._specs = specs

    def check(self, *, path: str, method: str, principal: str | None, now: float):
        """Allowed, the first Limited, or WaitForGrant (then check again after ``wait``)."""
        for lim in self.limiters:
            d = lim.check(path=path, method=method, principal=principal, now=now)
            if not isinstance(d, Allowed):
                return d
        return None

    def pending_asks(self, now: float) -> list[tuple[RateLimiter, AskMixer]]:
        return [(lim, a) for lim in self.limiters for a in lim.asks(now)]

    async def ask(self, lim: RateLimiter, a: AskMixer) -> None:
        """One ask to Mixer; reports the grant or the failure to the batcher."""
        b = lim.batcher(a.key)
        grant = None
        self.asks_sent += 1
        if self.mixer_url is not None:
            if self._clients is None:
                headers = {"authorization": f"Bearer {self.mixer_credential}"} if self.mixer_credential else None
                self._clients = ClientPool(timeout=ASK_TIMEOUT, headers=headers)
            try:
                with aio.fail_after(ASK_TIMEOUT):
                    r = await self._clients.request("POST", f"{self.mixer_url}/v1/quota", json={
                        "key": a.key, "proxy": self.proxy_name, "tokens": a.tokens,
                        "limit": b.limit, "unit_seconds": b.unit_seconds,
                    })
                if r.status_code == 200:
                    d = r.json()
                    grant = Grant(int(d["granted"]), float(d["valid_for"]), bool(d.get("exhausted", False)))
                else:
                    log.warning("mixer quota %s: HTTP %d %s", a.key, r.status_code, r.text[:200])
            except (HTTPError, aio.TooSlowError, ValueError, KeyError) as exc:
                log.warning("mixer quota %s: %s", a.key, exc.__class__.__name__ + (f": {exc}" if str(exc) else ""))
        now = aio.current_time()
        if grant is not None:
            b.on_grant(grant, now)
        else:
            b.on_failure(now)
        ev, self._changed = self._changed, aio.Event()
        ev.set()

    async def wait(self) -> None:
        with aio.move_on_after(ASK_TIMEOUT * 2):
            await self._changed.wait()


class RateLimitStage:
    name = "ratelimit"

    async def on_request(self, rq):
        cfg = rq.snap.cfg
        if not getattr(cfg, "rate_limits", None):
            return None
        rt = rq.rt
        rls: RateLimits = rt.ratelimits
        rls.sync(cfg, aio.current_time())
        head = rq.head
        # the mTLS-verified peer when there is one, else what the source sidecar said
        principal = getattr(rq.down, "peer_id", None)
        if principal is None and rq.peer is not None and rq.peer.principal != "unknown":
            principal = rq.peer.principal
        for _ in range(4):
            now = aio.current_time()
            d = rls.check(path=head.path, method=head.method, principal=principal, now=now)
            asks = rls.pending_asks(now)
            nursery = getattr(rt, "_nursery", None)
            for lim, a in asks:
                if nursery is not None:
                    nursery.start_soon(rls.ask, lim, a)
                else:
                    await rls.ask(lim, a)
            if d is None:
                return None
            if isinstance(d, Limited):
                return _limited(rq, d)
            assert isinstance(d, WaitForGrant)
            await rls.wait()
        # Mixer keeps us waiting: answer as if limited, briefly
        return _limited(rq, Limited(retry_after=1.0, reason="global-unavailable"))


def _limited(rq, d: Limited) -> LocalReply:
    rq.detail = f"rate limited ({d.reason})"
    headers = [("content-type", "text/plain"), ("x-meshctl-reason", "rate limited")] + d.headers()
    return LocalReply(429, b"local_rate_limited\n" if d.reason == "local" else b"rate_limited\n", headers, RL)


RATE_LIMIT = RateLimitStage()
