"""Time from `meshctl up` to every Bookinfo instance ready, and the mesh's memory.

    .venv/bin/python bench/up_time.py [--runs 3]

Copies examples/bookinfo to a temporary folder (free gateway port), runs
`meshctl up -d` (which returns once every instance is registered and every
sidecar and the gateway answer /ready), then `meshctl down`. Reports wall
time per run and the RSS of every process of the mesh (supervisor, Pilot,
apps, sidecars, gateway) read from /proc while it is up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def meshctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, env=env, check=True)


def one_run(base: Path) -> tuple[float, dict[str, int]]:
    work = Path(tempfile.mkdtemp(prefix="meshctl-up-bench.", dir=base))
    for d in ("apps", "rules"):
        shutil.copytree(ROOT / "examples" / "bookinfo" / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "examples" / "bookinfo" / "mesh.yaml").read_text().replace("{80: 8080}", f"{{80: {free_port()}}}")
    (work / "mesh.yaml").write_text(text)
    t0 = time.monotonic()
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    elapsed = time.monotonic() - t0
    st = json.loads(meshctl("status", "--json", cwd=work).stdout)
    sup = json.loads((work / ".meshctl" / "status.json").read_text())["pid"]
    mem = {"supervisor": rss_kb(sup), "pilot": rss_kb(st["control_plane"]["pid"])}
    mem["apps"] = sum(rss_kb(w["app_pid"]) for w in st["workloads"] if w["app_pid"])
    mem["sidecars"] = sum(rss_kb(w["proxy_pid"]) for w in st["workloads"])
    mem["gateway"] = sum(rss_kb(g["pid"]) for g in st["gateways"])
    mem["per_sidecar"] = mem["sidecars"] // max(1, len(st["workloads"]))
    meshctl("down", cwd=work)
    return elapsed, mem


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="meshctl-up-bench."))
    times, mems = [], []
    for _ in range(args.runs):
        t, m = one_run(base)
        times.append(t)
        mems.append(m)
        print(f"up in {t:.2f}s; RSS MB: " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in m.items()), flush=True)
    total = [sum(v for k, v in m.items() if k != "per_sidecar") / 1024 for m in mems]
    print(f"median up time {statistics.median(times):.2f}s (6 instances + gateway + Pilot); "
          f"whole mesh RSS median {statistics.median(total):.0f} MB")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
