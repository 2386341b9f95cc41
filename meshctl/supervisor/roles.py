"""The three control-plane roles `meshctl up` runs, as one list of records.

Each role is a process of its own beside the others (none needs another to come
up): its argv, the port the plan allocated it, the path that answers once it
serves (its ready check, also after a restart), and what must happen before it
starts (Citadel: the CA in the state directory). The supervisor starts them
side by side in this order's tasks and stops them in this order, after the
workloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..launch import meshctl_argv
from ..model.mesh import MeshSettings
from .citadel import ENV_TTL
from .errors import UpError
from .plan import Plan


@dataclass(frozen=True)
class RoleContext:
    """What a role's argv, environment and pre-start hook are made from."""

    plan: Plan
    settings: MeshSettings
    state_dir: Path
    consul_token: str | None


@dataclass(frozen=True)
class Role:
    name: str  # its log (logs/<name>.log), its key in status.json and control.json
    title: str  # how messages name it
    port: Callable[[Plan], int]
    ready_path: str  # GET it answers 2xx/3xx once it serves
    argv: Callable[[RoleContext], list[str]]
    env: Callable[[RoleContext], dict[str, str]]
    ready_event: Callable[[RoleContext, str], str]  # the event once it is ready (given its URL)
    pre_start: Callable[[RoleContext], None] | None = None  # raises UpError when it cannot start
    announce: bool = False  # the supervisor writes its URL into control.json before it starts
    clear_on_stop: bool = False  # the supervisor removes its URL from control.json once it stopped


def _no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}


def _pilot_argv(c: RoleContext) -> list[str]:
    return meshctl_argv("pilot", "serve", "--port", str(c.plan.pilot_port), "--registry", c.settings.registry or "embedded",
                        "--trust-domain", c.settings.trust_domain, "--mesh-id", c.settings.mesh_id or c.settings.trust_domain,
                        "--state-dir", str(c.state_dir))


def _pilot_env(c: RoleContext) -> dict[str, str]:
    env = dict(os.environ)
    if c.consul_token:
        env["CONSUL_HTTP_TOKEN"] = c.consul_token
    return env


def _mixer_argv(c: RoleContext) -> list[str]:
    return meshctl_argv("mixer", "serve", "--port", str(c.plan.mixer_port), "--state-dir", str(c.state_dir))


def _citadel_argv(c: RoleContext) -> list[str]:
    argv = meshctl_argv("citadel", "serve", "--port", str(c.plan.citadel_port), "--trust-domain", c.settings.trust_domain,
                        "--state-dir", str(c.state_dir))
    ttl = os.environ.get(ENV_TTL)  # workload certificate lifetime (e.g. 6s for rotation tests)
    if ttl:
        argv += ["--cert-ttl", ttl]
    return argv


def _citadel_ca(c: RoleContext) -> None:
    """The CA in the state directory, created if there is none, for the mesh's trust domain."""
    from ..citadel.errors import CitadelError
    from ..citadel.store import ensure_ca

    td = c.settings.trust_domain
    try:
        _shared_root_checks(c)
        _sync_joined_host(c.state_dir)
        ca = ensure_ca(c.state_dir, td, now=datetime.now(timezone.utc))
    except CitadelError as e:
        raise UpError(f"Citadel: {e}") from None
    if ca.trust_domain != td:
        raise UpError(
            f"the CA in {c.state_dir} is for trust domain {ca.trust_domain!r}, but mesh settings say {td!r}: "
            "fix settings.trustDomain, or remove the state directory's ca/ to start a new CA"
        )


def _shared_root_checks(c: RoleContext) -> None:
    """With Consul, the CA must be the mesh's: a joined host must be in this meshId, and a
    host with no CA yet must not make a root of its own when the mesh has a shared one in
    Consul KV (the other hosts would refuse every certificate it signs)."""
    from ..citadel.errors import CitadelError
    from ..citadel.kv import KV, kv_prefix
    from ..citadel.store import has_ca, host_of

    registry = c.settings.registry or ""
    if not registry.startswith("consul"):
        return
    mesh = c.settings.mesh_id or c.settings.trust_domain
    joined = host_of(c.state_dir)
    if joined is not None:
        if joined["mesh"] != mesh:
            raise UpError(f"Citadel: this host joined the CA of mesh {joined['mesh']!r} (`citadel join`), but mesh "
                          f"settings say meshId {mesh!r}: join that mesh's CA, or fix settings")
        return
    if has_ca(c.state_dir):
        return
    try:
        kv = KV(registry, token=c.consul_token)
        shared = kv.get(kv_prefix(mesh) + "bundle")
    except CitadelError:
        return  # Consul away: `up` reports the registry itself
    if shared is not None:
        raise UpError(
            f"Citadel: mesh {mesh} has a shared root in Consul KV ({kv_prefix(mesh)}bundle); a root of this host's "
            "own would not be trusted by the other hosts. Join it first: "
            f"`meshctl citadel join --registry {kv.url} --host NAME`, then have the root holder approve it"
        )


def _sync_joined_host(state_dir: Path) -> None:
    """A host joined to a shared root (`citadel join`): take its intermediate and the
    bundle from Consul KV now, so `up` says at once when the root holder has not approved it."""
    from ..citadel.errors import CitadelError
    from ..citadel.hostca import sync
    from ..citadel.kv import open_kv
    from ..citadel.store import host_of

    joined = host_of(state_dir)
    if joined is None:
        return
    try:
        res = sync(state_dir, open_kv(joined["registry"]), datetime.now(timezone.utc), report=False)
    except CitadelError as e:  # Consul away: the files from the last sync still serve
        if not (state_dir / "ca" / "ca-cert.pem").exists():
            raise UpError(f"Citadel: {e}") from None
        return
    if not res.ready:
        raise UpError(f"Citadel: {res.message}")


CONTROL_ROLES: tuple[Role, ...] = (
    Role("pilot", "Pilot", lambda p: p.pilot_port, "/healthz", _pilot_argv, _pilot_env,
         lambda c, url: f"control plane ready at {url}"),
    # telemetry for `top`, global rate-limit quotas; sidecars get --mixer URL
    Role("mixer", "Mixer", lambda p: p.mixer_port, "/ready", _mixer_argv, lambda c: dict(os.environ),
         lambda c, url: f"mixer ready at {url}", announce=True, clear_on_stop=True),
    # the CA + `citadel serve` (it writes its own URL into control.json); one-time tokens by env (citadel.py)
    Role("citadel", "Citadel", lambda p: p.citadel_port, "/healthz", _citadel_argv, lambda c: _no_proxy_env(),
         lambda c, url: f"citadel ready at {url} (trust domain {c.settings.trust_domain})",
         pre_start=_citadel_ca, clear_on_stop=True),
)
