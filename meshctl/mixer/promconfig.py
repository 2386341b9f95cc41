"""A Prometheus scrape configuration for the running mesh (`meshctl prometheus-config`).

Every sidecar and gateway serves Istio's metrics (istio_requests_total,
istio_request_duration_milliseconds, istio_tcp_*) in Prometheus text on its
admin address (``/metrics``). This builds the ``scrape_configs`` that reach all
of them, from the state directory's status.json (sidecars) and ports.json
(gateway admin ports), so Istio's Grafana dashboards' queries work unchanged.
`meshctl up` keeps a copy in ``<state dir>/prometheus.yml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

FILE = "prometheus.yml"


def targets(status: dict, ports: dict) -> tuple[list[dict], list[dict]]:
    """(sidecar, gateway) static_configs entries: one target each, with its labels."""
    sidecars = []
    for w in status.get("workloads", []) or []:
        addr = w.get("admin_address")
        if not addr:
            continue
        labels = {"meshctl_instance": str(w.get("name", "")), "app": str(w.get("service", "")),
                  "version": str(w.get("version", ""))}
        sidecars.append({"targets": [addr], "labels": labels})
    gateways = []
    for g in status.get("gateways", []) or []:
        name = g.get("name")
        port = ports.get(f"{name}/admin") if isinstance(ports, dict) and name else None
        if isinstance(port, int):
            gateways.append({"targets": [f"127.0.0.1:{port}"], "labels": {"meshctl_instance": name, "app": name}})
    return sidecars, gateways


def scrape_config(status: dict, ports: dict, interval: str = "15s") -> str:
    sidecars, gateways = targets(status, ports)
    jobs = []
    for job, static in (("meshctl-sidecars", sidecars), ("meshctl-gateways", gateways)):
        jobs.append({"job_name": job, "metrics_path": "/metrics", "scheme": "http",
                     "static_configs": static})
    doc = {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}
    head = ("# Prometheus scrape configuration for the meshctl mesh in this state directory\n"
            "# (written by `meshctl up`; `meshctl prometheus-config` prints it).\n"
            "# Run: prometheus --config.file=prometheus.yml\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def from_state_dir(state_dir: Path, interval: str = "15s") -> str:
    def read(name: str) -> dict:
        try:
            v = json.loads((state_dir / name).read_text())
        except (OSError, ValueError):
            return {}
        return v if isinstance(v, dict) else {}

    return scrape_config(read("status.json"), read("ports.json"), interval)


def write(state_dir: Path) -> None:
    path = state_dir / FILE
    tmp = path.with_suffix(".tmp-prom")
    tmp.write_text(from_state_dir(state_dir))
    tmp.replace(path)
