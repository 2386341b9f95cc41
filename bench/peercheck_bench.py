"""Cost of the outbound listeners' local-user check, per accepted connection.

What a sidecar adds to each accept on an outbound or binding listener
(proxy/peercheck.py): getpeername + getsockname + one NETLINK_SOCK_DIAG
request/answer + core/peeruid.decide. Measured on real loopback connections:

    flock /tmp/bench.lock .venv/bin/python bench/peercheck_bench.py [--conns 200] [--rounds 50]

Prints µs per check (median of rounds), and for scale µs per plain
connect+accept+close of the same sockets without the check.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from meshctl.core.peeruid import Admit, decide
from meshctl.proxy.peercheck import PeerUids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    uids = PeerUids()
    if uids.off_reason:
        raise SystemExit(f"check off here: {uids.off_reason}")
    allowed = frozenset({os.geteuid()})
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    check_us, accept_us = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        pairs = []
        for _ in range(a.conns):
            c = socket.create_connection(ls.getsockname())
            s, _ = ls.accept()
            pairs.append((c, s))
        t1 = time.perf_counter()
        for _, s in pairs:
            assert isinstance(decide(allowed, uids.lookup(s)), Admit)
        t2 = time.perf_counter()
        for c, s in pairs:
            c.close()
            s.close()
        t3 = time.perf_counter()
        check_us.append((t2 - t1) / a.conns * 1e6)
        accept_us.append(((t1 - t0) + (t3 - t2)) / a.conns * 1e6)
    print(f"check per accepted connection: {statistics.median(check_us):.1f} us (median of {a.rounds} rounds "
          f"of {a.conns}; min {min(check_us):.1f})")
    print(f"for scale, connect+accept+close without it: {statistics.median(accept_us):.1f} us")


if __name__ == "__main__":
    main()
