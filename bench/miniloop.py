"""What an event loop that is not trio would cost a sidecar: relays on the same sockets, each in a
process of its own, between h2load (clients) and nginx (the app, 12 bytes), measured alone.

    PY=/tmp/s29b/V/bin/python       # a compiled meshctl build with mypy in it
    $PY bench/miniloop.py build DIR                     # compile bench/mlcore.py with mypyc into DIR
    $PY bench/miniloop.py count DIR MODE CONNS [N1 N2]  # callgrind: instructions per request
    $PY bench/miniloop.py time DIR CONNS [REQUESTS] [ROUNDS] [MODE ...]   # CPU µs per request
    $PY bench/miniloop.py syscalls DIR CONNS REQUESTS [MODE ...]          # strace -c: calls per request

MODE (the relay process):
  trio     hop_bench.py --toy's relay: trio, meshctl's SocketBackend streams, one upstream per client
  lt, et   (b) the same relay on mlcore.Loop (epoll level- / edge-triggered, callbacks, timer heap)
  coro     (b') lt's loop running the toy relay as compiled `async def` tasks (await a Park object)
  h1       (c) mlcore.Loop driving meshctl's H1Server/H1Client (parse, pick upstream, serialize, relay)
  ev       bench/evrelay.py (the toy relay as async tasks, trio's names) on evloop, compiled with it
  evtrio   the same compiled relay on trio (trio.lowlevel.wait_readable, raw sockets)
  evto, evtriot   ev and evtrio with a move_on_after(15) scope around each request
  hyb      (d) lt's relay inside trio: one trio task waits on the epoll fd, runs the ready callbacks
  hybh1    (d) with h1's relay
  sidecar  the product: `meshctl proxy run`, an inbound listener in front of the app
  nginx    nginx as the proxy (1 worker, upstream keepalive), for scale

``count`` runs the relay under ``valgrind --tool=callgrind`` twice (N1 and N2 requests per
connection, default 100 and 400, h2load -c CONNS -n CONNS*N) with PYTHONHASHSEED=0 and prints
(I(N2) - I(N1)) / (CONNS * (N2 - N1)): the relay's instructions per request, nothing else's
(h2load and nginx are other processes). Under valgrind the relay is ~50x slower than its peers,
so with 16 connections it finds many events per epoll_wait (the saturated regime).
``time`` runs each MODE for REQUESTS requests (after a warm-up), interleaved for ROUNDS rounds,
and prints the relay process's CPU (utime + stime from /proc) per request, best of the rounds.
``ML_FROM_SIDECAR=1`` sends the request as pair.sh's client-side sidecar forwards it (7 more fields).
``ML_KEEP=DIR`` keeps the callgrind files (for ``callgrind_annotate --inclusive=yes``).
Run from any directory; the relay processes run in /tmp, so the build's meshctl is the one imported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
H2LOAD = shutil.which("h2load") or "h2load"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


# ------------------------------------------------------------------ relay processes


def relay_trio(port: int, app: int, expect: int, ready: str) -> None:
    import trio
    from meshctl.proxy.backend import SocketBackend

    async def main() -> None:
        backend = SocketBackend()
        lst = backend.listen("127.0.0.1", port)
        closed = 0
        async with trio.open_nursery() as nursery:
            async def conn(down) -> None:  # hop_bench.py's toy_hop
                nonlocal closed
                up = await backend.connect("127.0.0.1", app)
                try:
                    while True:
                        data = await down.receive_some()
                        if not data:
                            return
                        await up.send_all(data)
                        await down.send_all(await up.receive_some())
                finally:
                    up.close_now()
                    down.close_now()
                    closed += 1
                    if closed >= expect:
                        nursery.cancel_scope.cancel()

            async def accept() -> None:
                while True:
                    stream, _ = await lst.accept()
                    nursery.start_soon(conn, stream)

            nursery.start_soon(accept)
            open(ready, "w").close()

    trio.run(main)


def relay_loop(mode: str, port: int, app: int, expect: int, ready: str) -> None:
    import mlcore

    loop = mlcore.Loop(edge=mode == "et")
    lsock = listen(port)
    if mode == "h1" or mode == "hybh1":
        stats = mlcore.h1_relay(loop, lsock, [("127.0.0.1", app)], expect)
    elif mode == "coro":
        stats = mlcore.coro_relay(loop, lsock, ("127.0.0.1", app), expect)
    else:
        stats = mlcore.byte_relay(loop, lsock, ("127.0.0.1", app), expect)
    open(ready, "w").close()
    if not mode.startswith("hyb"):
        mlcore.run_loop(loop)
    else:
        import trio

        async def main() -> None:  # (d): one trio task owns the epoll fd
            fd = loop.fileno()
            run_once = loop.run_once
            while loop.running:
                await trio.lowlevel.wait_readable(fd)
                run_once(0)

        trio.run(main)
    print(json.dumps({"passes": loop.passes, "events": loop.events, "accepted": stats.accepted}), file=sys.stderr)


def relay_ev(mode: str, port: int, app: int, expect: int, ready: str) -> None:
    lsock = listen(port)
    timeout = mode in ("evto", "evtriot")
    if mode.startswith("evtrio"):
        import evrelay_trio
        import trio

        stats = trio.run(evrelay_trio.serve, lsock, app, expect, timeout, ready)
    else:
        import evloop
        import evrelay_ev

        stats = evloop.run(evrelay_ev.serve, lsock, app, expect, timeout, ready)
    print(json.dumps({"accepted": stats.accepted, "requests": stats.requests}), file=sys.stderr)


def relay_main(argv: list[str]) -> None:
    mode, port, app, expect, ready = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    if mode.startswith("ev"):
        relay_ev(mode, port, app, expect, ready)
    elif mode == "trio":
        relay_trio(port, app, expect, ready)
    else:
        relay_loop(mode, port, app, expect, ready)


# ------------------------------------------------------------------ harness


class Bench:
    def __init__(self, build: str) -> None:
        self.build = build
        self.work = tempfile.mkdtemp(prefix="miniloop.")
        self.app = free_port()
        self.nginx_conf("app", f"server {{ listen 127.0.0.1:{self.app}; location / {{ return 200 'hello world\\n'; }} }}")
        self.app_proc = subprocess.Popen([NGINX, "-c", f"{self.work}/app/nginx.conf"], stderr=subprocess.DEVNULL)
        wait_port(self.app)

    def nginx_conf(self, name: str, body: str, single: bool = False) -> str:
        os.makedirs(f"{self.work}/{name}/logs", exist_ok=True)
        path = f"{self.work}/{name}/nginx.conf"
        with open(path, "w") as f:
            f.write(f"worker_processes 1;\ndaemon off;\n{'master_process off;' if single else ''}\n"
                    f"pid {self.work}/{name}/nginx.pid;\nerror_log {self.work}/{name}/logs/error.log warn;\n"
                    f"events {{ worker_connections 4096; }}\n"
                    f"http {{ access_log off; keepalive_requests 1000000;\n {body}\n}}\n")
        return path

    def close(self) -> None:
        self.app_proc.terminate()
        self.app_proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    def start(self, mode: str, conns: int, pre: list[str], expect: int) -> tuple[subprocess.Popen, int, int]:
        """Start a relay; returns (process, port, pid whose CPU is the relay's)."""
        port = free_port()
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=self.build)
        if mode == "nginx":
            conf = self.nginx_conf(f"ngx{port}", f"upstream b {{ server 127.0.0.1:{self.app}; keepalive 64; }}\n"
                                   f" server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://b; "
                                   f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}", single=True)
            p = subprocess.Popen(pre + [NGINX, "-c", conf], stderr=subprocess.DEVNULL, cwd="/tmp")
            wait_port(port, p)
            return p, port, p.pid
        if mode == "sidecar":
            cfg = f"{self.work}/in{port}.yaml"
            admin = free_port()
            with open(cfg, "w") as f:
                if os.environ.get("ML_OUTBOUND"):  # the client side of pair.sh's pair: routes to the app
                    f.write(f"version: bench\nworkload: {{name: client-0, service: client}}\nlisteners:\n"
                            f"- {{name: outbound, direction: outbound, address: 127.0.0.1, port: {port}, "
                            f"routeTable: outbound}}\nrouteTables:\n  outbound:\n    virtualHosts:\n"
                            f"    - name: backend.default.svc.cluster.local:80\n"
                            f"      domains: [backend, \"127.0.0.1:{port}\"]\n      routes:\n      - route:\n"
                            f"        - destination: {{host: backend.default.svc.cluster.local, port: {{number: 80}}}}\n"
                            f"clusters:\n  \"outbound|80||backend.default.svc.cluster.local\":\n"
                            f"    service: backend.default.svc.cluster.local\n    port: 80\n"
                            f"    endpoints:\n    - {{address: 127.0.0.1, port: {self.app}}}\n")
                else:
                    f.write(f"version: bench\nworkload: {{name: backend-0, service: backend}}\nlisteners:\n"
                            f"- {{name: inbound, direction: inbound, address: 127.0.0.1, port: {port}, "
                            f"appAddress: 127.0.0.1, appPort: {self.app}}}\n")
            # (`meshctl proxy run` execs `python -m meshctl.proxy`, which valgrind would not follow)
            p = subprocess.Popen(pre + [sys.executable, "-m", "meshctl.proxy", "--config", cfg, "--admin-port",
                                        str(admin), "--log-level", "warning"], cwd="/tmp", env=env,
                                 stderr=open(f"{self.work}/sidecar.log", "a"))
            wait_port(admin, p)
            wait_port(port, p)
            self.admin = admin
            return p, port, p.pid
        ready = f"{self.work}/ready{port}"
        p = subprocess.Popen(pre + [sys.executable, os.path.abspath(__file__), "relay", mode, str(port),
                                    str(self.app), str(expect), ready], cwd="/tmp", env=env,
                             stderr=open(f"{self.work}/relay.log", "a"))
        for _ in range(1200):
            if os.path.exists(ready):
                break
            if p.poll() is not None:
                raise SystemExit(f"relay {mode} exited: " + open(f"{self.work}/relay.log").read()[-2000:])
            time.sleep(0.05)
        return p, port, p.pid

    def stop(self, mode: str, p: subprocess.Popen) -> None:
        if mode in ("nginx", "sidecar"):
            p.send_signal(signal.SIGQUIT if mode == "nginx" else signal.SIGTERM)
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_port(port: int, p: subprocess.Popen | None = None) -> None:
    for _ in range(1200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if p is not None and p.poll() is not None:
                raise SystemExit(f"process exited before listening on {port}")
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


# ML_FROM_SIDECAR=1: the request as pair.sh's client-side sidecar forwards it (hop_bench.py --from-sidecar)
FROM_SIDECAR = ["x-forwarded-for: 127.0.0.1", "x-request-id: 0b5e7c9a-3f1d-4c2b-9e8a-6d4f2a1b0c3e",
                "x-meshctl-source: workload=client;app=client;version=unknown;namespace=default;"
                "principal=spiffe://cluster.local/ns/default/sa/client"]


def h2load(port: int, conns: int, n: int) -> None:
    extra = [a for h in FROM_SIDECAR for a in ("-H", h)] if os.environ.get("ML_FROM_SIDECAR") else []
    out = subprocess.run([H2LOAD, "--h1", "-t1", "-c", str(conns), "-n", str(n), *extra, f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    if f"{n} succeeded" not in out or "status codes: " + str(n) + " 2xx" not in out:
        raise SystemExit("h2load: " + out[-1500:])


def cpu(pid: int) -> tuple[int, int]:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])


def callgrind_total(path: str) -> int:
    for line in open(path):
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no total in {path}")


def count(build: str, mode: str, conns: int, n1: int, n2: int) -> None:
    b = Bench(build)
    totals = []
    batch = []
    try:
        for n in (n1, n2):
            out = f"{b.work}/cg.{mode}.{n}"
            pre = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            # (with master_process off nginx's connection probe counts too; the sidecar's admin probe does not)
            p, port, _ = b.start(mode, conns, pre, conns)
            h2load(port, conns, conns * n)
            if mode == "sidecar":  # it dies on SIGTERM without a dump: ask for one (taken when it next wakes)
                ctl = subprocess.Popen(["callgrind_control", "--dump", str(p.pid)], stdout=subprocess.DEVNULL)
                time.sleep(1)
                wake = socket.create_connection(("127.0.0.1", b.admin))
                wake.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                wake.recv(1000)
                wake.close()
                ctl.wait()
                for _ in range(100):
                    if os.path.exists(out + ".1") and "totals:" in open(out + ".1").read():
                        break
                    time.sleep(0.2)
                shutil.move(out + ".1", out + ".dump")
                p.kill()
                p.wait()
                out += ".dump"
            else:
                b.stop(mode, p)
            totals.append(callgrind_total(out))
            stats = [ln for ln in open(f"{b.work}/relay.log").read().splitlines() if '"passes"' in ln] \
                if os.path.exists(f"{b.work}/relay.log") else []
            if stats:
                st = json.loads(stats[-1])
                batch.append(round(st["events"] / max(1, st["passes"]), 2))
            if os.environ.get("ML_KEEP"):  # a directory to keep the callgrind files in (callgrind_annotate)
                shutil.copy(out, os.path.join(os.environ["ML_KEEP"], f"cg.{mode}.c{conns}.{n}"))
    finally:
        b.close()
    per = (totals[1] - totals[0]) / (conns * (n2 - n1))
    print(json.dumps({"bench": "miniloop-count", "mode": mode, "conns": conns, "n": [n1, n2], "totals": totals,
                      "instructions_per_request": round(per), "events_per_pass": batch}))


def timing(build: str, conns: int, n: int, rounds: int, modes: list[str]) -> None:
    b = Bench(build)
    res: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for _ in range(rounds):
            for mode in modes:
                p, port, pid = b.start(mode, conns, [], 2 * conns)
                h2load(port, conns, max(2000, conns * 200))  # warm-up: its own connections
                u0, s0 = cpu(pid)
                h2load(port, conns, n)
                u1, s1 = cpu(pid)
                b.stop(mode, p)
                res[mode].append(((u1 - u0) / HZ / n * 1e6, (s1 - s0) / HZ / n * 1e6))
                r = res[mode][-1]
                batch = ""
                if mode not in ("trio", "sidecar", "nginx") and not mode.startswith("ev"):  # the loop's events per epoll pass (whole run)
                    st = [ln for ln in open(f"{b.work}/relay.log").read().splitlines() if '"passes"' in ln]
                    if st:
                        d = json.loads(st[-1])
                        batch = f", {d['events'] / max(1, d['passes']):.2f} events per pass"
                print(f"# {mode} conns={conns}: {r[0] + r[1]:.1f} µs/request (user {r[0]:.1f}, kernel {r[1]:.1f}){batch}",
                      flush=True)
    finally:
        b.close()
    out = {}
    for mode, rs in res.items():
        best = min(rs, key=lambda r: r[0] + r[1])
        out[mode] = {"cpu_us": round(best[0] + best[1], 1), "user_us": round(best[0], 1),
                     "runs": [round(u + s, 1) for u, s in rs]}
    print(json.dumps({"bench": "miniloop-time", "conns": conns, "requests": n, "best": out}))


def syscalls(build: str, conns: int, n: int, modes: list[str]) -> None:
    """strace -c on each relay for n requests (after the warm-up): system calls per request, by name."""
    b = Bench(build)
    res = {}
    try:
        for mode in modes:
            p, port, pid = b.start(mode, conns, [], 2 * conns)
            h2load(port, conns, max(2000, conns * 200))
            st = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", f"{b.work}/strace.{mode}"],
                                  stderr=subprocess.DEVNULL)
            time.sleep(1)
            h2load(port, conns, n)
            st.send_signal(signal.SIGINT)
            st.wait()
            b.stop(mode, p)
            calls: dict[str, float] = {}
            for line in open(f"{b.work}/strace.{mode}"):
                f = line.split()
                if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                    calls[f[-1]] = round(int(f[3]) / n, 2)
            res[mode] = {"per_request": round(sum(calls.values()), 2),
                         "by_name": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:6])}
            print(f"# {mode} conns={conns}: {res[mode]}", flush=True)
    finally:
        b.close()
    print(json.dumps({"bench": "miniloop-syscalls", "conns": conns, "requests": n, "modes": res}))


def build(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(HERE, "mlcore.py"), dest)
    subprocess.run([sys.executable, "-m", "mypyc", "--ignore-missing-imports", "mlcore.py"], cwd=dest, check=True)
    os.remove(os.path.join(dest, "mlcore.py"))
    # the ev* modes: evloop and the relay written against it in one group (native calls between
    # them, as the proxy and its runtime would be), and the same relay importing trio's names
    shutil.copy(os.path.join(HERE, "..", "meshctl", "proxy", "evloop.py"), dest)
    src = open(os.path.join(HERE, "evrelay.py")).read()
    head, rest = src.split("# RUNTIME-BEGIN\n")
    _, tail = rest.split("# RUNTIME-END\n")
    with open(os.path.join(dest, "evrelay_ev.py"), "w") as f:
        f.write(src)
    with open(os.path.join(dest, "evrelay_trio.py"), "w") as f:
        f.write(head + "from trio import CancelScope, move_on_after, open_nursery\n"
                "from trio.lowlevel import notify_closing, wait_readable\n" + tail)
    names = ["evloop.py", "evrelay_ev.py", "evrelay_trio.py"]
    subprocess.run([sys.executable, "-m", "mypyc", "--ignore-missing-imports", *names], cwd=dest, check=True)
    for n in names:
        os.remove(os.path.join(dest, n))
    print(f"built {dest}")


def main() -> None:
    a = sys.argv[1:]
    if a[0] == "relay":
        sys.path.insert(0, os.environ["PYTHONPATH"].split(":")[0])
        relay_main(a[1:])
    elif a[0] == "build":
        build(a[1])
    elif a[0] == "count":
        count(a[1], a[2], int(a[3]), int(a[4]) if len(a) > 4 else 100, int(a[5]) if len(a) > 5 else 400)
    elif a[0] == "syscalls":
        syscalls(a[1], int(a[2]), int(a[3]), a[4:] or ["trio", "lt", "h1", "hybh1", "sidecar", "nginx"])
    elif a[0] == "time":
        timing(a[1], int(a[2]), int(a[3]) if len(a) > 3 else 20000, int(a[4]) if len(a) > 4 else 3,
               a[5:] or ["trio", "lt", "et", "coro", "h1", "hyb", "hybh1", "sidecar", "nginx"])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
