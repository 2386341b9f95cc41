"""Fold a py-spy raw profile (collapsed stacks) of a sidecar into per-layer shares,
and, given the CPU µs per request measured over the same run, µs per request per layer.

    python bench/profile_layers.py PROFILE.txt [US_PER_REQUEST]

Each sample is charged to the innermost frame that belongs to a known layer
(the first match walking from the leaf outwards), so "socket I/O" is time in
the stream's recv/send calls (mostly the kernel), "trio scheduler" is the run
loop and epoll, and so on. Ends with one JSON line.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

# (layer, pattern on "function (file:line)"), innermost match wins; order matters only on ties
LAYERS = [
    ("TLS (ssl)", r"\(ssl\.py|meshctl/proxy/tls\.py|TLSSocketStream"),
    ("socket I/O (syscalls)", r"meshctl/proxy/stream\.py"),
    ("HTTP/1 codec (httptools, protocol/http1)", r"meshctl/protocol/http1\.py|httptools"),
    ("HTTP/2 codec (jh2/h2)", r"meshctl/protocol/http2\.py|jh2/|h2/|hpack/|hyperframe/"),
    ("headers", r"meshctl/protocol/(headers|events)\.py"),
    ("routing and balancing (core)", r"meshctl/core/"),
    ("telemetry and stats", r"meshctl/proxy/(telemetry|stats|accesslog)\.py"),
    ("upstream pools", r"meshctl/proxy/(pool|h2pool|limits|outbuf)\.py"),
    ("forwarder and stages (proxy/http, h2conn)", r"meshctl/proxy/(http|h2conn|forward|ratelimit_stage|runtime|snapshot)\.py"),
    ("trio scheduler and epoll", r"trio/_core"),
]
# a sample whose leaf is trio waiting in epoll_wait is idle time, not CPU: left out
IDLE = re.compile(r"EpollIOManager\.get_events")


def layer_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, pat in LAYERS:
            if re.search(pat, frame):
                return name
    return "other (interpreter, GC, logging)"


def main() -> None:
    path = sys.argv[1]
    per_rq = float(sys.argv[2]) if len(sys.argv) > 2 else None
    shares: Counter[str] = Counter()
    total = idle = 0
    for line in open(path):
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if IDLE.search(frames[-1]):
            idle += n
            continue
        shares[layer_of(frames)] += n
        total += n
    print(f"{total} busy samples ({idle} idle in epoll left out)" + (f", {per_rq:.0f} µs CPU per request" if per_rq else ""))
    out = {}
    for name, n in shares.most_common():
        frac = n / total
        us = per_rq * frac if per_rq else None
        out[name] = {"share": round(frac, 3), "us_per_request": round(us, 1) if us is not None else None}
        print(f"  {name:<46}{frac * 100:6.1f} %" + (f"{us:8.1f} µs" if us is not None else ""))
    print(json.dumps({"bench": "profile", "samples": total, "us_per_request": per_rq, "layers": out}))


if __name__ == "__main__":
    main()
