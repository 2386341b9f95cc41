"""Mixer under `meshctl up`: a second control-plane process next to Pilot.

The supervisor calls ``start_mixer(sup, port)`` beside Pilot and Citadel, with
the port the plan allocated from the mesh's port range (the same one again when
the mesh is restarted). Mixer is kept running with the supervisor's
restart-with-backoff, and is written into
``control.json`` as ``"mixer"`` so `meshctl top`/`stat` find it. Sidecars get
``--mixer URL`` (global quotas) and ``--access-log logs/<name>.access.log``
from ``sidecar_args(sup, name)``.
"""

from __future__ import annotations

import os

from ..state import write_control


async def start_mixer(sup, port: int) -> None:
    """Start Mixer on ``port`` (the plan's) and wait until it answers; raises UpError
    naming its log if it cannot."""
    from ..supervisor.run import ProcState, meshctl_argv

    sup.mixer = ProcState(
        name="mixer",
        kind="control-plane",
        argv=meshctl_argv("mixer", "serve", "--port", str(port), "--state-dir", str(sup.state_dir)),
        env=dict(os.environ),
        cwd=str(sup.state_dir),
        log=sup.logs / "mixer.log",
    )
    sup.mixer_url = f"http://127.0.0.1:{port}"
    write_control(sup.state_dir, mixer=sup.mixer_url)
    await sup.start_role(sup.mixer, "Mixer", port, "/ready")
    sup.event(f"mixer ready at {sup.mixer_url}")


async def stop_mixer(sup) -> None:
    p = getattr(sup, "mixer", None)
    if p is not None:
        await sup.stop_proc(p)
    write_control(sup.state_dir, mixer=None)


def sidecar_args(sup, name: str) -> list[str]:
    """Extra `proxy run` arguments for a sidecar or gateway of this mesh."""
    args = ["--access-log", str(sup.logs / f"{name}.access.log")]
    url = getattr(sup, "mixer_url", "")
    if url:
        args += ["--mixer", url]
    return args


def status(sup) -> dict:
    p = getattr(sup, "mixer", None)
    return {"url": getattr(sup, "mixer_url", ""), "state": p.state if p else "stopped", "pid": p.pid if p else None}
