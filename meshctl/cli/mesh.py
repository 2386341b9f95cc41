"""`meshctl up`, `down`, `status`, `logs`: the whole mesh from one file."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import trio
import typer
from rich.console import Console

from ..loader.codec import LoadError
from ..state import ENV_VAR, STATE_DIR_NAME, find_state_dir, remember_current
from .common import StateDirOption, Table, console, err_console, fail, first_exception


def register(root: typer.Typer) -> None:
    root.command("up")(up)
    root.command("down")(down)
    root.command("status")(status)
    root.command("logs")(logs)


def _mesh_state_dir(mesh: Path, explicit: Optional[str]) -> Path:
    if explicit:
        return Path(explicit)
    from ..supervisor.plan import load_mesh

    spec = load_mesh(mesh)
    if spec.settings.state_dir:
        return (mesh.parent / spec.settings.state_dir).resolve()
    return (mesh.parent / STATE_DIR_NAME).resolve()


def _supervisor_pid(sd: Path) -> int | None:
    try:
        pid = int((sd / "supervisor.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _read_status(sd: Path) -> dict:
    try:
        return json.loads((sd / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _short(address: str) -> str:
    """Loopback addresses as ':PORT' so the table fits 80 columns."""
    return address[len("127.0.0.1"):] if address.startswith("127.0.0.1:") else address


def print_table(st: dict, out: Console | None = None) -> None:
    out = out or console
    t = Table("WORKLOAD", "VERSION", "STATE", "APP", "INBOUND", "OUTBOUND", "ADMIN", "RESTARTS", box=None,
              caption="ports on 127.0.0.1; apps reach the mesh with HTTP_PROXY=OUTBOUND", caption_justify="left")
    colours = {"ready": "green", "starting": "yellow", "unhealthy": "red", "restarting": "red", "stopped": "dim"}
    for w in st.get("workloads", []):
        c = colours.get(w["state"], "white")
        t.add_row(w["name"], w["version"], f"[{c}]{w['state']}[/]", _short(w["app_address"]), _short(w["inbound_address"]),
                  _short(w["outbound_address"]), _short(w["admin_address"]), str(w.get("restarts", 0)))
    out.print(t)
    # What the restarts were about (the JSON's last_event), one line each, so the
    # table needs no column for it.
    for w in st.get("workloads", []):
        if w.get("last_event") and (w.get("restarts") or w["state"] != "ready"):
            out.print(f"{w['name']}: {w['last_event']}", style="yellow", highlight=False, soft_wrap=False)
    if st.get("gateways"):
        g = Table("GATEWAY", "ADDRESS", "STATE", box=None)
        for gw in st["gateways"]:
            mapping = ", ".join(f"{gp}→{gw.get('listen', '127.0.0.1')}:{hp}" for gp, hp in gw.get("ports", {}).items())
            g.add_row(gw["name"], mapping or gw["address"], gw["state"])
        out.print(g)
    cp = st.get("control_plane", {})
    reg = st.get("registry", {})
    line = f"pilot {cp.get('pilot') or '-'} · registry {reg.get('url', '-')}"
    if (cp.get("citadel") or {}).get("url"):
        line += f" · citadel {cp['citadel']['url']}"
    if reg and not reg.get("reachable", True):
        line += f" [red](unreachable: {reg.get('error', '')})[/]"
    out.print(line, style="dim")
    if st.get("rules"):
        out.print(f"rules: {st['rules']}", style="dim", highlight=False, soft_wrap=True)


def up(
    file: Path = typer.Option(Path("mesh.yaml"), "-f", "--file", help="The mesh file."),
    detach: bool = typer.Option(False, "-d", "--detach", help="Run in the background; `meshctl down` stops it."),
    state: Optional[str] = StateDirOption,
    registry: Optional[str] = typer.Option(
        None, "--registry", metavar="URL",
        help="embedded, consul://HOST:PORT or eureka://HOST:PORT/eureka; overrides settings.registry in mesh.yaml.",
    ),
    consul_token: Optional[str] = typer.Option(
        None, "--consul-token", envvar="CONSUL_HTTP_TOKEN", show_envvar=True, metavar="TOKEN",
        help="Consul ACL token for registering and watching.",
    ),
    locality: Optional[str] = typer.Option(
        None, "--locality", metavar="REGION/ZONE/SUBZONE",
        help="Where this host's workloads and gateways run (locality load balancing); overrides settings.locality.",
    ),
    advertise: Optional[str] = typer.Option(
        None, "--advertise", metavar="ADDR",
        help="This host's address for a mesh across hosts: its instances are registered at ADDR and their "
        "inbound listeners (mTLS) listen there; overrides settings.advertise (docs/multi-host.md).",
    ),
    quiet: bool = typer.Option(False, "--quiet", hidden=True),
) -> None:
    """Start the control plane, every app with its sidecar, and the gateways; or apply mesh.yaml's changes to a running mesh."""
    from ..registry import parse_registry_url
    from ..registry.base import RegistryError
    from ..supervisor.plan import advertise_problem, load_mesh

    if not file.exists():
        fail(f"{file}: no such mesh file (give one with -f)")
    if advertise is not None and (why := advertise_problem(advertise.strip())):
        fail(f"--advertise: {why}")
    if registry is not None:
        try:
            parse_registry_url(registry)
        except RegistryError as e:
            fail(f"--registry: {e}")
    if locality is not None:
        from ..core.locality import locality_problem

        if locality_problem(locality.strip()):
            fail(f"--locality: {locality_problem(locality.strip())}", 2)
    try:
        # Checked here, before any detach, whether or not --state-dir names the state:
        # `up -d` prints the same file:line errors as `up`.
        load_mesh(file)
        sd = _mesh_state_dir(file, state)
    except LoadError as e:
        fail(f"bad mesh file:\n{e}")
    sd.mkdir(parents=True, exist_ok=True)
    pid = _supervisor_pid(sd)
    if pid:
        remember_current(sd)  # other commands find this mesh from any directory
        _update_running(sd, pid, file, registry, locality, advertise)
        return
    if detach:
        _start_detached(sd, file, registry, consul_token, locality, advertise)
        return
    _supervise(sd, file, registry, consul_token, quiet, locality, advertise)


def _supervise(sd: Path, file: Path, registry: Optional[str], consul_token: Optional[str], quiet: bool,
               locality: Optional[str] = None, advertise: Optional[str] = None) -> None:
    """Run the supervisor in this process until the mesh is stopped."""
    from ..supervisor.run import Supervisor, UpError

    started = time.monotonic()

    def on_event(msg: str) -> None:
        if not quiet:
            err_console.print(f"[dim]{time.monotonic() - started:6.2f}s[/] {msg}", highlight=False)

    try:
        sup = Supervisor(file, sd, on_event, registry_url=registry, consul_token=consul_token, locality=locality,
                         advertise=advertise)
    except LoadError as e:
        fail(f"bad mesh file:\n{e}")

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(sup.run)
            # other commands find this mesh from any directory; not one that failed to come up,
            # which would hide the mesh that runs
            remember_current(sd)
            if not quiet:
                print_table(sup.status())
                console.print(f"mesh up in {time.monotonic() - started:.2f}s; Ctrl-C stops it", style="bold")

    try:
        trio.run(main, restrict_keyboard_interrupt_to_checkpoints=True)
    except (UpError, BaseExceptionGroup) as e:
        cause = first_exception(e, UpError)
        if cause is None:
            raise
        fail(f"meshctl up failed: {cause}")
    except KeyboardInterrupt:
        pass


def _start_detached(sd: Path, file: Path, registry: Optional[str] = None, consul_token: Optional[str] = None,
                   locality: Optional[str] = None, advertise: Optional[str] = None) -> None:
    """Fork the supervisor into its own session (no second interpreter start: the
    modules are loaded already), then follow its progress in status.json."""
    (sd / "logs").mkdir(parents=True, exist_ok=True)
    log_path = sd / "logs" / "supervisor.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    sys.stdout.flush()
    sys.stderr.flush()
    from ..launch import FROZEN

    if FROZEN:
        _follow_detached(sd, log_path, start, *_spawn_detached(sd, log_path, file, registry, consul_token, locality,
                                                               advertise))
        return
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.environ.pop(ENV_VAR, None)
            if consul_token:  # through the environment, not argv: other users can read argv
                os.environ["CONSUL_HTTP_TOKEN"] = consul_token
            _supervise(sd, file.resolve(), registry, consul_token, quiet=True, locality=locality, advertise=advertise)
            code = 0
        except typer.Exit as e:
            code = e.exit_code
        except BaseException:  # the log says why; the parent reads status.json
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def child_exited() -> bool:
        return os.waitpid(pid, os.WNOHANG)[0] != 0

    _follow_detached(sd, log_path, start, pid, child_exited)


def _spawn_detached(sd: Path, log_path: Path, file: Path, registry: Optional[str], consul_token: Optional[str],
                    locality: Optional[str] = None, advertise: Optional[str] = None):
    """The one-file build cannot fork the supervisor: its files are unpacked for this
    process and removed when it exits. Start the binary again, as a new instance that
    unpacks its own (sidecars and control roles, its children, then share them)."""
    import subprocess

    from ..launch import meshctl_argv

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
    if consul_token:  # through the environment, not argv: other users can read argv
        env["CONSUL_HTTP_TOKEN"] = consul_token
    argv = meshctl_argv("up", "-f", str(file.resolve()), "--state-dir", str(sd), "--quiet")
    if registry:
        argv += ["--registry", registry]
    if locality is not None:
        argv += ["--locality", locality]
    if advertise:
        argv += ["--advertise", advertise]
    with open(log_path, "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    return p.pid, lambda: p.poll() is not None


def _parent_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _follow_detached(sd: Path, log_path: Path, start: int, pid: int, child_exited) -> None:
    """Report the detached supervisor's progress from status.json until the mesh is up."""

    def ours(st: dict) -> bool:  # this run's status, not an older one (the one-file build's Python is a child of pid)
        return st.get("pid") is not None and (st["pid"] == pid or _parent_of(st["pid"]) == pid)

    seen: set[str] = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        st = _read_status(sd)
        for w in st.get("workloads", []):
            if w["state"] == "ready" and w["name"] not in seen:
                seen.add(w["name"])
                err_console.print(f"{w['name']} ready", highlight=False)
        if ours(st) and st.get("state") == "running":
            print_table(st)
            console.print(f"mesh up (supervisor pid {st['pid']}); `meshctl down` stops it", style="bold")
            return
        if child_exited():
            st = _read_status(sd)
            error = st.get("error") if ours(st) else None
            fail(f"meshctl up failed: {error or _logged_error(log_path, start) or 'see ' + str(log_path)}")
        time.sleep(0.05)
    fail(f"mesh not up after 90s: see `meshctl status` and {sd / 'logs'}")


def _logged_error(log_path: Path, start: int) -> str:
    """The error the detached supervisor printed (from `error:` on) in its log since ``start``."""
    try:
        with open(log_path, errors="replace") as fh:
            fh.seek(start)
            text = fh.read()
    except OSError:
        return ""
    at = text.find("error: ")
    return text[at + len("error: "):].strip() if at >= 0 else ""


def _update_running(sd: Path, pid: int, file: Path, registry: Optional[str] = None, locality: Optional[str] = None,
                    advertise: Optional[str] = None) -> None:
    from ..supervisor.run import redact_url

    st = _read_status(sd)
    if st.get("mesh") and Path(st["mesh"]) != file.resolve():
        fail(f"a mesh from {st['mesh']} is already running with state {sd}: `meshctl down` first")
    running = (st.get("registry") or {}).get("url")
    if registry is not None and running and redact_url(registry.strip()) != running:
        fail(f"the running mesh uses the registry {running}, not {redact_url(registry)}: `meshctl down` first to switch")
    if locality is not None and locality.strip() != st.get("locality", ""):
        fail(f"the running mesh runs in locality {st.get('locality') or '(none)'!r}, not {locality.strip()!r}: "
             "a running mesh keeps the --locality it was started with (`meshctl down` first to move it)")
    if advertise is not None and st.get("advertise") and advertise.strip() != st["advertise"]:
        fail(f"the running mesh advertises {st['advertise']}, not {advertise.strip()}: `meshctl down` first to switch")
    mtime = (sd / "status.json").stat().st_mtime if (sd / "status.json").exists() else 0
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 90
    time.sleep(0.1)
    while time.monotonic() < deadline:
        st = _read_status(sd)
        if st.get("state") == "running" and (sd / "status.json").stat().st_mtime > mtime:
            if st.get("error"):
                fail(st["error"])
            print_table(st)
            console.print("mesh updated", style="bold")
            return
        time.sleep(0.05)
    fail("the running mesh did not finish updating in 90s: see `meshctl status`")


def down(state: Optional[str] = StateDirOption, timeout: float = typer.Option(30.0, help="Seconds to wait.")) -> None:
    """Stop the mesh started by `meshctl up -d`: drain, deregister, stop every process."""
    sd = find_state_dir(state)
    if sd is None:
        fail(f"no mesh here: no {STATE_DIR_NAME}/ in this directory or its parents (or pass --state-dir)")
    pid = _supervisor_pid(sd)
    if pid is None:
        console.print("no mesh is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _supervisor_pid(sd) is None:
            console.print("mesh stopped")
            return
        time.sleep(0.05)
    fail(f"the supervisor (pid {pid}) did not stop within {timeout:.0f}s")


def status(json_out: bool = typer.Option(False, "--json", help="Machine-readable output (a stable interface)."), state: Optional[str] = StateDirOption) -> None:
    """Services, instances, addresses and health of the running mesh."""
    sd = find_state_dir(state)
    st = _read_status(sd) if sd else {}
    if not st:
        if json_out:
            print(json.dumps({"state": "stopped", "workloads": [], "gateways": []}))
            return
        fail("no mesh status here: run `meshctl up` (or pass --state-dir)")
    if st.get("state") not in ("stopped", "failed") and sd and _supervisor_pid(sd) is None:
        st["state"] = "dead"
        st["error"] = "the supervisor is not running (killed?): `meshctl up` again"
    from ..proxy.peercheck import check_off_reason

    off = check_off_reason()  # the sidecars' outbound listeners check their local users (proxy/peercheck.py)
    if json_out:
        keys = ("state", "error", "locality", "advertise", "registry", "rules", "control_plane", "workloads", "gateways")
        out = {k: st.get(k) for k in keys}
        out["outbound_user_check"] = {"on": off is None, "reason": off}
        print(json.dumps(out, indent=1))
        return
    console.print(f"mesh {st.get('mesh')}: [bold]{st.get('state')}[/]")
    if st.get("error"):
        err_console.print(f"[red]{st['error']}[/]")
    print_table(st)
    if off is not None:
        console.print(f"[yellow]outbound listeners: the local-user check is OFF ({off}): every local user can "
                      "send with a workload's identity through its sidecar[/]")


def logs(
    workload: Optional[str] = typer.Argument(None, help="A workload, gateway or 'pilot'; all when omitted."),
    follow: bool = typer.Option(False, "-f", "--follow"),
    lines: int = typer.Option(50, "-n", "--lines"),
    state: Optional[str] = StateDirOption,
) -> None:
    """Logs of apps, sidecars, gateways and the control plane."""
    sd = find_state_dir(state)
    if sd is None or not (sd / "logs").is_dir():
        fail("no mesh logs here: run `meshctl up` (or pass --state-dir)")
    files = sorted((sd / "logs").glob(f"{workload}.*log" if workload else "*.log"))
    if not files:
        known = sorted({p.name.split(".")[0] for p in (sd / "logs").glob("*.log")})
        fail(f"no logs for {workload!r}: known are {', '.join(known)}")
    prefix = len(files) > 1
    positions = {}
    for f in files:
        text = f.read_text(errors="replace").splitlines()[-lines:]
        for line in text:
            print(f"{f.stem}: {line}" if prefix else line)
        positions[f] = f.stat().st_size
    try:
        while follow:
            time.sleep(0.2)
            for f in files:
                size = f.stat().st_size
                if size > positions[f]:
                    with open(f, errors="replace") as fh:
                        fh.seek(positions[f])
                        for line in fh.read().splitlines():
                            print(f"{f.stem}: {line}" if prefix else line, flush=True)
                    positions[f] = size
    except KeyboardInterrupt:
        pass
