"""Resident memory per mapping, two builds side by side, from /proc/PID/smaps copies
(bench/rss.sh with SMAPS_DIR=dir keeps them).

    python bench/smaps_diff.py --a main1.smaps main2.smaps --b branch1.smaps branch2.smaps [--min 8]

A mapping is named by its file's basename and permissions (a library's text, read-only
data and writable data apart), "[heap]", "[stack]", or "[anon <perms>]" for all anonymous
mappings together (pymalloc's arenas, malloc's mmap'd blocks and arenas of other threads).
Several files per side are averaged. Rows whose Rss differs by at least --min kB (default 8)
are printed, largest difference first, then the totals. kB as smaps counts them.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

_HEAD = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$")


def parse(path: str) -> dict[str, dict[str, int]]:
    """{mapping name: {"Rss": kB, "Anonymous": kB, "Size": kB, "count": n}} of one smaps file."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    name = ""
    with open(path) as f:
        for line in f:
            m = _HEAD.match(line)
            if m:
                perms, where = m.group(1), m.group(2).strip()
                if not where:
                    name = f"[anon {perms}]"
                elif where.startswith("["):
                    name = where
                else:
                    name = f"{os.path.basename(where)} {perms}"
                out[name]["count"] += 1
                continue
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous", "Size"):
                out[name][key] += int(rest.split()[0])
    return out


def mean(files: list[str]) -> dict[str, dict[str, float]]:
    total: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in files:
        for name, vals in parse(path).items():
            for k, v in vals.items():
                total[name][k] += v / len(files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", nargs="+", required=True, help="smaps files of build A")
    ap.add_argument("--b", nargs="+", required=True, help="smaps files of build B")
    ap.add_argument("--min", type=float, default=8.0, help="smallest Rss difference shown, kB")
    args = ap.parse_args()
    a, b = mean(args.a), mean(args.b)
    rows = []
    for name in set(a) | set(b):
        ra, rb = a.get(name, {}).get("Rss", 0.0), b.get(name, {}).get("Rss", 0.0)
        sa, sb = a.get(name, {}).get("Size", 0.0), b.get(name, {}).get("Size", 0.0)
        rows.append((rb - ra, name, ra, rb, sa, sb))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"{'mapping':<58}{'Rss A':>9}{'Rss B':>9}{'B-A':>8}{'Size A':>10}{'Size B':>10}")
    for d, name, ra, rb, sa, sb in rows:
        if abs(d) >= args.min:
            print(f"{name[:57]:<58}{ra:9.0f}{rb:9.0f}{d:+8.0f}{sa:10.0f}{sb:10.0f}")
    ta, tb = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"{'total':<58}{ta:9.0f}{tb:9.0f}{tb - ta:+8.0f}")


if __name__ == "__main__":
    main()
