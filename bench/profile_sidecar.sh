#!/usr/bin/env bash
# Where a server-side sidecar's CPU goes at max rps: wrk -c16 through a meshctl pair
# (HTTP/1.1, 12-byte answers from nginx), py-spy sampling the server-side (inbound)
# sidecar meanwhile, then bench/profile_layers.py folds the stacks into layers and
# µs per request (from the sidecar's utime+stime over the same run).
#
# Usage: bench/profile_sidecar.sh [duration-seconds] [mtls]    (py-spy: pip install py-spy)
set -euo pipefail
DUR=${1:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
PYSPY=${PYSPY:-$(command -v py-spy || echo "$(dirname "$PY")/py-spy")}
CONNS=16
WORK=$(mktemp -d /tmp/meshctl-profile.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
need_tools nginx:nginx-light wrk:wrk curl:curl
[ -x "$PYSPY" ] || "$PY" -m pip install -q py-spy

BACKEND=$(free_port); MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
write_pair_configs
start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; IN_PID=$SIDECAR_PID
start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"
wait_ready "http://127.0.0.1:$BACKEND/"; wait_ready "http://127.0.0.1:$ADMIN_IN/ready"; wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"

t0=$(cpu_ticks "$IN_PID")
"$PYSPY" record --format raw --rate 250 -d "$DUR" -o "$WORK/profile.txt" -p "$IN_PID" >/dev/null 2>&1 &
SPY=$!
out=$(wrk -t1 -c$CONNS -d"${DUR}s" -H "Host: backend" "http://127.0.0.1:$MESH_OUT/")
wait $SPY || true
t1=$(cpu_ticks "$IN_PID")
rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
us=$("$PY" -c "import sys; print(($t1 - $t0) / $(getconf CLK_TCK) / ($rps * $DUR) * 1e6)")
echo "# server-side sidecar at max rps: $rps rps, $(printf %.0f "$us") µs CPU per request (load: $(cut -d' ' -f1-3 /proc/loadavg))"
cp "$WORK/profile.txt" "${PROFILE_OUT:-/tmp/meshctl-sidecar-profile.txt}"
"$PY" "$HERE/profile_layers.py" "$WORK/profile.txt" "$us"

# py-spy samples wall time while the process is runnable: on a loaded machine the
# send() that wakes the peer is where the scheduler preempts us, so "socket I/O"
# above includes waiting for a CPU. perf samples CPU cycles only: where the CPU
# really goes, by binary (interpreter, kernel, llhttp, libc ...).
if command -v perf >/dev/null 2>&1; then
  perf record -F 999 -p "$IN_PID" -o "$WORK/perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
  PERF=$!
  wrk -t1 -c$CONNS -d"${DUR}s" -H "Host: backend" "http://127.0.0.1:$MESH_OUT/" >/dev/null
  wait $PERF || true
  echo "# CPU by binary (perf, server-side sidecar at max rps):"
  perf report -i "$WORK/perf.data" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
fi
