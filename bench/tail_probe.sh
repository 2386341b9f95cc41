#!/usr/bin/env bash
# Where the meshctl pair's latency tail at 1,000 rps comes from (issue 12): Istio's fortio
# method through the pair with both sidecars' trio run loops recorded (bench/loop_probe.py),
# and each process's run-queue waiting (/proc/PID/schedstat) beside its CPU, for the nginx
# pair too. bench/tail_probe.py prints the analysis.
#
#   flock /tmp/bench.lock env MESHCTL=/path/venv/bin/meshctl bash bench/tail_probe.sh [seconds] [--steps]
#
# --steps also times every task step (names the tasks of steps over 200 µs of CPU; costs a few µs a step).
# FORTIO_ARGS adds fortio flags (e.g. "-c 1" after the default -c 16).
# As `meshctl up` runs sidecars: ACCESS_LOG=1 gives each an access log (--access-log), SCRAPE=1
# fetches both sidecars' /stats once a second during the meshctl run, as Mixer does.
set -euo pipefail
DUR=${1:-5}
STEPS=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
WORK=$(mktemp -d /tmp/meshctl-tail.XXXXXX)
PIDS=()
CONNS=16; RATE_TOTAL=1000
. "$HERE/lib.sh"
need_fortio

BACKEND=$(free_port); NGX_S=$(free_port); NGX_C=$(free_port)
MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
nginx_pair_configs
for n in backend ngx_server ngx_client; do nginx -p "$WORK/$n" -c "$WORK/$n/nginx.conf" & PIDS+=($!); echo $! >"$WORK/$n.pid"; done
write_pair_configs
cp "$HERE/loop_probe.py" "$WORK/"
probe_sidecar() { # name config admin-port → SIDECAR_PID
  local extra=()
  [[ -n ${ACCESS_LOG:-} ]] && extra=(--access-log "$WORK/$1.access.log")
  (cd "$WORK" && exec "$PY" loop_probe.py "$WORK/$1.probe.json" $STEPS -- --config "$2" --admin-port "$3" \
     --log-level warning "${extra[@]}" 2>"$WORK/$1.log") &
  PIDS+=($!); SIDECAR_PID=$!
}
probe_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; IN_PID=$SIDECAR_PID
probe_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; OUT_PID=$SIDECAR_PID
wait_ready "http://127.0.0.1:$BACKEND/"; wait_ready "http://127.0.0.1:$NGX_C/"
wait_ready "http://127.0.0.1:$ADMIN_IN/ready"; wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
NGX_S_PID=$(worker_of ngx_server); NGX_C_PID=$(worker_of ngx_client); BACKEND_PID=$(worker_of backend)
sleep 1  # past the sidecars' post-start gc.freeze

mono() { "$PY" -c 'import time; print(time.perf_counter_ns())'; }
sched() { for p in "$@"; do echo -n "$(cat /proc/$p/schedstat) "; done; }
run() { # name url pids...
  local name=$1 url=$2; shift 2
  local s0 t0 t1 s1
  s0=$(sched "$@"); t0=$(mono)
  "$FORTIO" load -qps 1000 -c 16 -payload-size 1024 -uniform -nocatchup -r 0.00001 -t "${DUR}s" \
    ${FORTIO_ARGS:-} -p "50,90,99,99.9" -H "Host: backend" -json "$WORK/$name.fortio.json" "$url" >/dev/null 2>&1 || true
  t1=$(mono); s1=$(sched "$@")
  echo "$name $t0 $t1 | $* | $s0 | $s1" >>"$WORK/runs.txt"
}
echo "# tail probe $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), ${DUR}s per run${ACCESS_LOG:+, access logs}${SCRAPE:+, /stats scraped every second}" >&2
run direct "http://127.0.0.1:$BACKEND/" "$BACKEND_PID"
run nginx "http://127.0.0.1:$NGX_C/" "$NGX_C_PID" "$NGX_S_PID" "$BACKEND_PID"
if [[ -n ${SCRAPE:-} ]]; then
  (while sleep 1; do for a in $ADMIN_OUT $ADMIN_IN; do curl -sf "http://127.0.0.1:$a/stats" >/dev/null; done; done) &
  SCRAPER=$!; PIDS+=($SCRAPER)
fi
run meshctl "http://127.0.0.1:$MESH_OUT/" "$OUT_PID" "$IN_PID" "$BACKEND_PID"
[[ -n ${SCRAPE:-} ]] && kill "$SCRAPER"
kill -INT "$OUT_PID" "$IN_PID"; wait "$OUT_PID" "$IN_PID" 2>/dev/null || true
"$PY" "$HERE/tail_probe.py" "$WORK"
[[ -n ${KEEP:-} ]] && cp -r "$WORK" "$KEEP" || true
