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
- a server port no selected gateway maps: error, naming the ``ports:`` line.
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


def gateway_port_findings(resources: Sequence[Resource], mesh: MeshGateways) -> list[Finding]:
    out: list[Finding] = []
    for r in resources:
        gw = r.spec
        if not isinstance(gw, m.Gateway):
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
            if not port or any(port in g.ports for _, g in picked):
                continue
            i, g = picked[0]
            used = {h for x in mesh.gateways for h in x.ports.values()}
            host = port if port >= 1024 else port + 8000
            while host in used:
                host += 1
            field = f"spec.servers[{j}].port.number"
            out.append(Finding(
                "error", source_of(r, field), field,
                f"Gateway {r.namespace}/{r.name} port {port}: gateway {g.name} in mesh.yaml does not serve "
                f"port {port}; add '{port}: HOST_PORT' to its ports: at {mesh.where(i)} "
                f"(e.g. ports: {{{', '.join([*(f'{a}: {b}' for a, b in g.ports.items()), f'{port}: {host}'])}}})",
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
