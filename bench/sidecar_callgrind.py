"""Instructions per HTTP/1.1 request in one inbound sidecar (miniloop.py's `sidecar` mode), with the
counters zeroed after a warm-up, so that start-up and the difference of two runs play no part.

    MESHCTL_PROXY_LOOP=evloop [ML_FROM_SIDECAR=1 | ML_OUTBOUND=1] python bench/sidecar_callgrind.py VENV OUTDIR [N] [CONNS]

ML_FROM_SIDECAR=1: the requests as pair.sh's client-side sidecar forwards them (the server side's work);
ML_OUTBOUND=1: the sidecar is an outbound one, routing ``Host: backend`` to nginx (the client side's work).

h2load (--h1, N requests over CONNS connections, default 2000 and 1) -> `python -m meshctl.proxy` (an inbound
listener, VENV's build, under callgrind) -> nginx answering 12 bytes. 300 requests to warm up, then
`callgrind_control --zero`, N requests, `callgrind_control --dump` (each taken when the sidecar next wakes:
an admin request wakes it); prints the dump's total / N. The file stays in OUTDIR (callgrind_annotate
--inclusive=yes). `miniloop.py count ... sidecar` takes the difference of two whole runs (100 and 400
requests): its sidecar totals moved by tens of millions with start-up, more than 300 requests cost.
Run it from a directory outside the source tree (the build imported is VENV's)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miniloop as ml  # noqa: E402


def main() -> None:
    venv, out = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    conns = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    os.environ["PYTHONHASHSEED"] = "0"
    ml.sys.executable = os.path.join(venv, "bin", "python")  # (Bench.start runs the sidecar with it)
    os.makedirs(out, exist_ok=True)
    for x in os.listdir(out):
        if x.startswith("cg"):
            os.remove(os.path.join(out, x))
    empty = os.path.join(out, "empty")  # (Bench's PYTHONPATH: nothing in it)
    os.makedirs(empty, exist_ok=True)
    b = ml.Bench(empty)

    def wake() -> None:
        w = socket.create_connection(("127.0.0.1", b.admin))
        w.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        w.recv(1000)
        w.close()

    def ctl(cmd: str, pid: int) -> None:
        c = subprocess.Popen(["callgrind_control", cmd, str(pid)], stdout=subprocess.DEVNULL)
        time.sleep(1)
        wake()
        c.wait()

    try:
        p, port, _ = b.start("sidecar", conns, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg"], conns)
        ml.h2load(port, conns, 300)
        ctl("--zero", p.pid)
        ml.h2load(port, conns, n)
        ctl("--dump", p.pid)
        for _ in range(100):
            fs = [x for x in os.listdir(out) if x.startswith("cg.")]
            if fs and all("totals:" in open(os.path.join(out, x)).read() for x in fs):
                break
            time.sleep(0.2)
        p.kill()
        p.wait()
    finally:
        b.close()
    dump = os.path.join(out, sorted(x for x in os.listdir(out) if x.startswith("cg."))[-1])
    print(f'{{"bench": "sidecar_callgrind", "file": "{dump}", "requests": {n}, "conns": {conns}, '
          f'"instructions_per_request": {round(ml.callgrind_total(dump) / n)}}}')


if __name__ == "__main__":
    main()
