#!/usr/bin/env bash
# Two builds of meshctl, A and B, each as pair.sh's sidecar pair, in front of one nginx
# backend, all started together; then wrk's max-rps run through each pair in turn
# (A B B A A B ...), with both sidecars' CPU per request. A change too small for pair.sh's
# two rounds against nginx (the machine's load moves more between its runs than the change
# does) shows here as a steady B/A ratio round after round.
#
# Usage: A=/path/venv-a/bin/meshctl B=/path/venv-b/bin/meshctl bench/ab_pair.sh [rounds] [seconds]
#        (default 6 rounds of 10 s per pair; run under flock /tmp/bench.lock like the others)
# Ends with one JSON line: the median of the rounds' B/A rps ratios, and of each build's CPU.
set -euo pipefail

ROUNDS=${1:-6}
DUR=${2:-10}
CONNS=16
HERE=$(cd "$(dirname "$0")" && pwd)
: "${A:?A=/path/to/build-a/bin/meshctl}" "${B:?B=/path/to/build-b/bin/meshctl}"
PY=${PY:-$(dirname "$A")/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/meshctl-bench-ab.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
need_tools nginx:nginx-light wrk:wrk curl:curl
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

BACKEND=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)

declare -A OUT IN_PID OUT_PID
TOP=$WORK
trap 'WORK=$TOP; cleanup' EXIT
for build in A B; do
  WORK=$TOP/$build; mkdir -p "$WORK"
  MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
  write_pair_configs
  MESHCTL=${!build}
  start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; IN_PID[$build]=$SIDECAR_PID
  start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; OUT_PID[$build]=$SIDECAR_PID
  wait_ready "http://127.0.0.1:$ADMIN_IN/ready"
  wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
  OUT[$build]=$MESH_OUT
  curl -sf "http://127.0.0.1:$MESH_OUT/" -H "host: backend" | grep -q "hello world" \
    || { echo "pair $build broken" >&2; cat "$WORK"/*.log >&2; exit 1; }
done
WORK=$TOP

echo "# A: $A"
echo "# B: $B"
echo "# $(date -u +%FT%TZ), $(nproc) CPUs, load: $LOAD0; wrk -t1 -c$CONNS -d${DUR}s per run"
RESULTS=()
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for build in $order; do
    a=${OUT_PID[$build]}; b=${IN_PID[$build]}
    ta=$(cpu_ticks "$a"); tb=$(cpu_ticks "$b")
    r=$(maxrps "http://127.0.0.1:${OUT[$build]}/" backend)
    ca=$(cpu_ticks "$a"); cb=$(cpu_ticks "$b")
    RESULTS+=("$round $build $r $((ca - ta)) $((cb - tb))")
    echo "round $round $build: $r rps" >&2
  done
done

"$PY" - "$(getconf CLK_TCK)" "$DUR" "${RESULTS[@]}" <<'EOF'
import json, statistics, sys
hz, dur = int(sys.argv[1]), float(sys.argv[2])
runs = {}
for line in sys.argv[3:]:
    rnd, build, rps, ta, tb = line.split()
    n = float(rps) * dur
    runs.setdefault(int(rnd), {})[build] = (float(rps), int(ta) / hz / n * 1e6, int(tb) / hz / n * 1e6)
print(f"{'round':<6}{'A rps':>9}{'B rps':>9}{'B/A':>7}   µs CPU per request, client / server side: A, B")
ratios = []
for rnd, r in sorted(runs.items()):
    ratios.append(r["B"][0] / r["A"][0])
    print(f"{rnd:<6}{r['A'][0]:>9.0f}{r['B'][0]:>9.0f}{ratios[-1]:>7.3f}   "
          f"{r['A'][1]:.1f} / {r['A'][2]:.1f}   {r['B'][1]:.1f} / {r['B'][2]:.1f}")
med = {b: [round(statistics.median(r[b][i] for r in runs.values()), 1) for i in range(3)] for b in "AB"}
print(f"median B/A max rps: {statistics.median(ratios):.3f} (rounds: {min(ratios):.3f} to {max(ratios):.3f})")
print(json.dumps({"bench": "ab_pair", "rounds": len(runs), "median_ratio_rps": round(statistics.median(ratios), 3),
                  "ratios": [round(x, 3) for x in ratios],
                  "median_rps_client_us_server_us": med}))
EOF
