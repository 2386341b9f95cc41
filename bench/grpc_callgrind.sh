#!/usr/bin/env bash
# CPU instructions per gRPC unary call in each sidecar of a pair, counted by callgrind:
# repeatable on a loaded machine (unlike times), so small changes can be compared A/B.
#
#   fortio load -grpc -ping ──h2──▶ [outbound sidecar] ──h2──▶ [inbound sidecar] ──h2──▶ fortio gRPC ping server
#
# Both sidecars run under valgrind (instrumentation off while they start); then WARM calls
# with instrumentation on, counters zeroed, N calls counted, and each sidecar's total
# instructions (Ir) divided by N. With PROFILE_DIR=dir the two callgrind files are kept
# there (callgrind_annotate them for where the instructions go).
#
# Usage: bench/grpc_callgrind.sh [calls, default 2000] [client connections, default 4]
# MESHCTL=... picks the build (a compiled one: python -c 'import meshctl._build as b; print(b.COMPILED)').
# Ends with one JSON line: {"bench": "grpc_callgrind", "ir_per_call": {"outbound": ..., "inbound": ...}}
set -euo pipefail
N=${1:-2000}
C=${2:-4}
WARM=${WARM:-300}
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
HERE=$(cd "$(dirname "$0")" && pwd)
FORTIO=${FORTIO:-$(bash "$HERE/../scripts/tools/fortio.sh")}
WORK=$(mktemp -d /tmp/meshctl-callgrind.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
# KEEP=1: leave $WORK (configs, logs, callgrind files) for a look
[ -z "${KEEP:-}" ] || trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; echo "kept $WORK" >&2' EXIT
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
echo "# meshctl build: $(cd "$WORK" && "$PY" -c 'import meshctl._build as b; print(b.describe())')"

GRPC=$(free_port); GRPC_HTTP=$(free_port); MESH_IN=$(free_port); MESH_OUT=$(free_port)
ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
"$FORTIO" server -http-port "127.0.0.1:$GRPC_HTTP" -grpc-port "127.0.0.1:$GRPC" -redirect-port disabled \
  -tcp-port disabled -udp-port disabled -loglevel Warning >"$WORK/fortio-server.log" 2>&1 &
PIDS+=($!)
write_grpc_pair_configs
vg_sidecar() { # name config admin-port → pid in SIDECAR_PID
  (cd "$WORK" && exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$1.cg" \
     "$PY" -m meshctl.proxy --config "$2" --admin-port "$3" --log-level warning 2>"$WORK/$1.log") &
  PIDS+=($!); SIDECAR_PID=$!
}
vg_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; IN_PID=$SIDECAR_PID
vg_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; OUT_PID=$SIDECAR_PID
for u in "http://127.0.0.1:$ADMIN_IN/ready" "http://127.0.0.1:$ADMIN_OUT/ready"; do
  for _ in $(seq 1200); do curl -sf "$u" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -sf "$u" >/dev/null || { echo "not ready: $u" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1; }
done
calls() { # n → fails unless every call ended SERVING
  "$FORTIO" load -grpc -ping -c "$C" -qps 0 -n "$1" -json "$WORK/g.json" "127.0.0.1:$MESH_OUT" >/dev/null 2>&1
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); c = r.get("RetCodes", {});
sys.exit(0 if set(c) == {"SERVING"} else f"gRPC calls failed: {c}")' "$WORK/g.json"
}
# valgrind takes a callgrind_control request when the process next runs (an idle sidecar sits
# in epoll_wait): each request is made in the background and the next call wakes both
control() { # option → the request reaches both sidecars with the next call; CTL: the two pids
  callgrind_control "$1" "$IN_PID" >>"$WORK/control.log" 2>&1 & CTL="$!"
  callgrind_control "$1" "$OUT_PID" >>"$WORK/control.log" 2>&1 & CTL="$CTL $!"
  sleep 1
}
control --instr=on; calls "$WARM"; wait $CTL
control -z; calls "$N"; wait $CTL  # (zeroed as the first of the N calls arrives)
control --dump; calls 1; wait $CTL  # (dumped as this call arrives)
total() { # name → Ir in the dump just made (a file of its own: <name>.cg.1)
  local f="$WORK/$1.cg.1"
  for _ in $(seq 100); do grep -qE '^(summary|totals):' "$f" 2>/dev/null && break; sleep 0.2; done
  awk '/^(summary|totals):/{print $2; exit}' "$f"
  [ -z "${PROFILE_DIR:-}" ] || { mkdir -p "$PROFILE_DIR"; cp "$f" "$PROFILE_DIR/$1.callgrind"; }
}
IN_IR=$(total in); OUT_IR=$(total out)
"$PY" - "$N" "$OUT_IR" "$IN_IR" "$C" <<'EOF'
import json, sys
n, out_ir, in_ir, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"instructions per gRPC unary call ({n} calls, {c} connections): outbound {out_ir / n:,.0f}, inbound {in_ir / n:,.0f}")
print(json.dumps({"bench": "grpc_callgrind", "calls": n, "conns": c,
                  "ir_per_call": {"outbound": round(out_ir / n), "inbound": round(in_ir / n)}}))
EOF
