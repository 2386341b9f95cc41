#!/usr/bin/env bash
# System calls per request in each proxy of the HTTP/1.1 pairs (pair.sh's setup: an nginx
# backend, an nginx pair and a meshctl pair in front of it), counted by strace -c while
# h2load sends N requests over 16 keep-alive connections through each pair in turn.
# Counts, not times: strace slows the proxies many times over, but what a request
# makes the kernel do is the same.
#
#   MESHCTL=/path/venv/bin/meshctl bash bench/syscalls.sh [requests, default 20000]
#
# Ends with one JSON line: {"bench": "syscalls", "nginx_client": ..., ...} (per request, all calls).
set -euo pipefail
N=${1:-20000}
CONNS=16; DUR=5; RATE_TOTAL=1000
HERE=$(cd "$(dirname "$0")" && pwd)
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
WORK=$(mktemp -d /tmp/meshctl-syscalls.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
need_tools nginx:nginx-light h2load:nghttp2-client strace:strace curl:curl

BACKEND=$(free_port); NGX_S=$(free_port); NGX_C=$(free_port)
MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
nginx_pair_configs
for n in backend ngx_server ngx_client; do nginx -p "$WORK/$n" -c "$WORK/$n/nginx.conf" & PIDS+=($!); echo $! >"$WORK/$n.pid"; done
write_pair_configs
start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; MESH_IN_PID=$SIDECAR_PID
start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; MESH_OUT_PID=$SIDECAR_PID
wait_ready "http://127.0.0.1:$BACKEND/"; wait_ready "http://127.0.0.1:$NGX_C/"
wait_ready "http://127.0.0.1:$ADMIN_IN/ready"; wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
NGX_S_PID=$(worker_of ngx_server); NGX_C_PID=$(worker_of ngx_client)

load() { h2load --h1 -n "$2" -c $CONNS -t1 -H ":authority: backend" "$1" | awk '/^status codes:/{print $3}'; }
per_request() { # strace -c output → "syscall calls-per-request" lines, the total last
  awk -v n="$N" '$1 ~ /^[0-9.]+$/ && $2 ~ /^[0-9.]+$/ && NF >= 5 {printf "%s %.2f\n", $NF, $4 / n}' "$1"
}
json="{\"bench\": \"syscalls\", \"requests\": $N"
echo "# system calls per request, $N requests over $CONNS connections ($(date -u +%FT%TZ))"
for pair in nginx meshctl; do
  if [ $pair = nginx ]; then url="http://127.0.0.1:$NGX_C/"; a=$NGX_C_PID; b=$NGX_S_PID
  else url="http://127.0.0.1:$MESH_OUT/"; a=$MESH_OUT_PID; b=$MESH_IN_PID; fi
  load "$url" 2000 >/dev/null  # connections open and warm before counting
  strace -f -c -o "$WORK/$pair.client" -p "$a" 2>/dev/null & s1=$!
  strace -f -c -o "$WORK/$pair.server" -p "$b" 2>/dev/null & s2=$!
  sleep 1
  ok=$(load "$url" "$N")
  kill -INT $s1 $s2; wait $s1 $s2 2>/dev/null || true
  [[ $ok == "$N" ]] || { echo "$pair: $ok of $N requests got a 2xx" >&2; exit 1; }
  for side in client server; do
    echo "$pair $side-side proxy: $(per_request "$WORK/$pair.$side" | awk '$2 >= 0.01 {printf "%s %s, ", $1, $2}' | sed 's/, $//')"
    json+=", \"${pair}_$side\": $(per_request "$WORK/$pair.$side" | awk '$1 == "total" {print $2}')"
  done
done
echo "$json}"
