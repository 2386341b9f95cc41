"""Citadel in `meshctl up`: the CA, the signing process, and each proxy's bootstrap token.

- Citadel itself is one of the control roles of ``roles.py``: the CA in the
  state directory is created if there is none (trust domain from mesh
  settings), then ``meshctl citadel serve`` runs beside Pilot on the port the
  plan allocated; it writes its URL as ``citadel`` into control.json. Workload
  certificate lifetime: ``MESHCTL_CERT_TTL`` (e.g. ``6s`` for rotation tests),
  else Citadel's default (24h).
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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping, Protocol

ENV_TTL = "MESHCTL_CERT_TTL"
TOKEN_TTL = timedelta(minutes=10)

__all__ = ["ENV_TTL", "identity_of_node", "proxy_env"]


def identity_of_node(node_file: Path) -> str:
    """The SPIFFE ID of the workload a node file describes (what Pilot expects of it)."""
    from ..loader.codec import from_data
    from ..pilot.compile import Node

    node = from_data(Node, json.loads(node_file.read_text()), path="", file=str(node_file))
    return node.workload.spiffe_id


class ProxyEnvHost(Protocol):
    """What proxy_env needs of the supervisor."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def citadel_url(self) -> str: ...  # "" without Citadel

    def event(self, msg: str) -> None: ...


class ProxyEnvProc(Protocol):
    """What proxy_env reads of a process (records.ProcState)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def env(self) -> Mapping[str, str]: ...


def proxy_env(sup: ProxyEnvHost, p: ProxyEnvProc) -> dict[str, str]:
    """``p.env`` plus ``MESHCTL_BOOTSTRAP_FILE`` (the Pilot credential; with Citadel
    its URL and a fresh bootstrap token) for a sidecar or gateway; ``p.env``
    unchanged otherwise."""
    from ..credentials import ENV_BOOTSTRAP, mesh_credential, mesh_verifier, proxy_credential, write_bootstrap

    if p.kind not in ("sidecar", "gateway"):
        return dict(p.env)
    secret = mesh_credential(sup.state_dir)
    entries = {"pilot_credential": proxy_credential(secret, p.name), "admin_verifier": mesh_verifier(secret)}
    url = sup.citadel_url
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
