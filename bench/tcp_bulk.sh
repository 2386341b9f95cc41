#!/usr/bin/env bash
# Bulk TCP through a meshctl plain-TCP binding vs HAProxy in tcp mode; same backend,
# same machine, interleaved (A B A B).
#
#   iperf3 client ──▶ [meshctl binding (protocol: tcp) | haproxy (mode tcp, 1 thread)] ──▶ iperf3 server
#
# Both directions (upload: client → server; download: iperf3 -R). meshctl moves the bytes
# with os.splice where neither leg is TLS; HAProxy uses its own splicing where it can.
# Reported: Gbit/s of each (and direct), CPU seconds per GB of the proxy, the
# meshctl/haproxy ratio; ends with one JSON line.
#
# Usage: bench/tcp_bulk.sh [duration-seconds]   (default 10)
set -euo pipefail

DUR=${1:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/meshctl-bench-tcp.XXXXXX)
PIDS=()
. "$HERE/lib.sh"  # cleanup, free_port, cpu_ticks
need_tools haproxy:haproxy iperf3:iperf3 curl:curl
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

BACKEND=$(free_port); HAP=$(free_port); MESH=$(free_port); ADMIN=$(free_port)

iperf3 -s -p "$BACKEND" >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)

cat >"$WORK/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend bulk
  bind 127.0.0.1:$HAP
  default_backend sink
backend sink
  server s1 127.0.0.1:$BACKEND
CFG
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!); HAP_PID=$!

cat >"$WORK/mesh.yaml" <<CFG
version: bench
workload: {name: client-0, service: client}
listeners:
- {name: bulk, direction: binding, address: 127.0.0.1, port: $MESH, protocol: tcp,
   service: sink.default.svc.cluster.local, servicePort: 5201}
clusters:
  "outbound|5201||sink.default.svc.cluster.local":
    service: sink.default.svc.cluster.local
    port: 5201
    protocol: tcp
    endpoints:
    - {address: 127.0.0.1, port: $BACKEND}
CFG
start_sidecar mesh "$WORK/mesh.yaml" "$ADMIN"; MESH_PID=$SIDECAR_PID
wait_ready "http://127.0.0.1:$ADMIN/ready"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$HAP) 2>/dev/null && break; sleep 0.1; done

bulk() { # port proxy_pid [-R] → "gbps cpu_s_per_gb"
  local t0 t1 out="$WORK/iperf3.$RANDOM.json"
  t0=$(cpu_ticks "$2")
  iperf3 -c 127.0.0.1 -p "$1" -t "$DUR" -J ${3:-} >"$out" 2>&1 || { echo "iperf3 via :$1 failed:" >&2; cat "$out" >&2; return 1; }
  t1=$(cpu_ticks "$2")
  "$PY" - "$out" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["end"]["sum_received"]
gb = s["bytes"] / 1e9
print(f"{s['bits_per_second'] / 1e9:.2f} {int(sys.argv[2]) / int(sys.argv[3]) / gb if gb else 0:.3f}")
PYEOF
}

echo "# TCP bulk: meshctl binding vs HAProxy tcp mode — $(date -u +%FT%TZ), $(nproc) CPUs, load: $LOAD0"
echo "# shared machine: other work may be running; only ratios within this run mean anything"
declare -A B
for round in 1 2; do
  for dir in up down; do
    flag=""; [ $dir = down ] && flag="-R"
    B[haproxy,$dir,$round]=$(bulk "$HAP" "$HAP_PID" $flag)
    B[meshctl,$dir,$round]=$(bulk "$MESH" "$MESH_PID" $flag)
    echo "round $round $dir (Gbit/s, proxy CPU s/GB): haproxy ${B[haproxy,$dir,$round]}  meshctl ${B[meshctl,$dir,$round]}" >&2
  done
done
B[direct,up,1]=$(bulk "$BACKEND" "$HAP_PID")

"$PY" - <<PYEOF
import json
B = {$(for k in "${!B[@]}"; do printf '"%s": [%s], ' "$k" "$(echo "${B[$k]}" | tr ' ' ',')"; done)}
best = lambda who, d: max(B[f"{who},{d},{r}"][0] for r in (1, 2))
cpu = lambda who, d: min(B[f"{who},{d},{r}"][1] for r in (1, 2))
print()
print(f"{'':<10}{'up Gbit/s':>11}{'down Gbit/s':>13}{'CPU s/GB up':>13}{'down':>7}")
print(f"{'direct':<10}{B['direct,up,1'][0]:>11.2f}")
for who in ("haproxy", "meshctl"):
    print(f"{who:<10}{best(who, 'up'):>11.2f}{best(who, 'down'):>13.2f}{cpu(who, 'up'):>13.3f}{cpu(who, 'down'):>7.3f}")
ratio = min(best("meshctl", d) / best("haproxy", d) for d in ("up", "down"))
print(f"\nmeshctl/haproxy bulk throughput (worse direction): {ratio:.2f}  (target >= 1.0)")
print(json.dumps({"bench": "tcp_bulk", "load": "$LOAD0", "ratio_gbps": round(ratio, 3),
                  "gbps": {w: {d: best(w, d) for d in ("up", "down")} for w in ("haproxy", "meshctl")},
                  "direct_gbps": B["direct,up,1"][0],
                  "cpu_s_per_gb": {w: {d: cpu(w, d) for d in ("up", "down")} for w in ("haproxy", "meshctl")}}))
PYEOF
