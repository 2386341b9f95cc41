"""The pieces of a mesh over the test network's hosts (netlab.NetLab).

- ``ConsulCluster``: one Consul server per host (the binary scripts/tools/consul.sh
  builds), a three-server cluster bound to the hosts' addresses; each host's
  HTTP API on 127.0.0.1:8500 of its own namespace, as on a VM.
- ``MeshHost``: one host's share of Bookinfo, started with
  ``meshctl up -d -f mesh.yaml --registry consul://127.0.0.1:8500 --advertise <addr>``
  in its namespace, after ``citadel join`` (docs/multi-host-ca.md): its Citadel signs
  with an intermediate of its own, issued through Consul KV.
- ``RootHolder``: the root made once by ``citadel init --root-dir`` in the test's
  own directory (off every host), ``citadel approve`` of the hosts' CSRs.
- ``Load``: steady requests through the ingress gateway from threads inside
  host 1, each result recorded with its start and end time.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .netlab import NetLab, wait_for

REPO = Path(__file__).resolve().parents[2]
BOOKINFO = REPO / "examples" / "bookinfo"
MULTIHOST = REPO / "examples" / "multi-host"  # host1.yaml, host2.yaml, host3.yaml, rules/
CONSUL_HTTP = 8500

# Consul tuned for a test's patience: Raft timeouts at their minimum (the
# production recommendation, raft_multiplier 1) and gossip probes every 400 ms, so
# a dead host is declared failed in a couple of seconds rather than about ten.
CONSUL_TUNING = {
    "performance": {"raft_multiplier": 1},
    "gossip_lan": {"probe_interval": "400ms", "probe_timeout": "200ms", "suspicion_mult": 3},
    "disable_update_check": True,
    "leave_on_terminate": False,
    "skip_leave_on_interrupt": True,
}


def http_get(host: str, port: int, path: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


# ------------------------------------------------------------------ Consul


class ConsulCluster:
    def __init__(self, lab: NetLab, binary: str, workdir: Path) -> None:
        self.lab, self.binary, self.workdir = lab, binary, workdir
        self.procs: dict[int, object] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tuning.json").write_text(json.dumps(CONSUL_TUNING))

    @property
    def hosts(self) -> range:
        return range(1, len(self.lab.names) + 1)

    def start(self, host: int) -> None:
        addr = self.lab.address(host)
        data = self.workdir / f"data-h{host}"
        data.mkdir(exist_ok=True)
        argv = [
            self.binary, "agent", "-server", f"-bootstrap-expect={len(self.lab.names)}",
            f"-node=host{host}", f"-bind={addr}", f"-advertise={addr}", "-client=127.0.0.1",
            f"-data-dir={data}", f"-config-file={self.workdir / 'tuning.json'}",
            "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1", "-log-level=warn",
            *[f"-retry-join={a}" for a in self.lab.addresses if a != addr],
        ]  # fmt: skip
        self.procs[host] = self.lab.popen(host, argv, self.workdir / f"consul-h{host}.log")

    def stop(self, host: int) -> None:
        """SIGKILL the server of ``host`` (a crash: no graceful leave)."""
        proc = self.procs.pop(host, None)
        if proc is not None:
            proc.kill()  # type: ignore[attr-defined]
            proc.wait(10)  # type: ignore[attr-defined]
        # `ip netns exec` runs consul as its own process: make sure the agent is gone
        for pid in self.lab.pids(host):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0] == self.binary.encode():
                import os
                import signal

                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def api(self, host: int, path: str, timeout: float = 3.0) -> object:
        status, body = self.lab.in_host(host, lambda: http_get("127.0.0.1", CONSUL_HTTP, path, timeout), timeout + 2)
        if status != 200:
            raise AssertionError(f"consul on host {host}: GET {path}: {status} {body[:200]}")
        return json.loads(body)

    def put(self, host: int, path: str, body: object, timeout: float = 5.0) -> None:
        def do() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", CONSUL_HTTP, timeout=timeout)
            try:
                conn.request("PUT", path, body=json.dumps(body) if body is not None else None)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            finally:
                conn.close()

        status = self.lab.in_host(host, do, timeout + 5)
        assert status == 200, f"consul on host {host}: PUT {path}: {status}"

    def leader_host(self, via: int) -> int | None:
        """The host whose server is the Raft leader, as host ``via`` sees it."""
        leader = self.api(via, "/v1/status/leader")
        for h in self.hosts:
            if leader and str(leader).startswith(self.lab.address(h) + ":"):
                return h
        return None

    def make_leader(self, host: int, tries: int = 8) -> None:
        """Restart the leader's server until ``host``'s holds the Raft leadership (a crash each: the others
        elect), then wait until every check in the catalog passes again (the restarted agents' synced)."""
        for _ in range(tries):
            leader = self.leader_host(via=host)
            if leader == host:
                wait_for("every check in Consul's catalog to pass",
                         lambda: all(self.api(h, "/v1/health/state/critical") == [] for h in self.hosts), 60, 0.3)
                return
            assert leader is not None, "no Consul leader"
            self.stop(leader)
            wait_for("a new Consul leader", lambda: self.leader_host(via=host) not in (None, leader), 30)
            self.start(leader)
            self.wait_ready()
        raise AssertionError(f"host {host}'s Consul server did not become the Raft leader in {tries} elections")

    def describe(self) -> str:
        """What each server says of the cluster (leader, members, failing node checks): for failure messages."""
        out = []
        for h in self.hosts:
            try:
                leader = self.api(h, "/v1/status/leader", 2.0)
                members = {m["Name"]: m["Status"] for m in self.api(h, "/v1/agent/members", 2.0)}  # type: ignore[union-attr,index]
                failing = [(c["Node"], c["CheckID"], c["Status"]) for c in self.api(h, "/v1/health/state/any?stale", 2.0)  # type: ignore[union-attr,index]
                           if c["Status"] != "passing"]
                try:
                    voting = sorted(self.voters(via=h))
                except AssertionError as e:  # no leader to ask: autopilot answers 500
                    voting = [str(e)[:80]]
                out.append(f"host {h}: leader {leader!r}, members {members}, voters {voting}, not passing {failing}")
            except Exception as e:  # noqa: BLE001 - a server down or cut off says so
                out.append(f"host {h}: {e!r}")
        return "; ".join(out)

    def voters(self, via: int) -> set[str]:
        """The servers that vote in Raft, as the leader reached through host ``via`` reports them
        (autopilot's view): a server that rejoins after a crash was pruned from Raft as dead, so it
        comes back as a non-voter and votes again only once it has been stable for
        server_stabilization_time (10 s by default)."""
        # 429 is how this endpoint says "not healthy" (its body is the same report); no leader: 500
        status, body = self.lab.in_host(via, lambda: http_get("127.0.0.1", CONSUL_HTTP, "/v1/operator/autopilot/health"), 5)
        if status not in (200, 429):
            raise AssertionError(f"consul on host {via}: autopilot health: {status} {body[:200]}")
        return {s["Name"] for s in json.loads(body)["Servers"] if s["Voter"] and s["Healthy"]}

    def wait_ready(self, hosts: list[int] | None = None, timeout: float = 90) -> None:
        """Every server answers, sees a leader and all members alive, and every server votes again
        in Raft. Without the last, a test that then takes one server away (make_leader, a partition)
        can leave two servers of which one does not vote yet: no quorum, no leader ever."""
        hosts = hosts or list(self.hosts)
        everyone = {f"host{x}" for x in self.hosts}

        def ready() -> bool:
            for h in hosts:
                if not self.api(h, "/v1/status/leader"):
                    return False
                members = self.api(h, "/v1/agent/members")
                alive = {m["Name"] for m in members if m["Status"] == 1}  # type: ignore[index,union-attr]
                if alive != everyone:
                    return False
            return self.voters(via=hosts[0]) == everyone

        wait_for("the Consul cluster to elect a leader with every server alive and voting", ready, timeout, 0.3)

    def close(self) -> None:
        for h in list(self.procs):
            self.stop(h)


# ------------------------------------------------------------------ the CA


MESH_ID = "cluster.local"  # examples/multi-host/*.yaml set no meshId: the trust domain (docs/multi-host-ca.md)


def meshctl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCTL_STATE_DIR", "CONSUL_HTTP_TOKEN")}
    return {**env, **extra}


@dataclass
class RootHolder:
    """The root holder of docs/multi-host-ca.md: `citadel init --root-dir` in a directory of
    the test's own (under no host's directory), `citadel approve` through host ``via``'s Consul
    agent. Its root key never reaches a host: the hosts get their intermediates through KV."""

    lab: NetLab
    root_dir: Path
    via: int = 1

    def init(self) -> None:
        # no network needed: run on the machine itself, outside every host's namespace
        subprocess.run([sys.executable, "-m", "meshctl", "citadel", "init", "--root-dir", str(self.root_dir)],
                       cwd=self.root_dir.parent, check=True, capture_output=True, text=True, timeout=60,
                       env=meshctl_env())

    def approve(self, *args: str) -> str:
        return self.lab.run(self.via, [sys.executable, "-m", "meshctl", "citadel", "approve", "--root-dir",
                                       str(self.root_dir), "--registry", f"consul://127.0.0.1:{CONSUL_HTTP}", *args],
                            cwd=self.root_dir.parent, timeout=60, env=meshctl_env()).stdout


# ------------------------------------------------------------------ meshctl on a host


@dataclass
class MeshHost:
    """Host ``index`` as a VM user sets it up (docs/multi-host.md): examples/bookinfo and
    examples/multi-host copied side by side, `meshctl up -f host<index>.yaml` run in multi-host/."""

    lab: NetLab
    index: int
    root: Path

    @property
    def workdir(self) -> Path:
        return self.root / "multi-host"

    @property
    def mesh_file(self) -> str:
        return f"host{self.index}.yaml"

    @property
    def locality(self) -> str:
        return f"region1/zone{self.index}"

    @property
    def address(self) -> str:
        return self.lab.address(self.index)

    @property
    def state_dir(self) -> Path:
        return self.workdir / ".meshctl"

    @property
    def name(self) -> str:
        return f"host{self.index}"

    def prepare(self) -> None:
        """Copy the files, then `citadel join`: the host makes its intermediate key (it stays in
        its state directory) and publishes its CSR in Consul KV; it waits for the root holder."""
        self.root.mkdir(parents=True)
        shutil.copytree(BOOKINFO, self.root / "bookinfo", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(MULTIHOST, self.workdir)
        r = self.meshctl("citadel", "join", "--registry", f"consul://127.0.0.1:{CONSUL_HTTP}", "--host", self.name,
                         "--state-dir", str(self.state_dir), check=False, timeout=60)
        # exit status 3: the CSR is published and the host waits for its approval
        assert r.returncode == 3, f"{self.name}: citadel join exited {r.returncode}:\n{r.stdout}\n{r.stderr}"

    def meshctl(self, *args: str, check: bool = True, timeout: float = 180):
        # the namespaces share the machine's host name: each host names itself (proxy-status)
        env = meshctl_env(MESHCTL_HOST_NAME=self.name)
        return self.lab.run(self.index, [sys.executable, "-m", "meshctl", *args], cwd=self.workdir, check=check,
                            timeout=timeout, env=env)

    def up(self) -> None:
        self.meshctl("up", "-d", "-f", self.mesh_file, "--state-dir", str(self.state_dir),
                     "--advertise", self.address, "--locality", self.locality, timeout=240)

    def status(self) -> dict:
        """`meshctl status --json` of this host."""
        return json.loads(self.meshctl("status", "--json", "--state-dir", str(self.state_dir)).stdout)

    def status_file(self) -> dict:
        """The supervisor's status.json, which `status` reads (cheap enough to poll: no process started)."""
        return json.loads((self.state_dir / "status.json").read_text())

    def registry_reachable(self) -> bool:
        return bool(self.status_file()["registry"]["reachable"])

    def apply(self, *files: str) -> None:
        args = [a for f in files for a in ("-f", f)]
        self.meshctl("route", "apply", "--wait", *args, "--state-dir", str(self.state_dir))

    def pilot_registry(self) -> dict:
        """What this host's Pilot routes with: service → instances (GET /v1/registry)."""
        from meshctl.credentials import mesh_credential

        token = mesh_credential(self.state_dir)
        pilot = self.status_file()["control_plane"]["pilot"]
        hostport = pilot.split("://", 1)[1]
        h, p = hostport.rsplit(":", 1)
        status, body = self.lab.in_host(
            self.index, lambda: http_get(h, int(p), "/v1/registry", 5.0, {"Authorization": f"Bearer {token}"}), 10)
        assert status == 200, body
        return json.loads(body)

    def endpoints(self, service: str) -> set[str]:
        """Addresses (host:port) this host's Pilot has for ``service``."""
        return {f"{i['address']}:{i['port']}" for i in self.pilot_registry().get(service, [])}

    def proxy_config(self, workload: str) -> str:
        """The config ``workload``'s sidecar runs (its admin /config, mesh credential only), as text."""
        from meshctl.credentials import mesh_credential

        token = mesh_credential(self.state_dir)
        admin = int(self.workload(workload)["admin_address"].rsplit(":", 1)[1])
        status, body = self.lab.in_host(
            self.index, lambda: http_get("127.0.0.1", admin, "/config", 5.0, {"Authorization": f"Bearer {token}"}), 10)
        assert status == 200, body[:300]
        return body

    def workload(self, name: str) -> dict:
        return next(w for w in self.status_file()["workloads"] if w["name"] == name)

    def down(self) -> None:
        self.meshctl("down", "--state-dir", str(self.state_dir), check=False, timeout=60)


# ------------------------------------------------------------------ steady load


@dataclass
class Result:
    start: float
    end: float
    ok: bool
    status: int
    instance: str  # which reviews instance answered ("" if none)
    error: str = ""


RUNNING: list["Load"] = []  # loads started and not stopped: conftest stops them after each test, failed or not


@dataclass
class Load:
    """``workers`` clients in host ``host``, each sending GET ``path`` to 127.0.0.1:``port``
    one after the other (no pause), until stopped. A request fails when it gets no
    200, times out, or the page says a service was unavailable."""

    lab: NetLab
    host: int
    port: int
    path: str = "/productpage"
    workers: int = 4
    timeout: float = 20.0
    headers: dict = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _futures: list = field(default_factory=list)

    def start(self) -> "Load":
        pool = self.lab.pool(self.host, workers=max(8, self.workers + 2))
        self._futures = [pool.submit(self._worker) for _ in range(self.workers)]
        RUNNING.append(self)
        return self

    def _worker(self) -> None:
        import re

        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, body = http_get("127.0.0.1", self.port, self.path, self.timeout, self.headers)
                m = re.search(r"reviews-v\d-\d", body)
                bad = re.search(r"[^.<>]*currently unavailable[^.<>]*", body)
                self.results.append(Result(t0, time.monotonic(), status == 200 and not bad, status, m.group(0) if m else "",
                                           bad.group(0).strip() if bad else ("" if status == 200 else body[:200])))
            except OSError as e:
                self.results.append(Result(t0, time.monotonic(), False, 0, "", repr(e)))
                time.sleep(0.05)

    def stop(self) -> list[Result]:
        self._stop.set()
        if self in RUNNING:
            RUNNING.remove(self)
        for f in self._futures:
            f.result(self.timeout + 10)
        return self.results

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def summary(self, since: float | None = None) -> str:
        """Counts, and each failure: when it started (seconds after ``since``), its status and why."""
        fails = self.failures()
        t0 = since if since is not None else (self.results[0].start if self.results else 0.0)
        return (f"{len(self.results)} requests, {len(fails)} failed"
                + "".join(f"\n  at {r.start - t0:+.2f}s, {r.status} after {r.end - r.start:.2f}s: {r.error}"
                          for r in fails[:10]))

    def wait_for_requests(self, n: int, timeout: float = 60) -> None:
        target = len(self.results) + n
        wait_for(f"{n} more requests through the gateway", lambda: len(self.results) >= target, timeout, 0.05)
