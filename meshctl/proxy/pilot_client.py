"""The proxy's side of Pilot: register, long-poll for config, ACK or NACK it.

    PUT  /v1/proxies/<name>                      once, and again whenever Pilot forgets us
    GET  /v1/config/<name>?version=V&wait=30s    forever; 304 means nothing new
    POST /v1/ack/<name>                          {"version", "error"}: a NACK
    (an ACK is implicit: the next long-poll names the version now running)

A config that fails to load or apply is NACKed with the reason and the proxy
keeps the one it runs. Every config applied is saved as the last good one, so
a proxy started while Pilot is down comes up from it. When Pilot goes away,
the proxy keeps serving and retries with backoff; when it returns, the proxy
re-registers and resyncs without restarting.

Every call carries the proxy's own credential (meshctl/credentials.py): Pilot
gives this proxy its own config and nothing else. The last good config on disk
is 0600 in a 0700 directory, as it names every endpoint and policy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Awaitable, Callable

import meshctl.proxy.aio as aio
from ..loader.codec import LoadError, from_data, to_data
from ..plainhttp import HTTPError, HTTPStatusError, PlainHTTPClient
from .ctlhttp import control_client
from ..loader.proxyconfig import dump_proxy_config
from ..model.proxyconfig import ProxyConfig
from ..model.proxyconfig import Node

log = logging.getLogger("meshctl.proxy.pilot")

Apply = Callable[[ProxyConfig], Awaitable[None]]


def last_good_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "proxies" / f"{name}.config.json"


def load_last_good(state_dir: Path, name: str) -> ProxyConfig | None:
    path = last_good_path(state_dir, name)
    try:
        return from_data(ProxyConfig, json.loads(path.read_text()), path="", file=str(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, LoadError) as e:
        log.warning("ignoring damaged last-good config %s: %s", path, e)
        return None


def save_last_good(state_dir: Path, cfg: ProxyConfig) -> None:
    from ..credentials import write_private

    write_private(last_good_path(state_dir, cfg.workload.name), json.dumps(dump_proxy_config(cfg)))


class PilotClient:
    def __init__(self, pilot_url: str, node: Node, apply: Apply, state_dir: Path | None, wait: str = "30s",
                 credential: str = "") -> None:
        self.url = pilot_url.rstrip("/")
        self.credential = credential
        self.node = node
        self.name = node.workload.name
        self.apply = apply
        self.state_dir = state_dir
        self.wait = wait
        self.version = ""
        self.connected = False
        self.last_error = ""
        self.synced = aio.Event()  # set after the first config from Pilot is applied

    async def run(self) -> None:
        backoff = 0.1
        headers = {"authorization": f"Bearer {self.credential}"} if self.credential else None
        async with control_client(timeout=10.0, read_timeout=None, headers=headers) as client:
            registered = False
            while True:
                try:
                    if not registered:
                        r = await client.put(f"{self.url}/v1/proxies/{self.name}", json=to_data(self.node))
                        r.raise_for_status()
                        registered = True
                    r = await client.get(f"{self.url}/v1/config/{self.name}", params={"version": self.version, "wait": self.wait})
                    if r.status_code == 404:
                        registered = False
                        continue
                    if r.status_code != 304:  # 304 is a long-poll's normal "nothing new", not an error
                        r.raise_for_status()
                    if not self.connected:
                        log.info("connected to Pilot at %s", self.url)
                    self.connected, self.last_error, backoff = True, "", 0.1
                    if r.status_code == 304:
                        continue
                    await self._take(client, r.json())
                except (HTTPError, ValueError) as e:
                    answer = e.response if isinstance(e, HTTPStatusError) else None
                    refused = answer is not None and answer.status_code in (401, 403)
                    if answer is not None and refused and (self.connected or not self.last_error):
                        log.error("Pilot at %s refused this proxy (%d): %s; serving config %s, retrying", self.url,
                                  answer.status_code, answer.text.strip()[:300], self.version or "(none)")
                    elif self.connected or not self.last_error:
                        log.warning("Pilot at %s unreachable (%s); serving config %s, retrying", self.url, e, self.version or "(none)")
                    self.connected, self.last_error = False, f"{e.__class__.__name__}: {e}"
                    registered = False
                    await aio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)

    async def _take(self, client: PlainHTTPClient, data: dict) -> None:
        version = str(data.get("version", ""))
        try:
            cfg = from_data(ProxyConfig, data, path="", file=f"pilot config {version}")
            await self.apply(cfg)
        except Exception as e:  # any reason to refuse is reported to Pilot, never crashes the proxy
            reason = str(e) or e.__class__.__name__
            log.error("rejected config %s: %s (keeping %s)", version, reason, self.version or "none")
            # Pilot will not send this version again; we keep asking with the one we run.
            await client.post(f"{self.url}/v1/ack/{self.name}", json={"version": version, "error": reason})
            return
        # The ACK is the next long-poll, which names this version (as xDS does).
        self.version = version
        if self.state_dir is not None:
            save_last_good(self.state_dir, cfg)
        self.synced.set()
        log.info("applied config %s", version)


def _same_listeners(cfg: ProxyConfig, node: Node) -> bool:
    """Whether a saved config was made for this node's listeners (the mesh.yaml now in force)."""
    def key(ls) -> set[tuple]:
        return {(lst.name, lst.direction, lst.port, lst.protocol, lst.service_port) for lst in ls}

    # a Sidecar's ingress adds listeners of its own (pilot/compile.py ingress_listeners)
    return key(lst for lst in cfg.listeners if not lst.name.startswith("ingress-")) == key(node.listeners)


async def first_config(client: PilotClient, pilot_grace: float = 1.0) -> ProxyConfig:
    """The config to start with: Pilot's current one when Pilot answers; the last good
    one on disk only while Pilot does not answer (so a proxy starts while Pilot is
    down), and only if it was made for the same listeners: a last good config never
    outranks a newer mesh.yaml."""
    last_good = load_last_good(client.state_dir, client.name) if client.state_dir is not None else None
    if last_good is not None and not _same_listeners(last_good, client.node):
        log.info("ignoring last good config %s: made for other listeners (mesh.yaml changed)", last_good.version)
        last_good = None
    got: list[ProxyConfig] = []
    probing = aio.CancelScope()

    async def keep(cfg: ProxyConfig) -> None:
        got.append(cfg)
        # Stop before the probe's next long-poll: that would ACK the version to Pilot
        # before the proxy runs (and saves) it.
        probing.cancel()

    async def run_probe() -> None:
        with probing:
            await probe.run()

    # No state dir: the probe's "apply" only keeps the config, it must not save it as good.
    probe = PilotClient(client.url, client.node, keep, None, wait="0s", credential=client.credential)
    async with aio.open_nursery() as n:
        n.start_soon(run_probe)
        with aio.move_on_after(pilot_grace if last_good is not None else float("inf")):
            while not got:
                await aio.sleep(0.01)
        n.cancel_scope.cancel()
    if got:
        return got[0]
    assert last_good is not None
    log.info("starting from last good config %s (Pilot does not answer)", last_good.version)
    return last_good


async def run_with_pilot(runtime, pilot_url: str, node: Node, state_dir: Path | None, admin_port: int | None,
                         credential: str = "") -> None:
    """Serve under Pilot: start from the best config at hand, follow Pilot until drained."""
    client = PilotClient(pilot_url, node, runtime.apply_async, state_dir, credential=credential)
    cfg = await first_config(client)
    async with aio.open_nursery() as n:

        async def serve(task_status=aio.TASK_STATUS_IGNORED) -> None:
            await runtime.run(cfg, admin_port=admin_port, task_status=task_status)
            n.cancel_scope.cancel()  # drained: stop following Pilot too

        await n.start(serve)
        # Ask with no version even when started from disk, so Pilot hears our ACK.
        n.start_soon(client.run)
