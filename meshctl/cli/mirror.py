"""`meshctl mirror diff SERVICE`: how a mirror's answers differ from the primary's.

Every sidecar compares the shadows it sends (VirtualService ``mirror`` /
``mirrors``, proxy/mirror.py) with the primary request: status, latency, and
the shadow's content type and body digest. This command asks each sidecar of
the running mesh (their admin ports, as `up` recorded them) and adds them up
per mirror cluster of SERVICE, with examples of differing requests: the check
a team wants before it shifts traffic to a new version.

Compared: status, content type and latency. The primary's body is not
captured (the shadow's body digest is shown, the primary's is not): a shadow
answering 200 with the same content type and another body is not told apart.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional

import typer

from ..model.proxyconfig import fqdn
from .common import StateDirOption, Table, console, fail, state_dir
from .pilot import short_cluster

app = typer.Typer(help="Traffic mirroring: compare a mirror's answers with the primary's.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="mirror")


def _host_of(cluster: str) -> str:
    parts = cluster.split("|")
    return parts[3] if len(parts) == 4 else cluster


def collect(sd, service: str) -> tuple[dict, list[dict], int]:
    """(per mirror cluster totals, examples, sidecars asked) for SERVICE's mirrors."""
    from ..supervisor.run import http_get_json

    try:
        st = json.loads((sd / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        fail(f"no running mesh in {sd} (start one with `meshctl up`)")
    want = {service, fqdn(service)}
    totals: dict[str, dict] = {}
    examples: list[dict] = []
    asked = 0
    for w in st.get("workloads", []):
        admin = w.get("admin_address")
        rep = http_get_json(admin, "/mirror") if admin else None
        if not rep:
            continue
        asked += 1
        for cluster, t in rep.get("targets", {}).items():
            if _host_of(cluster) not in want:
                continue
            agg = totals.setdefault(cluster, {"compared": 0, "status_differs": 0, "content_type_differs": 0, "failed": 0,
                                              "p50": [], "sp50": []})
            agg["compared"] += t["compared"]
            agg["status_differs"] += t["status_differs"]
            agg["content_type_differs"] += t.get("content_type_differs", 0)
            agg["failed"] += t["failed"]
            if t["primary_ms"]["p50"] is not None:
                agg["p50"].append(t["primary_ms"]["p50"])
            if t["shadow_ms"]["p50"] is not None:
                agg["sp50"].append(t["shadow_ms"]["p50"])
        examples += [dict(e, proxy=w["name"]) for e in rep.get("examples", []) if _host_of(e["cluster"]) in want]
    return totals, sorted(examples, key=lambda e: e["time"]), asked


@app.command("diff")
def diff(
    service: str = typer.Argument(..., help="The mirrored service, e.g. httpbin"),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Compare SERVICE's mirror (shadow) answers with the primary's: status, latency, examples."""
    totals, examples, asked = collect(state_dir(state), service)
    if json_out:
        print(json.dumps({"mirrors": {c: {k: v for k, v in t.items() if k not in ("p50", "sp50")} for c, t in totals.items()},
                          "examples": examples}, indent=1))
        return
    if not totals:
        console.print(f"no mirrored requests to {service} seen by the {asked} sidecar(s) asked "
                      "(is a VirtualService mirroring it applied?)", highlight=False)
        return
    t = Table("MIRROR", "COMPARED", "STATUS≠", "TYPE≠", "NO ANSWER", "P50 MS", "MIRROR P50", box=None)
    for cluster, a in sorted(totals.items()):
        mid = lambda xs: f"{sorted(xs)[len(xs) // 2]:.1f}" if xs else "-"
        t.add_row(short_cluster(cluster), str(a["compared"]), str(a["status_differs"]), str(a["content_type_differs"]),
                  str(a["failed"]), mid(a["p50"]), mid(a["sp50"]))
    console.print(t)
    if examples:
        e = Table("TIME", "REQUEST", "PRIMARY", "MIRROR", "MIRROR BODY", box=None, title="differing requests (latest)")
        for x in examples[-10:]:
            shadow = str(x["shadow_status"]) if x["shadow_status"] else f"no answer ({x['shadow_error']})"
            e.add_row(datetime.fromtimestamp(x["time"]).strftime("%H:%M:%S"), f"{x['method']} {x['path']}",
                      f"{x['primary_status']} {x.get('primary_content_type', '')} {x['primary_ms']:.0f}ms",
                      f"{shadow} {x['shadow_content_type']} {x['shadow_ms']:.0f}ms",
                      (x["shadow_body_sha256"] or "")[:12])
        console.print(e)
