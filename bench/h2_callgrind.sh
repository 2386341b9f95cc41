#!/usr/bin/env bash
# CPU instructions per HTTP/2 request in the client-side sidecar of pair_h2.sh's h2load row,
# counted by callgrind (repeatable on a loaded machine, unlike times):
#
#   h2load -c16 -m10 ──h2──▶ [outbound sidecar, under callgrind] ──HTTP/1.1──▶ [inbound sidecar] ──▶ nginx (12 bytes)
#
# The outbound sidecar is the one whose HTTP/2 code (h2conn.py, the codec) runs per request;
# the inbound one speaks HTTP/1.1 on both legs and runs without valgrind. Instrumentation is
# off while the sidecar starts; WARM requests, counters zeroed, N requests counted, total
# instructions (Ir) divided by N. As grpc_callgrind.sh, how requests batch into reads and
# task wake-ups depends on timing: compare builds back to back, several times.
#
# Usage: bench/h2_callgrind.sh [requests, default 20000] [streams per connection, default 10]
# MESHCTL=... picks the build; PROFILE_DIR=dir keeps the callgrind file.
# Ends with one JSON line: {"bench": "h2_callgrind", "ir_per_request": ...}
set -euo pipefail
N=${1:-20000}
M=${2:-10}
WARM=${WARM:-2000}
CONNS=16
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/meshctl-h2callgrind.XXXXXX)
PIDS=()
. "$HERE/lib.sh"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v h2load >/dev/null || { echo "needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
echo "# meshctl build: $(cd "$WORK" && "$PY" -c 'import meshctl._build as b; print(b.describe())')"

BACKEND=$(free_port); MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
write_pair_configs
start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"
(cd "$WORK" && exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/out.cg" \
   "$PY" -m meshctl.proxy --config "$WORK/out.yaml" --admin-port "$ADMIN_OUT" --log-level warning 2>"$WORK/out.log") &
PIDS+=($!); OUT_PID=$!
for u in "http://127.0.0.1:$ADMIN_IN/ready" "http://127.0.0.1:$ADMIN_OUT/ready"; do
  for _ in $(seq 1200); do curl -sf "$u" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -sf "$u" >/dev/null || { echo "not ready: $u" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1; }
done
requests() { # n → fails unless every answer is a 2xx
  local out
  out=$(h2load -c"$CONNS" -m"$M" -t1 -n "$1" -H ":authority: backend" "http://127.0.0.1:$MESH_OUT/" 2>&1)
  grep -q "status codes: $1 2xx" <<<"$out" || { echo "h2load: $out" >&2; return 1; }
}
# (see grpc_callgrind.sh: a callgrind_control request reaches an idle sidecar with the next request)
control() { callgrind_control "$1" "$OUT_PID" >>"$WORK/control.log" 2>&1 & CTL=$!; sleep 1; }
control --instr=on; requests "$WARM"; wait $CTL
control -z; requests "$N"; wait $CTL
control --dump; requests 16; wait $CTL
f="$WORK/out.cg.1"
for _ in $(seq 100); do grep -qE '^(summary|totals):' "$f" 2>/dev/null && break; sleep 0.2; done
IR=$(awk '/^(summary|totals):/{print $2; exit}' "$f")
[ -z "${PROFILE_DIR:-}" ] || { mkdir -p "$PROFILE_DIR"; cp "$f" "$PROFILE_DIR/out-h2.callgrind"; }
"$PY" - "$N" "$IR" "$M" <<'EOF'
import json, sys
n, ir, m = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"instructions per h2 request in the outbound sidecar ({n} requests, 16 connections x {m} streams): {ir / n:,.0f}")
print(json.dumps({"bench": "h2_callgrind", "requests": n, "streams": m, "ir_per_request": round(ir / n)}))
EOF
