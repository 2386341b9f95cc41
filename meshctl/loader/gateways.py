"""Gateway resources checked against the gateways mesh.yaml declares.

Istio binds a Gateway server's port on the gateway workload its selector
picks. meshctl's gateways are declared in mesh.yaml, whose ``ports:`` map
says which host port serves a Gateway port (80 → 8080 on a laptop). A
Gateway port that no selected gateway can serve would answer nothing (or
404s on another port), so ``route validate`` and ``route apply`` say so,
naming the Gateway, the port, and the mesh.yaml line that would fix it.

Rules:
- a Gateway whose selector matches no gateway of mesh.yaml: warning (it
  configures nothing, as istioctl's "referenced selector not found");
- a server port that a selected gateway maps in ``ports:``: served there;
- a server port no selected gateway maps: served on that port number itself,
  opened when the Gateway is applied (proxy/runtime.py binds it live); an
  error, naming the ``ports:`` line that would fix it, when this user cannot
  bind it (below 1024) or when it is the host port of another Gateway port.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..model import istio as m
from ..model.istio import Resource
from ..model.mesh import GatewaySpec, MeshSpec
from .validate import Finding
from .resources import source_of

__all__ = ["MeshGateways", "gateway_port_findings", "gateway_labels"]


def gateway_labels(gw: GatewaySpec) -> dict[str, str]:
    """The labels a Gateway selector sees on a mesh.yaml gateway (as in plan.py)."""
    return {"app": gw.name, **gw.labels}


@dataclass(frozen=True, slots=True)
class MeshGateways:
    """mesh.yaml's gateways, with where each one's ``ports:`` is written."""

    file: str
    gateways: tuple[GatewaySpec, ...]
    lines: tuple[int | None, ...]  # line of gateways[i].ports (or of gateways[i])

    @classmethod
    def from_spec(cls, file: str, spec: MeshSpec, lines: dict[str, int] | None) -> "MeshGateways":
        from .codec import line_of

        return cls(
            file=file,
            gateways=spec.gateways,
            lines=tuple(line_of(lines, f"gateways[{i}].ports") for i in range(len(spec.gateways))),
        )

    def where(self, i: int) -> str:
        line = self.lines[i]
        return f"{self.file}:{line}" if line is not None else self.file


def _selected(selector: m.FrozenDict, gw: GatewaySpec) -> bool:  # type: ignore[name-defined]
    labels = gateway_labels(gw)
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _bind_refused(port: int) -> str | None:
    """Why this user cannot listen on 127.0.0.1:port (a port below 1024), or None."""
    import errno
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return "a port below 1024 needs privileges this user does not have"
    return None


def gateway_port_findings(resources: Sequence[Resource], mesh: MeshGateways,
                          context: Sequence[Resource] = (), bind_refused=_bind_refused) -> list[Finding]:
    """A Gateway server port is served on the host port mesh.yaml's ``ports:`` maps it
    to, else on itself. Errors: an unmapped port this user cannot bind (below 1024),
    and an unmapped port whose number is the host port of another mapped Gateway port
    in use. ``context``: the Gateways already applied (they hold their ports too)."""
    out: list[Finding] = []
    latest: dict = {}
    for r in (*context, *resources):
        latest[r.key] = r
    new_keys = {r.key for r in resources}
    in_use: dict[str, set[int]] = {}  # mesh gateway → Gateway ports in use after this apply
    for r in latest.values():
        if isinstance(r.spec, m.Gateway):
            for g in mesh.gateways:
                if _selected(r.spec.selector, g):
                    in_use.setdefault(g.name, set()).update(s.port.number for s in r.spec.servers)
    for r in latest.values():
        gw = r.spec
        if not isinstance(gw, m.Gateway) or r.key not in new_keys:
            continue
        picked = [(i, g) for i, g in enumerate(mesh.gateways) if _selected(gw.selector, g)]
        if not picked:
            have = "; ".join(f"{g.name} {gateway_labels(g)}" for g in mesh.gateways) or "none"
            out.append(Finding(
                "warning", source_of(r, "spec.selector"), "spec.selector",
                f"Gateway {r.namespace}/{r.name} selects no gateway of {mesh.file} (gateways there: {have}); "
                "it configures nothing",
            ))
            continue
        for j, server in enumerate(gw.servers):
            port = server.port.number
            field = f"spec.servers[{j}].port.number"
            for i, g in picked:
                if not port or port in g.ports:
                    continue
                used = {h for x in mesh.gateways for h in x.ports.values()}
                host = port if port >= 1024 else port + 8000
                while host in used:
                    host += 1
                fix = (f"add '{port}: HOST_PORT' to its ports: at {mesh.where(i)} (e.g. ports: "
                       f"{{{', '.join([*(f'{a}: {b}' for a, b in g.ports.items()), f'{port}: {host}'])}}})")
                clash = [gp for gp, hp in g.ports.items() if hp == port and gp in in_use.get(g.name, set())]
                if clash:
                    out.append(Finding(
                        "error", source_of(r, field), field,
                        f"Gateway {r.namespace}/{r.name} port {port}: gateway {g.name} serves Gateway port "
                        f"{clash[0]} on host port {port} (mesh.yaml ports: {{{clash[0]}: {port}}}), so port {port} "
                        f"cannot be served as itself; {fix}",
                    ))
                    continue
                why = bind_refused(port) if port < 1024 else None
                if why:
                    out.append(Finding(
                        "error", source_of(r, field), field,
                        f"Gateway {r.namespace}/{r.name} port {port}: gateway {g.name} cannot listen on port {port} "
                        f"({why}) and mesh.yaml maps it to no other port; {fix}",
                    ))
    return out


def find_mesh_file(state_dir: Path | None) -> Path | None:
    """The mesh.yaml of a state directory: the one `up` recorded, else the one beside it."""
    if state_dir is None:
        return None
    import json

    try:
        recorded = json.loads((state_dir / "status.json").read_text()).get("mesh")
    except (OSError, ValueError):
        recorded = None
    for candidate in (Path(recorded) if recorded else None, state_dir.parent / "mesh.yaml"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def credential_findings(resources: Sequence[Resource], state_dir: Path | None) -> list[Finding]:
    """Gateway TLS credentials that cannot serve: a missing secret or file, a key
    that is not the certificate's, no CA for MUTUAL. Checked at apply time, so a
    server is never configured without them (it would not open in plaintext
    either: the gateway refuses such a config)."""
    from .. import secrets

    out: list[Finding] = []
    for r in resources:
        if not isinstance(r.spec, m.Gateway):
            continue
        for j, server in enumerate(r.spec.servers):
            t = server.tls
            if t is None or t.mode not in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
                continue
            mutual = t.mode in ("MUTUAL", "OPTIONAL_MUTUAL")
            if t.credential_name and secrets.name_problem(t.credential_name) is not None:
                continue  # not a Secret name: validate.py said so (and check_credential reads no path for it)
            if t.credential_name:
                field = f"spec.servers[{j}].tls.credentialName"
                why = secrets.check_credential(state_dir, t.credential_name, mutual)
            else:
                field = f"spec.servers[{j}].tls.serverCertificate"
                why = secrets.check_files(t.server_certificate, t.private_key, t.ca_certificates, mutual)
            if why:
                out.append(Finding("error", source_of(r, field), field, f"Gateway {r.namespace}/{r.name}: {why}"))
    return out
