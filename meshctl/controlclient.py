"""The CLI's one client for the running control plane (Pilot, Mixer).

Every `meshctl` command that talks to the control plane goes through here:
where each role listens (control.json), the mesh credential sent with every
call (meshctl/credentials.py), and the few conversations the CLI has:
reload the rules or the injected faults, wait until every proxy runs the
change, Pilot's proxy status and a proxy's config, the endpoints Pilot routes
with (or the stored ones when Pilot is down), the config a proxy would get
compiled offline, and Mixer's `top`. CLI files parse, call this, and render.

Errors are ``ControlPlaneError`` with a message fit for the user: the role is
not running, not answering, or refused the call (and why).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .credentials import CredentialError, bearer, mesh_credential, mesh_token_path
from .loader.codec import from_data
from .registry.base import Instance
from .state import read_control

ROLES = {"pilot": "Pilot", "mixer": "Mixer"}


class ControlPlaneError(Exception):
    """A control-plane call failed; the message says which role and why."""


class NotRunning(ControlPlaneError):
    pass


class Unreachable(ControlPlaneError):
    pass


class Refused(ControlPlaneError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SyncResult:
    synced: bool
    proxies: list[dict] = field(default_factory=list)
    nacked: list[dict] = field(default_factory=list)

    def behind(self) -> str:
        return ", ".join(f"{p['proxy']} ({p['status']}, acked {p['acked'] or '-'}, wants {p['current']})"
                         for p in self.proxies if p.get("status") != "SYNCED")


class ControlClient:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    # ------------------------------------------------------------ plumbing

    def url(self, role: str) -> str | None:
        """Where ``role`` listens, or None when it is not running."""
        return read_control(self.state_dir).get(role)

    def require(self, role: str) -> str:
        url = self.url(role)
        if not url:
            raise NotRunning(f"{ROLES.get(role, role)} is not running for {self.state_dir} (no {role} address in "
                             f"control.json): start it with `meshctl up` or `meshctl {role} serve`")
        return url

    def credential(self) -> str:
        """The mesh credential; "" when the state directory has none (a mesh whose Pilot
        is gone: the call then fails as unreachable, or 401 naming the missing file)."""
        if not mesh_token_path(self.state_dir).exists():
            return ""
        try:
            return mesh_credential(self.state_dir, create=False)
        except CredentialError as e:  # another user's mesh: say so, do not try without
            raise ControlPlaneError(str(e)) from None

    def call(self, role: str, method: str, path: str, *, json_body: Any = None, timeout: float = 5.0,
             ok: tuple[int, ...] = (200,)) -> httpx.Response:
        """One authenticated call; ``ok``: the statuses that are not errors."""
        url = self.require(role)
        try:
            cred = self.credential()
            r = httpx.request(method, url.rstrip("/") + path, json=json_body, timeout=timeout, trust_env=False,
                              headers=bearer(cred) if cred else None)
        except httpx.HTTPError as e:
            raise Unreachable(f"{ROLES.get(role, role)} at {url} is not answering: {e.__class__.__name__}: {e}") from e
        if r.status_code not in ok:
            try:
                msg = r.json().get("error", r.text)
            except (ValueError, AttributeError):
                msg = r.text.strip()
            if r.status_code == 401 and not self.credential():
                msg += f" (there is no mesh credential at {mesh_token_path(self.state_dir)})"
            raise Refused(f"{ROLES.get(role, role)} refused {method} {path} ({r.status_code}): {msg}", r.status_code)
        return r

    # ------------------------------------------------------------ Pilot

    def _poke(self, path: str) -> str | None:
        """POST ``path`` to a running Pilot; its URL, or None when Pilot is not running
        (it notices the store within a second anyway)."""
        url = self.url("pilot")
        if not url:
            return None
        try:
            self.call("pilot", "POST", path, timeout=2.0)
        except Unreachable:
            return None
        return url

    def reload_rules(self) -> str | None:
        return self._poke("/v1/rules/reload")

    def reload_faults(self) -> str | None:
        return self._poke("/v1/faults/reload")

    def status(self) -> dict:
        return self.call("pilot", "GET", "/v1/status").json()

    def wait_synced(self, timeout: float, *, stop_on_nack: bool = True) -> SyncResult:
        """Poll Pilot until every proxy ACKed the current config (or one NACKed it)."""
        deadline = time.monotonic() + timeout
        proxies: list[dict] = []
        while time.monotonic() < deadline:
            try:
                proxies = self.status()["proxies"]
            except (Unreachable, ValueError, KeyError):
                time.sleep(0.1)
                continue
            if all(p["status"] == "SYNCED" for p in proxies):
                return SyncResult(True, proxies)
            nacked = [p for p in proxies if p["status"] == "NACKED"]
            if nacked and stop_on_nack:
                return SyncResult(False, proxies, nacked)
            time.sleep(0.02)
        return SyncResult(False, proxies, [p for p in proxies if p.get("status") == "NACKED"])

    def proxy_config(self, proxy: str) -> dict | None:
        """The config Pilot computes for ``proxy`` (None: Pilot knows no such proxy)."""
        r = self.call("pilot", "GET", f"/v1/config/{proxy}?wait=0s", ok=(200, 404))
        return None if r.status_code == 404 else r.json()

    def mesh_tracing(self) -> bool | None:
        """Whether the running mesh has a tracing backend (settings.tracing zipkin or otlp), from
        the settings Pilot hands its proxies; None when Pilot is not running or knows no proxy."""
        if not self.url("pilot"):
            return None
        try:
            for p in self.status().get("proxies", []):
                cfg = self.proxy_config(str(p.get("proxy") or p.get("name") or ""))
                if cfg is None:
                    continue
                st = cfg.get("settings") or {}
                return bool(st.get("tracingZipkin") or st.get("tracing_zipkin")
                            or st.get("tracingOtlp") or st.get("tracing_otlp"))
        except (ControlPlaneError, ValueError, AttributeError):
            return None
        return None

    def pilot_registry(self, timeout: float) -> dict[str, tuple[Instance, ...]]:
        """The endpoints Pilot routes with; raises NotRunning / Unreachable when Pilot does not answer."""
        try:
            data = self.call("pilot", "GET", "/v1/registry", timeout=timeout).json()
        except ValueError as e:
            raise Unreachable(f"Pilot answered /v1/registry with something else than JSON: {e}") from None
        return {s: tuple(from_data(Instance, i) for i in insts) for s, insts in data.items()}

    def registry_snapshot(self) -> dict[str, tuple[Instance, ...]]:
        """The endpoints Pilot routes with, or the embedded registry's saved ones when Pilot is down."""
        if self.url("pilot"):
            try:
                data = self.call("pilot", "GET", "/v1/registry", timeout=2.0).json()
                return {s: tuple(from_data(Instance, i) for i in insts) for s, insts in data.items()}
            except (Unreachable, ValueError):
                pass
        from .registry.embedded import load_snapshot

        return dict(load_snapshot(self.state_dir))

    def offline_config(self, source: str | None):
        """Compile, without Pilot, the config a proxy of ``source`` would run: the stored
        rules, the registry as Pilot last saw it (or as stored), that proxy's node when
        one has registered, and the injected faults in force now."""
        from .model.base import FrozenDict
        from .model.proxyconfig import Listener, Workload
        from .pilot.compile import Inputs, Node, compile_proxy
        from .pilot.kvstore import open_rule_store
        from .pilot.store import StoreError

        store = open_rule_store(self.state_dir)
        try:
            resources = list(store.current().resources)
        except StoreError:  # Consul KV away: the rules this host's Pilot has in force
            resources = list(store.last_known().resources)
        snapshot = self.registry_snapshot()
        node = None
        nodes_file = self.state_dir / "pilot" / "nodes.json"
        if source and nodes_file.exists():
            for nd in json.loads(nodes_file.read_text()).values():
                n = from_data(Node, nd)
                if n.workload.service == source and not n.gateway:
                    node = n
                    break
        if node is None:
            svc = source or "explain"
            node = Node(
                workload=Workload(name=f"{svc}-explain", service=svc, labels=FrozenDict({"app": svc})),
                listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=0),),
            )
        return compile_proxy(Inputs(resources, snapshot, faults=self.injected_faults()), node)

    def injected_faults(self) -> tuple:
        """The injected faults (`meshctl inject-fault`) in force now, as Pilot layers them."""
        from .pilot.faults import FaultError, active_faults
        from .pilot.kvstore import open_fault_store

        try:
            return tuple(active_faults(open_fault_store(self.state_dir).load(), time.time()))
        except FaultError:
            return ()

    # ------------------------------------------------------------ Mixer

    def top(self, window: str) -> dict:
        return self.call("mixer", "GET", f"/v1/top?window={window}").json()


__all__ = ["ControlClient", "ControlPlaneError", "NotRunning", "Refused", "SyncResult", "Unreachable"]
