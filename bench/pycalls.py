"""Count the interpreted Python calls a sidecar makes: in a compiled build, exactly the
interpreted code left on its request path (mypyc-compiled functions emit no profile
events), with the interpreted frame each call came from.

    PYCALLS_OUT=/tmp/calls.txt python bench/pycalls.py --config out.yaml --admin-port N
    # warm up, then:  kill -USR1 <pid>   (counts start over)
    # send N requests, then:  kill -USR2 <pid>   (the 150 most frequent go to PYCALLS_OUT)

Arguments are ``python -m meshctl.proxy``'s. Divide the counts by the requests sent. A
call from compiled code shows the nearest interpreted frame as its caller (for a task's
compiled coroutine, trio's ``python_wrapper``); a coroutine counts once when it starts
and once per resumption. Profiling slows the sidecar several
times over: count with it, do not time with it. December 2026: it showed an HTTP/2
stream's trio.CancelScope costing some twenty interpreted calls per request, and
trio.current_time() three (see bench/README.md).
"""

from __future__ import annotations

import collections
import os
import runpy
import signal
import sys
from typing import Any

_counts: collections.Counter[tuple[str, str]] = collections.Counter()


def _where(frame: Any) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


def _profile(frame: Any, event: str, arg: Any) -> None:
    if event == "call":
        code = frame.f_code
        _counts[(f"{code.co_name} {code.co_filename}:{code.co_firstlineno}", _where(frame.f_back))] += 1
    elif event == "c_call":
        _counts[(f"{getattr(arg, '__qualname__', repr(arg))} <builtin>", _where(frame))] += 1


def _reset(*_: Any) -> None:
    _counts.clear()


def _dump(*_: Any) -> None:
    sys.setprofile(None)
    try:
        by_callee: collections.Counter[str] = collections.Counter()
        for (callee, _caller), n in _counts.items():
            by_callee[callee] += n
        with open(os.environ.get("PYCALLS_OUT", "pycalls.txt"), "w") as f:
            f.write("# calls, callee (then its callers)\n")
            for callee, n in by_callee.most_common(150):
                f.write(f"{n:9d} {callee}\n")
                callers = sorted(((m, caller) for (c, caller), m in _counts.items() if c == callee), reverse=True)
                for m, caller in callers[:3]:
                    f.write(f"{'':9s}   {m:9d} from {caller}\n")
    finally:
        sys.setprofile(_profile)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _reset)
    signal.signal(signal.SIGUSR2, _dump)
    sys.argv = ["meshctl.proxy", *sys.argv[1:]]
    sys.setprofile(_profile)
    runpy.run_module("meshctl.proxy", run_name="__main__")
