"""Analysis for bench/tail_probe.sh: fortio's percentiles beside what each sidecar's run loop did.

    python bench/tail_probe.py WORKDIR

Per run (direct, nginx pair, meshctl pair): fortio p50/p90/p99/p99.9, and for
each process CPU and run-queue waiting per request (/proc/PID/schedstat: time
runnable but not running, i.e. waiting for a core). For the meshctl run, per
sidecar from its loop probe: passes of the run loop per request, the busy
periods' percentiles (epoll return to the next epoll call), the longest ones
with any gc collection or slow task step inside them, and the collections by
generation. Ends with a JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    work = Path(sys.argv[1])
    runs = {}
    for line in (work / "runs.txt").read_text().splitlines():
        head, pids, s0, s1 = (x.strip() for x in line.split("|"))
        name, t0, t1 = head.split()
        runs[name] = (int(t0), int(t1), pids.split(), list(map(int, s0.split())), list(map(int, s1.split())))
    out: dict = {"bench": "tail_probe"}
    for name, (t0, t1, pids, s0, s1) in runs.items():
        d = json.loads((work / f"{name}.fortio.json").read_text())
        h = d["DurationHistogram"]
        p = {x["Percentile"]: x["Value"] * 1000 for x in h["Percentiles"]}
        n = h["Count"]
        roles = {"direct": ["backend"], "nginx": ["nginx client", "nginx server", "backend"],
                 "meshctl": ["sidecar out", "sidecar in", "backend"]}[name]
        print(f"\n== {name}: {n} requests, p50 {p[50]:.3f} p90 {p[90]:.3f} p99 {p[99]:.3f} p99.9 {p[99.9]:.3f} ms, "
              f"max {h['Max'] * 1000:.3f}")
        out[name] = {"p50_p90_p99_p999_ms": [round(p[k], 3) for k in (50, 90, 99, 99.9)], "procs": {}}
        for i, role in enumerate(roles):
            cpu = (s1[3 * i] - s0[3 * i]) / n / 1000
            wait = (s1[3 * i + 1] - s0[3 * i + 1]) / n / 1000
            slices = (s1[3 * i + 2] - s0[3 * i + 2]) / n
            print(f"   {role:<13} CPU {cpu:6.1f} µs/request, run-queue wait {wait:6.1f} µs/request, "
                  f"{slices:.2f} times on a CPU per request")
            out[name]["procs"][role] = {"cpu_us": round(cpu, 1), "runq_wait_us": round(wait, 1),
                                        "slices": round(slices, 2)}
        if name != "meshctl":
            continue
        for side in ("out", "in"):
            pr = json.loads((work / f"{side}.probe.json").read_text())
            idx = [i for i, w in enumerate(pr["wake"]) if t0 <= w <= t1]
            busy = [pr["busy"][i] / 1000 for i in idx]
            steps = [pr["nsteps"][i] for i in idx] if pr["slow_steps"] or any(pr["nsteps"]) else []
            cpu = [pr["cpu"][i] / 1000 for i in idx]
            gcs = [g for g in pr["gc"] if t0 <= g[1] <= t1]
            print(f"   sidecar {side}: {len(idx)} loop passes ({len(idx) / n:.2f} per request); busy period µs "
                  f"p50 {pct(busy, .5):.0f} p90 {pct(busy, .9):.0f} p99 {pct(busy, .99):.0f} p99.9 "
                  f"{pct(busy, .999):.0f} max {max(busy, default=0):.0f}; busy total {sum(busy) / n:.0f} µs/request")
            print(f"     CPU in a busy period µs p50 {pct(cpu, .5):.0f} p90 {pct(cpu, .9):.0f} p99 {pct(cpu, .99):.0f} "
                  f"p99.9 {pct(cpu, .999):.0f} max {max(cpu, default=0):.0f}; CPU total {sum(cpu) / n:.0f} µs/request "
                  f"(the rest of the busy time: preempted)")
            print(f"     gc collections in the whole run: {len(pr['gc'])}, threshold {pr['gc_threshold']}, "
                  f"frozen {pr['frozen']}")
            if steps:
                nt = [pr["ntasks"][i] for i in idx]
                print(f"     task steps per pass p50 {pct(steps, .5)} p99 {pct(steps, .99)} max {max(steps)}; "
                      f"tasks per pass p50 {pct(nt, .5)} p99 {pct(nt, .99)} max {max(nt)}")
                by_nt: dict[int, list[int]] = {}
                for i in idx:
                    by_nt.setdefault(pr["ntasks"][i], []).append(i)
                for k, ii in sorted(by_nt.items()):
                    v = [pr["cpu"][i] / 1000 for i in ii]
                    # outside the steps: trio's own work in the pass (epoll results, deadlines, batch),
                    # on passes not preempted (wall time within 10% of CPU time)
                    quiet = [i for i in ii if pr["busy"][i] < 1.1 * pr["cpu"][i]]
                    sched = [(pr["busy"][i] - pr["in_steps"][i]) / 1000 for i in quiet]
                    print(f"       {k} tasks: {len(v):5d} passes, CPU µs p50 {pct(v, .5):.0f} p90 {pct(v, .9):.0f} "
                          f"p99 {pct(v, .99):.0f}; outside task steps p50 {pct(sched, .5):.0f} "
                          f"(of {len(quiet)} passes not preempted)")
                other: dict[str, list[float]] = {}
                for i in idx:
                    nm = pr["names"].get(str(i))
                    if nm:
                        other.setdefault(nm, []).append(pr["cpu"][i] / 1000)
                for k, v in sorted(other.items(), key=lambda kv: -len(kv[1])):
                    print(f"       passes with {k}: {len(v)}, CPU µs p50 {pct(v, .5):.0f} max {max(v):.0f}")
            by_gen: dict[int, list[float]] = {}
            for g in gcs:
                by_gen.setdefault(g[0], []).append(g[2] / 1000)
            for gen, ds in sorted(by_gen.items()):
                print(f"     gc gen{gen}: {len(ds)} collections, µs p50 {pct(ds, .5):.0f} max {max(ds):.0f}")
            slow: dict[str, list[float]] = {}
            for st in pr["slow_steps"]:
                if t0 <= st[0] <= t1:
                    nm = st[2].split()[1] if st[2].startswith("<function ") else st[2].rsplit(".", 1)[-1]
                    slow.setdefault(nm, []).append(st[1] / 1000)
            for nm, v in sorted(slow.items(), key=lambda kv: -max(kv[1])):
                print(f"     task steps over 200 µs of CPU: {nm}: {len(v)}, max {max(v):.0f} µs, "
                      f"{sum(v) / (t1 - t0) * 1e6:.2f} ms per second")
            # the longest busy periods and what ran in them
            longest = sorted(idx, key=lambda i: -pr["busy"][i])[:8]
            for i in longest:
                w, b = pr["wake"][i], pr["busy"][i]
                inside = [f"gc{g[0]} {g[2] / 1000:.0f}µs" for g in pr["gc"] if w <= g[1] <= w + b]
                inside += [f"{s[2].split()[1] if s[2].startswith('<function ') else s[2]} {s[1] / 1000:.0f}µs CPU "
                           f"({s[3] / 1000:.0f} wall)" for s in pr["slow_steps"] if w <= s[0] <= w + b]
                if str(i) in pr["names"]:
                    inside.append("tasks: " + pr["names"][str(i)])
                print(f"     {b / 1000:7.0f} µs (CPU {pr['cpu'][i] / 1000:5.0f}) at +{(w - t0) / 1e9:6.3f}s, "
                      f"{pr['nsteps'][i]} steps {pr['ntasks'][i]} tasks "
                      f"{'; '.join(inside)}")
            thr = 500.0
            long_ = [i for i in idx if pr["busy"][i] / 1000 > thr]
            print(f"     passes over {thr:.0f} µs: {len(long_)} ({len(long_) / n * 100:.2f}% of requests)")
            out["meshctl"][f"loop_{side}"] = {
                "passes_per_rq": round(len(idx) / n, 2),
                "busy_us_p50_p90_p99_max": [round(pct(busy, q)) for q in (.5, .9, .99)] + [round(max(busy, default=0))],
                "busy_us_per_rq": round(sum(busy) / n),
                "cpu_us_p50_p90_p99_max": [round(pct(cpu, q)) for q in (.5, .9, .99)] + [round(max(cpu, default=0))], "gc": {g: len(v) for g, v in by_gen.items()},
                "over_500us": len(long_)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
