#!/usr/bin/env bash
# meshctl pair vs nginx pair, same backend, same machine, interleaved.
#
#   client ──▶ [client-side proxy] ──▶ [server-side proxy] ──▶ backend (nginx, 12-byte body)
#
# nginx pair:   nginx (1 worker, upstream keepalive) → nginx (same)       one process each
# meshctl pair: meshctl outbound sidecar → meshctl inbound sidecar         one process each
#
# For each pair, interleaved (A B A B):
#   1. max throughput: wrk -t1 -c16 -d${DUR}s
#   2. latency at a fixed 1,000 rps (16 connections × 62.5 rps): h2load --h1 --rps --log-file,
#      p50/p99 computed from the per-request log
#   3. CPU per sidecar (utime+stime from /proc/<pid>/stat, during the fixed-rate run) and RSS
#
# Usage: bench/pair.sh [duration-seconds]       (default 10)
# Needs: nginx, wrk, h2load, python3 with meshctl installed (MESHCTL=/path/to/meshctl to override).
set -euo pipefail

DUR=${1:-10}
RATE_TOTAL=1000
CONNS=16
HERE=$(cd "$(dirname "$0")" && pwd)
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/meshctl-bench.XXXXXX)
PIDS=()
. "$HERE/lib.sh"  # cleanup, free_port, nginx_conf, wait_ready and the measurements
need_tools nginx:nginx-light wrk:wrk h2load:nghttp2-client curl:curl
need_fortio
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)



BACKEND=$(free_port); NGX_S=$(free_port); NGX_C=$(free_port)
MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)


nginx_pair_configs

start_nginx() { nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" & PIDS+=($!); echo $! >"$WORK/$1.pid"; }
start_nginx backend; start_nginx ngx_server; start_nginx ngx_client

# meshctl: inbound sidecar in front of the backend, outbound sidecar routing "backend" to it
write_pair_configs
start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; MESH_IN_PID=$SIDECAR_PID
start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; MESH_OUT_PID=$SIDECAR_PID

wait_ready "http://127.0.0.1:$BACKEND/"
wait_ready "http://127.0.0.1:$NGX_C/"
wait_ready "http://127.0.0.1:$ADMIN_IN/ready"
wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
curl -sf "http://127.0.0.1:$MESH_OUT/" -H "host: backend" | grep -q "hello world" || { echo "meshctl pair broken" >&2; cat "$WORK"/*.log >&2; exit 1; }


# nginx does its work in the worker process (child of the master we started)
NGX_S_PID=$(worker_of ngx_server); NGX_C_PID=$(worker_of ngx_client); BACKEND_PID=$(worker_of backend)

echo "# meshctl pair vs nginx pair — $(date -u +%FT%TZ), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# shared machine: other work may be running; only ratios within this run mean anything"
declare -A RPS LAT SPLIT
for round in 1 2; do
  for pair in nginx meshctl; do
    if [ $pair = nginx ]; then url="http://127.0.0.1:$NGX_C/"; host="backend"; a=$NGX_C_PID; b=$NGX_S_PID
    else url="http://127.0.0.1:$MESH_OUT/"; host="backend"; a=$MESH_OUT_PID; b=$MESH_IN_PID; fi
    t0=$(user_sys_ticks "$b")
    r=$(maxrps "$url" "$host"); RPS[$pair,$round]=$r
    SPLIT[$pair,$round]=$(cpu_split "$b" "$t0" "$(user_sys_ticks "$b")" "$(awk -v r="$r" -v d="$DUR" 'BEGIN{print r*d}')")
    l=$(latency "$url" "$host" "$a" "$b"); LAT[$pair,$round]=$l
    echo "round $round $pair: max_rps=$r (server-side proxy, µs per request: user kernel = ${SPLIT[$pair,$round]})  fixed-1000rps: p50_us p99_us cpuA cpuB ok = $l" >&2
  done
done
l=$(latency "http://127.0.0.1:$BACKEND/" "backend" "$BACKEND_PID" "$BACKEND_PID")
LAT[direct,1]=$l
# Istio's method, through each pair and direct
F_DIRECT=$(fortio_lat "http://127.0.0.1:$BACKEND/" backend "$BACKEND_PID" "$BACKEND_PID")
F_NGINX=$(fortio_lat "http://127.0.0.1:$NGX_C/" backend "$NGX_C_PID" "$NGX_S_PID")
F_MESH=$(fortio_lat "http://127.0.0.1:$MESH_OUT/" backend "$MESH_OUT_PID" "$MESH_IN_PID")
echo "fortio (p50 p90 p99 ms, vCPU/1k rps A B, ok): direct $F_DIRECT | nginx $F_NGINX | meshctl $F_MESH" >&2

"$PY" - <<EOF
rps = {"nginx": [float("${RPS[nginx,1]}"), float("${RPS[nginx,2]}")], "meshctl": [float("${RPS[meshctl,1]}"), float("${RPS[meshctl,2]}")]}
lat = {k: [list(map(float, v.split())) for v in vs] for k, vs in {
    "nginx": ["${LAT[nginx,1]}", "${LAT[nginx,2]}"], "meshctl": ["${LAT[meshctl,1]}", "${LAT[meshctl,2]}"]}.items()}
direct = list(map(float, "${LAT[direct,1]}".split()))
rss = {"nginx client": $(rss_kb "$NGX_C_PID"), "nginx server": $(rss_kb "$NGX_S_PID"),
       "meshctl outbound": $(rss_kb "$MESH_OUT_PID"), "meshctl inbound": $(rss_kb "$MESH_IN_PID")}
best = lambda xs: max(xs)
low = lambda k, i: min(x[i] for x in lat[k])  # the better of the two rounds
print()
print("latency and CPU: the better of the two rounds; A = client-side proxy, B = server-side proxy")
print(f"{'pair':<10}{'max rps (r1, r2)':>22}{'p50 µs':>9}{'p99 µs':>9}{'vCPU/1k rps A':>15}{'B':>7}")
print(f"{'direct':<10}{'-':>22}{direct[0]:>9.0f}{direct[1]:>9.0f}")
for k in ("nginx", "meshctl"):
    print(f"{k:<10}{rps[k][0]:>11.0f},{rps[k][1]:>10.0f}{low(k,0):>9.0f}{low(k,1):>9.0f}{low(k,2):>15.3f}{low(k,3):>7.3f}")
for k, v in rss.items():
    print(f"RSS {k:<18}{v / 1024:>7.1f} MB")
ratio = best(rps["meshctl"]) / best(rps["nginx"])
added = low("meshctl", 1) - direct[1]
print()
print(f"meshctl/nginx max rps: {ratio:.2f}  (target >= 0.5)")
print(f"meshctl pair added p99 over direct: {added / 1000:.2f} ms  (target <= 2 ms); nginx pair added: {(low('nginx', 1) - direct[1]) / 1000:.2f} ms")
print(f"meshctl sidecar RSS: {max(rss['meshctl outbound'], rss['meshctl inbound']) / 1024:.1f} MB  (target <= 40 MB)")

import json
fort = {k: list(map(float, v.split())) for k, v in {"direct": "$F_DIRECT", "nginx": "$F_NGINX", "meshctl": "$F_MESH"}.items()}
add = {k: [round(fort[k][i] - fort["direct"][i], 3) for i in range(3)] for k in ("nginx", "meshctl")}
split = {k: min(sum(map(float, v.split())) for v in vs) for k, vs in {
    "nginx": ["${SPLIT[nginx,1]}", "${SPLIT[nginx,2]}"], "meshctl": ["${SPLIT[meshctl,1]}", "${SPLIT[meshctl,2]}"]}.items()}
print()
print("Istio's method (fortio -qps 1000 -c 16 -payload-size 1024 -uniform -nocatchup): added over direct, ms")
print(f"{'direct':<10} p50 {fort['direct'][0]:.3f}  p90 {fort['direct'][1]:.3f}  p99 {fort['direct'][2]:.3f}  (absolute)")
for k in ("nginx", "meshctl"):
    print(f"{k:<10} p50 +{add[k][0]:.3f} p90 +{add[k][1]:.3f} p99 +{add[k][2]:.3f}   vCPU per 1k rps: A {fort[k][3]:.3f} B {fort[k][4]:.3f}")
print(json.dumps({
    "bench": "pair", "load": "$LOAD0", "ratio_max_rps": round(ratio, 3),
    "max_rps": {k: max(v) for k, v in rps.items()},
    "server_cpu_us_per_rq": split, "ratio_server_cpu": round(split["meshctl"] / split["nginx"], 2) if split["nginx"] else None,
    "fortio_added_ms_p50_p90_p99": add,
    "ratio_added_p99": round(add["meshctl"][2] / add["nginx"][2], 2) if add["nginx"][2] > 0 else None,
    "vcpu_per_1k_rps_client_server": {k: fort[k][3:5] for k in ("nginx", "meshctl")},
    "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
}))
EOF
