"""Citadel in `meshctl up`: the CA, the signing process, and each proxy's bootstrap token.

- ``start_citadel(sup, port)``: create the CA in the state directory if there is
  none (trust domain from mesh settings), then run ``meshctl citadel serve``
  as a control-plane process of its own (beside Pilot), on the port the plan
  allocated from the mesh's port range; it writes its URL as ``citadel`` into
  control.json. Workload certificate lifetime: ``MESHCTL_CERT_TTL`` (e.g.
  ``6s`` for rotation tests), else Citadel's default (24h).
- ``proxy_env(sup, p)``: the environment a sidecar or gateway is (re)started
  with: ``MESHCTL_BOOTSTRAP_FILE``, the path of a one-time 0600 file holding
  its Pilot credential and, with Citadel, ``MESHCTL_CITADEL_URL`` and a fresh
  one-time ``MESHCTL_CITADEL_TOKEN`` for its identity
  (``spiffe://<td>/ns/<namespace>/sa/<service>``, read from its node file).
  The sidecar reads the file and deletes it: no secret in argv, nor in
  /proc/PID/environ (which keeps a process's initial environment for its
  whole life). A new token on every start, since a restarted proxy cannot
  redeem the one its predecessor spent.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

ENV_TTL = "MESHCTL_CERT_TTL"
TOKEN_TTL = timedelta(minutes=10)

__all__ = ["identity_of_node", "proxy_env", "start_citadel", "status", "stop_citadel"]


def identity_of_node(node_file: Path) -> str:
    """The SPIFFE ID of the workload a node file describes (what Pilot expects of it)."""
    from ..loader.codec import from_data
    from ..pilot.compile import Node

    node = from_data(Node, json.loads(node_file.read_text()), path="", file=str(node_file))
    return node.workload.spiffe_id


async def start_citadel(sup, port: int) -> None:
    """Start Citadel for ``sup`` (a supervisor.run.Supervisor) on ``port`` (the plan's)
    and wait until it answers."""
    from ..citadel.errors import CitadelError
    from ..citadel.store import ensure_ca
    from .run import ProcState, UpError, meshctl_argv

    td = sup.spec.settings.trust_domain
    try:
        ca = ensure_ca(sup.state_dir, td, now=datetime.now(timezone.utc))
    except CitadelError as e:
        raise UpError(f"Citadel: {e}") from None
    if ca.trust_domain != td:
        raise UpError(
            f"the CA in {sup.state_dir} is for trust domain {ca.trust_domain!r}, but mesh settings say {td!r}: "
            "fix settings.trustDomain, or remove the state directory's ca/ to start a new CA"
        )
    argv = meshctl_argv("citadel", "serve", "--port", str(port), "--trust-domain", td,
                        "--state-dir", str(sup.state_dir))
    ttl = os.environ.get(ENV_TTL)
    if ttl:
        argv += ["--cert-ttl", ttl]
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    p = ProcState(name="citadel", kind="control-plane", argv=argv, env=env, cwd=str(sup.state_dir),
                  log=sup.logs / "citadel.log")
    sup.citadel = p
    sup.citadel_url = f"http://127.0.0.1:{port}"
    await sup.start_role(p, "Citadel", port, "/healthz")
    sup.event(f"citadel ready at {sup.citadel_url} (trust domain {td})")


async def stop_citadel(sup) -> None:
    p = getattr(sup, "citadel", None)
    if p is not None:
        await sup.stop_proc(p)
        from ..state import write_control

        write_control(sup.state_dir, citadel=None)


def proxy_env(sup, p) -> dict[str, str]:
    """``p.env`` plus ``MESHCTL_BOOTSTRAP_FILE`` (the Pilot credential; with Citadel
    its URL and a fresh bootstrap token) for a sidecar or gateway; ``p.env``
    unchanged otherwise."""
    from ..credentials import ENV_BOOTSTRAP, mesh_credential, proxy_credential, write_bootstrap

    if p.kind not in ("sidecar", "gateway"):
        return p.env
    entries = {"pilot_credential": proxy_credential(mesh_credential(sup.state_dir), p.name)}
    url = getattr(sup, "citadel_url", "")
    if url:
        node_file = sup.state_dir / "nodes" / f"{p.name}.json"
        try:
            identity = identity_of_node(node_file)
        except (OSError, ValueError) as e:
            sup.event(f"{p.kind} {p.name}: no identity ({e}); it starts without a certificate")
        else:
            from ..citadel.store import TokenFile

            token = TokenFile(sup.state_dir).issue_token(identity, TOKEN_TTL, datetime.now(timezone.utc))
            entries.update({"MESHCTL_CITADEL_URL": url, "MESHCTL_CITADEL_TOKEN": token})
    env = {k: v for k, v in p.env.items() if k not in ("MESHCTL_CITADEL_URL", "MESHCTL_CITADEL_TOKEN")}
    return {**env, ENV_BOOTSTRAP: str(write_bootstrap(sup.state_dir, p.name, entries))}


def status(sup) -> dict:
    """For status.json's control_plane: where Citadel listens and how it is."""
    p = getattr(sup, "citadel", None)
    return {"url": getattr(sup, "citadel_url", ""), "state": p.state if p else "stopped", "pid": p.pid if p else None}
