"""jwksUri fetching for RequestAuthentication, in Pilot (as istiod does).

Rules:
1. Pilot fetches every jwksUri the applied RequestAuthentications name (those
   without an inline ``jwks``; with neither, the issuer's OpenID discovery
   document ``<issuer>/.well-known/openid-configuration`` names the jwks_uri) and pushes the JWKS text inside each proxy's
   config (``ProxyConfig.jwks``), so sidecars never fetch anything and a
   request never waits for a key fetch.
2. A new uri is fetched at once; known ones are refreshed every
   ``PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`` (Istio's variable, default 20m).
   A failed fetch is retried after ``RETRY`` seconds (doubling, up to the
   refresh interval).
3. A failed fetch, or a document that is not a JWKS with usable keys, never
   replaces the last good set: proxies keep verifying with the keys they have.
   The last good sets are kept in ``<state>/pilot/jwks.json``, so a restarted
   Pilot has them even while the uri is down.
4. Proxies are pushed a new config only when a set changes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import httpx
import trio

from ..core.jwt import DISCOVERY, parse_jwks
from ..loader.codec import LoadError, parse_duration

log = logging.getLogger("meshctl.pilot.jwks")

DEFAULT_REFRESH = 20 * 60.0
RETRY = 1.0
DEFAULT_TIMEOUT = 5.0


def refresh_interval() -> float:
    text = os.environ.get("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL", "").strip()
    if not text:
        return DEFAULT_REFRESH
    try:
        return max(0.1, float(parse_duration(text)))
    except (LoadError, ValueError):
        log.warning("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL=%r is not a duration; using 20m", text)
        return DEFAULT_REFRESH


class JwksFetchError(Exception):
    pass


def fetch_jwks(uri: str, timeout: float) -> str:
    """GET the uri; the body when it is a JWKS with at least one usable key. An
    OpenID discovery document's URL is followed to its ``jwks_uri``."""
    if uri.endswith(DISCOVERY):
        try:
            d = httpx.get(uri, timeout=timeout, follow_redirects=True, trust_env=False)
            doc = d.json() if d.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as e:
            raise JwksFetchError(f"{uri}: {e or type(e).__name__}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("jwks_uri"), str):
            raise JwksFetchError(f"{uri}: not an OpenID discovery document with a jwks_uri")
        uri = doc["jwks_uri"]
    try:
        r = httpx.get(uri, timeout=timeout, follow_redirects=True, trust_env=False)
    except httpx.HTTPError as e:
        raise JwksFetchError(f"{uri}: {e or type(e).__name__}") from None
    if r.status_code != 200:
        raise JwksFetchError(f"{uri}: HTTP {r.status_code}")
    try:
        keys = parse_jwks(r.text)
    except ValueError as e:
        raise JwksFetchError(f"{uri}: {e}") from None
    if not keys:
        raise JwksFetchError(f"{uri}: no usable signing key in the JWKS")
    return r.text


class JwksResolver:
    """The JWKS of each jwksUri in use, kept fresh by ``run``."""

    def __init__(self, state_dir: Path | str, on_change: Callable[[], None]) -> None:
        self.path = Path(state_dir) / "pilot" / "jwks.json"
        self.on_change = on_change
        self.keys: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.fetched_at: dict[str, float] = {}
        self._wanted: dict[str, float] = {}  # uri → fetch timeout
        self._next: dict[str, float] = {}  # uri → when to fetch next (monotonic)
        self._backoff: dict[str, float] = {}
        self._wake = trio.Event()
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.keys = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError):
            pass

    def want(self, uris: Iterable[tuple[str, float]]) -> None:
        """The (uri, timeout) pairs the rules name now; new ones are fetched at once."""
        wanted = dict(uris)
        new = [u for u in wanted if u not in self._wanted]
        self._wanted = wanted
        for u in new:
            self._next[u] = 0.0
        if new:
            self._wake.set()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.keys, indent=1))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not save JWKS cache %s: %s", self.path, e)

    async def run(self) -> None:
        refresh = refresh_interval()
        while True:
            now = time.monotonic()
            due = [u for u in self._wanted if self._next.get(u, 0.0) <= now]
            changed = False
            for uri in due:
                try:
                    text = await trio.to_thread.run_sync(fetch_jwks, uri, self._wanted[uri])
                except JwksFetchError as e:
                    back = min(refresh, self._backoff.get(uri, RETRY / 2) * 2)
                    self._backoff[uri] = back
                    self._next[uri] = time.monotonic() + back
                    if self.errors.get(uri) != str(e):
                        kept = "keeping the last good key set" if uri in self.keys else "no keys yet"
                        log.warning("jwksUri fetch failed (%s): %s", kept, e)
                    self.errors[uri] = str(e)
                    continue
                self._backoff.pop(uri, None)
                self.errors.pop(uri, None)
                self.fetched_at[uri] = time.time()
                self._next[uri] = time.monotonic() + refresh
                if self.keys.get(uri) != text:
                    self.keys[uri] = text
                    changed = True
                    log.info("jwksUri %s: new key set", uri)
            if changed:
                self._save()
                self.on_change()
            nxt = min((self._next.get(u, 0.0) for u in self._wanted), default=None)
            wait = refresh if nxt is None else max(0.05, nxt - time.monotonic())
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()
