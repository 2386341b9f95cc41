"""Issue 13's attack table: each attack against a real `meshctl proxy run`
process, with a legitimate keep-alive client alongside; prints one row per
attack (attack | tried | result | legit requests lost, p50 | proxy peak RSS).

    .venv/bin/python tests/tools/attack_table.py

(The drain row comes from tests/e2e/test_drain.py.)"""
import socket, subprocess, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import conftest as kit  # noqa
sys.modules["proxy_testkit"] = kit
import test_hardening as th  # noqa
from meshctl.model.base import Duration
from meshctl.model.istio import HTTPMatchRequest, StringMatch
from meshctl.model.proxyconfig import Settings

def hwm(pid):
    for l in Path(f"/proc/{pid}/status").read_text().splitlines():
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) // 1024

def start(cfg, name, nofile=None):
    d = WORK / name; d.mkdir(exist_ok=True)
    if nofile:
        proc, logp = th._low_nofile_proxy(cfg, d, nofile)
        return proc, logp
    p = kit.ProxyProcess(cfg, d)
    return p.proc, p.log_path

class Legit:
    """keep-alive GET /public every 20 ms on fresh-or-kept connections; counts failures and latency"""
    def __init__(self, port): self.port, self.ok, self.bad, self.lat, self.stop = port, 0, 0, [], threading.Event()
    def run(self):
        s = None
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                out = th._request_on(s)
                if out.startswith(b"HTTP/1.1 200"): self.ok += 1
                else: self.bad += 1; s.close(); s = None
            except OSError:
                self.bad += 1; s = None
            self.lat.append(time.monotonic() - t); time.sleep(0.02)
    def __enter__(self): self.t = threading.Thread(target=self.run, daemon=True); self.t.start(); return self
    def __exit__(self, *a): self.stop.set(); self.t.join(15)
    def p50(self): return sorted(self.lat)[len(self.lat)//2]*1000 if self.lat else float("nan")

WORK = Path(tempfile.mkdtemp(prefix="attack-table-"))
up = kit.Upstream("app"); app = th.H2cApp()
rows = []
def row(attack, tried, result, legit, proc, extra=""):
    rows.append((attack, tried, result, f"{legit.bad} of {legit.ok+legit.bad} (p50 {legit.p50():.1f} ms)", f"{hwm(proc.pid)} MB", extra))
    proc.terminate(); proc.wait(10)

# 2: h2c
lp, cfg = th._inbound_cfg(app.port); proc, _ = start(cfg, "h2c")
with Legit(lp) as lg:
    r = subprocess.run(["curl", "-s", "--http2", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} ", f"http://127.0.0.1:{lp}/public", f"http://127.0.0.1:{lp}/admin"], capture_output=True, text=True)
    out = th._exchange(lp, b"GET /public HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nGET /admin HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
row("h2c upgrade tunnel past AuthorizationPolicy", "curl --http2 /public then /admin; raw Upgrade: h2c + pipelined GET /admin",
    f"refused: curl got {r.stdout.strip()}, app saw {app.upgrades} upgrades; pipelined: {out.count(b'HTTP/1.1 403')}x403", lg, proc)
# 3: paths
lp, cfg = th._inbound_cfg(up.port); proc, _ = start(cfg, "paths")
with Legit(lp) as lg:
    st = [th._exchange(lp, f"GET {p} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".encode())[:12].decode() for p in th.ATTACK_PATHS]
row("DENY /admin walked around by encoding", " ".join(th.ATTACK_PATHS), f"refused: {sum('403' in s for s in st)}/{len(st)} got 403", lg, proc)
# 4: redos
lp = kit.free_port()
redos = kit.route_to("reviews", 9080, match=(HTTPMatchRequest(uri=StringMatch(regex="/redos/(a+)+")),))
cfg = kit.config(listeners=[kit.outbound_listener(lp)], vhosts=[kit.vhost("reviews", 9080, (redos, kit.route_to("reviews", 9080)))], clusters=[kit.cluster("reviews", 9080, [("127.0.0.1", up.port)])])
proc, _ = start(cfg, "redos")
class LegitOut(Legit):
    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/x"], capture_output=True, text=True)
            self.ok += r.stdout == "200"; self.bad += r.stdout != "200"; self.lat.append(time.monotonic()-t); time.sleep(0.02)
with LegitOut(lp) as lg:
    ts = []
    for path in ["/redos/" + "a"*21 + "!", "/redos/" + "a"*26 + "!", "/redos/" + "a"*5000 + "!"]:
        t = time.monotonic(); subprocess.run(["curl", "-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{lp}", f"http://reviews:9080{path}"]); ts.append(f"{(time.monotonic()-t)*1000:.0f} ms")
row("ReDoS uri regex /redos/(a+)+", "29-, 34- and 5007-char paths", "survived (RE2): " + ", ".join(ts), lg, proc)
# 5: floods
from hyperframe.frame import PriorityFrame, WindowUpdateFrame
for kind, fr in [("WINDOW_UPDATE", WindowUpdateFrame(0, window_increment=1).serialize()), ("PRIORITY", PriorityFrame(3, depends_on=1, stream_weight=16).serialize())]:
    lp, cfg = th._inbound_cfg(up.port); proc, _ = start(cfg, kind)
    with Legit(lp) as lg:
        time.sleep(0.3); code, sent, took = th._h2_flood(lp, fr, 8.0); time.sleep(0.3)
    row(f"HTTP/2 {kind} flood", f"h2-library client, {sent} frames offered in {took:.2f}s", f"refused: GOAWAY code {code} (ENHANCE_YOUR_CALM=11)", lg, proc)
# 8: connections
lp, cfg = th._inbound_cfg(up.port, Settings()); proc, logp = start(cfg, "conns", nofile=1024)
socks = []; refused = served = other = 0
with Legit(lp) as lg:
    time.sleep(0.3)
    for i in range(3000):
        try:
            s = socket.create_connection(("127.0.0.1", lp), timeout=5); socks.append(s)
            s.sendall(b"GET /public HTTP/1.1\r\nhost: a\r\n\r\n")
        except OSError: other += 1
    for s in socks:
        s.settimeout(5)
        try: d = s.recv(200)
        except OSError: d = b""
        if d.startswith(b"HTTP/1.1 200"): served += 1
        elif d.startswith(b"HTTP/1.1 503") : refused += 1
        else: other += 1
    time.sleep(0.3)
for s in socks: s.close()
txt = logp.read_text()
row("connection flood (ulimit -n 1024)", "3000 connections held open, each with a GET", f"{served} served, {refused} refused 503 overload, {other} other; log lines: {txt.count('connection limit')}, tracebacks: {txt.count('Traceback')}", lg, proc)
# 10: slow head / body
lp, cfg = th._inbound_cfg(up.port, Settings(request_headers_timeout=Duration(10.0), request_timeout=Duration(30.0))); proc, _ = start(cfg, "slow")
with Legit(lp) as lg:
    head = b"GET /public HTTP/1.1\r\n" + b"x-a: b\r\n" * 1000
    took, _ = th._dribble(lp, head[:1], (head[i:i+1] for i in range(1, len(head))), 0.5, 40)
    took2, out = th._dribble(lp, b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\nx", b"x", 0.5, 60)
row("slowloris head / dribbled body (defaults 10s / requestTimeout 30s)", "1 byte per 0.5 s", f"head cut at {took:.1f}s; body: {out[:12].decode()} after {took2:.1f}s", lg, proc)
for r in rows: print(" | ".join(r))
