"""Where a sidecar's memory is: run it under tracemalloc, and on SIGUSR2 write the live
Python memory after a full collection, the peak traced since start, and the allocation
sites holding the most, to HEAPSNAP_OUT.

    HEAPSNAP_OUT=/tmp/heap.txt python bench/heapsnap.py --config out.yaml --admin-port N
    # load it, then:  kill -USR2 <pid>

Arguments are ``python -m meshctl.proxy``'s. HEAPSNAP_FRAMES (default 1) frames per
allocation site. HEAPSNAP_TRACE=0: no tracemalloc (RSS and pymalloc's arenas as without
it); the dump is then pymalloc's statistics only. Either way the dump holds
``sys._debugmallocstats()`` as found and after a full collection: arenas allocated, reclaimed and in use, their high-water,
bytes in used blocks and in free pools. In a compiled build an allocation made by mypyc-compiled code is charged
to the nearest interpreted frame. Compare two builds' "live" and "peak" lines: when RSS
differs and "live" does not, the difference is allocator memory used at the peak and not
given back (December 2026: main and the h1in cuts differed by 49 KB live, 230 KB peak,
0.7 MB RSS; bench/README.md). tracemalloc adds its own memory to RSS: compare RSS only
between two runs of this script.
"""

from __future__ import annotations

import gc
from collections import Counter
import os
import runpy
import signal
import sys
import tracemalloc
from typing import Any

TRACE = os.environ.get("HEAPSNAP_TRACE", "1") != "0"
if TRACE:
    tracemalloc.start(int(os.environ.get("HEAPSNAP_FRAMES", "1")))


def _mallocstats(f: Any, title: str) -> None:
    f.write(f"# sys._debugmallocstats(), {title}\n")
    f.flush()
    # it writes to the C stderr: point fd 2 at the file meanwhile
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _dump(*_: Any) -> None:
    with open(os.environ.get("HEAPSNAP_OUT", "heapsnap.txt"), "w") as f:
        _mallocstats(f, "as found (garbage not yet collected)")
        # what the collection finds unreachable (reference cycles the request path left), by type
        f.write(f"# gc: collections per generation {[st['collections'] for st in gc.get_stats()]}, "
                f"counts {gc.get_count()}\n")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        gc.set_debug(0)
        kinds = Counter(type(o).__qualname__ for o in gc.garbage)
        f.write(f"# cyclic garbage: {len(gc.garbage)} objects\n")
        for kind, n in kinds.most_common(25):
            f.write(f"{n:8d} {kind}\n")
        gc.garbage.clear()
        gc.collect()
        if TRACE:
            live, peak = tracemalloc.get_traced_memory()
            snap = tracemalloc.take_snapshot()
            f.write(f"live {live / 1e6:.3f} MB  peak {peak / 1e6:.3f} MB\n# KB, blocks, where\n")
            for st in snap.statistics("traceback")[:40]:
                f.write(f"{st.size / 1e3:9.1f} {st.count:8d} {' <- '.join(str(fr) for fr in st.traceback)}\n")
        _mallocstats(f, "after a full collection")


signal.signal(signal.SIGUSR2, _dump)
sys.argv = ["meshctl.proxy", *sys.argv[1:]]
runpy.run_module("meshctl.proxy", run_name="__main__")
