#!/usr/bin/env bash
# System calls per request in the sidecars of h2_callgrind.sh's and grpc_callgrind.sh's
# setups, counted by `perf stat` on kernel tracepoints (no valgrind, no ptrace: the
# sidecars run at full speed, so requests batch into reads and writes as they do in
# production). Callgrind counts user-space instructions only; this is the kernel-entry
# side of the same request, for changes that trade a task wake-up for a syscall.
#
#   h2:   h2load -c16 -m<streams> ──h2──▶ [outbound sidecar] ──HTTP/1.1──▶ [inbound sidecar] ──▶ nginx
#   grpc: fortio load -grpc -ping -c<conns> ──h2──▶ [outbound] ──h2──▶ [inbound] ──h2──▶ fortio ping server
#
# Usage: bench/h2_syscalls.sh h2|grpc [requests, default 20000] [streams (h2) or connections (grpc)]
# MESHCTL=... picks the build. Prints, per request and per sidecar counted: all syscalls,
# sendto/write/sendmsg, recvfrom/read, epoll_wait, and the task clock (CPU ms, noisy).
# Ends with one JSON line: {"bench": "h2_syscalls", "mode": ..., "per_request": {...}}
set -euo pipefail
MODE=${1:?h2 or grpc}
N=${2:-20000}
K=${3:-}
WARM=${WARM:-2000}
CONNS=16
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/meshctl-h2sys.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; }
echo "# meshctl build: $(cd "$WORK" && "$PY" -c 'import meshctl._build as b; print(b.describe())')"
EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_sendmsg,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_epoll_wait,task-clock

MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
if [ "$MODE" = h2 ]; then
  M=${K:-10}
  BACKEND=$(free_port)
  nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
  nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
  write_pair_configs
  load() { # n → fails unless every answer is a 2xx
    local out
    out=$(h2load -c"$CONNS" -m"$M" -t1 -n "$1" -H ":authority: backend" "http://127.0.0.1:$MESH_OUT/" 2>&1)
    grep -q "status codes: $1 2xx" <<<"$out" || { echo "h2load: $out" >&2; return 1; }
  }
  COUNTED="out"
else
  C=${K:-4}
  FORTIO=${FORTIO:-$(bash "$HERE/../scripts/tools/fortio.sh")}
  GRPC=$(free_port); GRPC_HTTP=$(free_port)
  "$FORTIO" server -http-port "127.0.0.1:$GRPC_HTTP" -grpc-port "127.0.0.1:$GRPC" -redirect-port disabled \
    -tcp-port disabled -udp-port disabled -loglevel Warning >"$WORK/fortio-server.log" 2>&1 &
  PIDS+=($!)
  write_grpc_pair_configs
  load() { # n → fails unless every call ended SERVING
    "$FORTIO" load -grpc -ping -c "$C" -qps 0 -n "$1" -json "$WORK/g.json" "127.0.0.1:$MESH_OUT" >/dev/null 2>&1
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); c = r.get("RetCodes", {});
sys.exit(0 if set(c) == {"SERVING"} else f"gRPC calls failed: {c}")' "$WORK/g.json"
  }
  COUNTED="out in"
fi
start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; IN_PID=$SIDECAR_PID
start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; OUT_PID=$SIDECAR_PID
for u in "http://127.0.0.1:$ADMIN_IN/ready" "http://127.0.0.1:$ADMIN_OUT/ready"; do
  for _ in $(seq 600); do curl -sf "$u" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -sf "$u" >/dev/null || { echo "not ready: $u" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1; }
done
# `meshctl proxy run` re-executes itself as python -m meshctl.proxy (same pid: exec)
load "$WARM"
PERF=()
for name in $COUNTED; do
  pid=$([ "$name" = out ] && echo "$OUT_PID" || echo "$IN_PID")
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$WORK/$name.perf" & PERF+=($!)
done
sleep 0.5
load "$N"
for p in "${PERF[@]}"; do kill -INT "$p"; done
for p in "${PERF[@]}"; do wait "$p" || true; done
"$PY" - "$MODE" "$N" "$WORK" $COUNTED <<'EOF'
import json, sys
mode, n, work, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
short = {"raw_syscalls:sys_enter": "syscalls", "syscalls:sys_enter_sendto": "sendto", "syscalls:sys_enter_write": "write",
         "syscalls:sys_enter_sendmsg": "sendmsg", "syscalls:sys_enter_recvfrom": "recvfrom",
         "syscalls:sys_enter_read": "read", "syscalls:sys_enter_epoll_wait": "epoll_wait", "task-clock": "cpu_ms"}
res = {}
for name in names:
    row = {}
    for line in open(f"{work}/{name}.perf"):
        parts = line.strip().split(",")
        if len(parts) < 3 or parts[2] not in short:
            continue
        try:
            v = float(parts[0])
        except ValueError:
            continue
        key = short[parts[2]]
        row[key] = round(v / n, 3) if key != "cpu_ms" else round(v / n * 1000, 1)  # cpu: µs per request
    res[name] = row
    print(f"{name}: per request " + ", ".join(f"{k} {v}" for k, v in row.items()) + " (cpu_ms: µs per request)")
print(json.dumps({"bench": "h2_syscalls", "mode": mode, "requests": n, "per_request": res}))
EOF
