#!/usr/bin/env bash
# HTTP/2 and gRPC through a meshctl sidecar pair vs an nginx pair; same backends, same
# machine, interleaved (A B A B).
#
# HTTP/2 (h2load -m10, h2c prior knowledge) in front of an HTTP/1.1 backend:
#   h2load ──h2──▶ [client-side proxy] ──HTTP/1.1 keep-alive──▶ [server-side proxy] ──▶ nginx backend (12 bytes)
#   nginx pair: `listen http2` + proxy_pass (nginx speaks only HTTP/1.1 to a proxy_pass upstream);
#   meshctl pair: the outbound listener detects h2; the cluster is plain `http`, so the
#   sidecars talk HTTP/1.1 to each other, as Istio's default h2UpgradePolicy does.
#   Also measured, meshctl only: h2 end to end (cluster `http2`, the backend's h2c port).
#
# gRPC unary calls (fortio load -grpc -ping against fortio's gRPC ping server):
#   direct; nginx pair with grpc_pass on both sides (h2 all the way, upstream keepalive);
#   meshctl pair with a `grpc` cluster (h2 between the sidecars and to the app).
#
# Reported: max rps / calls per second of each, the meshctl/nginx ratios, CPU per
# 1,000 rps per proxy at a fixed 1,000 rps (utime+stime from /proc), p50/p99 at that
# rate, and RSS. Everything started is stopped on exit.
#
# Two pacings at the fixed rate. fortio's default (and h2load --rps, each of its 16
# clients on its own timer) sends in step: every 16 ms all 16 connections call at the
# same instant, so the figure is mostly the time a proxy takes to work through 16
# calls at once (its CPU per call x 16; an nginx pair goes from ~0.65 ms p50 paced to
# ~3.3 ms in step on the 2-vCPU VM). "-uniform" (Istio's method) spreads the calls
# evenly; it is measured once per run for direct, nginx and meshctl.
#
# Usage: bench/pair_h2.sh [duration-seconds]   (default 10)
# Needs: nginx (with http_v2 and grpc modules), h2load, fortio (scripts/tools/fortio.sh
# builds it), python3 with meshctl installed (MESHCTL=... to override).
set -euo pipefail

DUR=${1:-10}
RATE_TOTAL=1000
CONNS=16
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
HERE=$(cd "$(dirname "$0")" && pwd)
FORTIO=${FORTIO:-$(bash "$HERE/../scripts/tools/fortio.sh")}
WORK=$(mktemp -d /tmp/meshctl-bench-h2.XXXXXX)
PIDS=()
. "$HERE/lib.sh"  # cleanup, free_port, nginx_conf, wait_ready and the measurements
need_tools nginx:nginx-light h2load:nghttp2-client curl:curl
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

BACKEND=$(free_port); BACKEND_H2=$(free_port); NGX_S=$(free_port); NGX_C=$(free_port)
GRPC=$(free_port); GRPC_HTTP=$(free_port); NGX_GS=$(free_port); NGX_GC=$(free_port)
MESH_IN=$(free_port); MESH_IN_G=$(free_port); MESH_OUT=$(free_port); MESH_OUT_G=$(free_port)
ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)

nginx_conf backend "server { listen 127.0.0.1:$BACKEND; listen 127.0.0.1:$BACKEND_H2 http2;
  location / { return 200 'hello world\n'; } }"
nginx_conf ngx_server "upstream b { server 127.0.0.1:$BACKEND; keepalive 64; }
  server { listen 127.0.0.1:$NGX_S; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx_conf ngx_client "upstream s { server 127.0.0.1:$NGX_S; keepalive 64; }
  server { listen 127.0.0.1:$NGX_C http2; location / { proxy_pass http://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx_conf ngx_gserver "upstream g { server 127.0.0.1:$GRPC; keepalive 64; }
  server { listen 127.0.0.1:$NGX_GS http2; location / { grpc_pass grpc://g; } }"
nginx_conf ngx_gclient "upstream gs { server 127.0.0.1:$NGX_GS; keepalive 64; }
  server { listen 127.0.0.1:$NGX_GC http2; location / { grpc_pass grpc://gs; } }"

start_nginx() { nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" & PIDS+=($!); echo $! >"$WORK/$1.pid"; }
for n in backend ngx_server ngx_client ngx_gserver ngx_gclient; do start_nginx $n; done

"$FORTIO" server -http-port "127.0.0.1:$GRPC_HTTP" -grpc-port "127.0.0.1:$GRPC" -redirect-port disabled \
  -tcp-port disabled -udp-port disabled -loglevel Warning >"$WORK/fortio-server.log" 2>&1 &
PIDS+=($!); GRPC_PID=$!

cat >"$WORK/in.yaml" <<EOF
version: bench
workload: {name: backend-0, service: backend}
listeners:
- {name: inbound, direction: inbound, address: 127.0.0.1, port: $MESH_IN, appAddress: 127.0.0.1, appPort: $BACKEND}
- {name: inbound-grpc, direction: inbound, address: 127.0.0.1, port: $MESH_IN_G, appAddress: 127.0.0.1, appPort: $GRPC}
EOF
vhost() { # name port domains
  cat <<EOF
    - name: $1.default.svc.cluster.local:$2
      domains: [$3]
      routes:
      - route:
        - destination: {host: $1.default.svc.cluster.local, port: {number: $2}}
EOF
}
cluster() { # name port protocol endpoint-port
  cat <<EOF
  "outbound|$2||$1.default.svc.cluster.local":
    service: $1.default.svc.cluster.local
    port: $2
    protocol: $3
    endpoints:
    - {address: 127.0.0.1, port: $4}
EOF
}
{
  cat <<EOF
version: bench
workload: {name: client-0, service: client}
listeners:
- {name: outbound, direction: outbound, address: 127.0.0.1, port: $MESH_OUT, routeTable: outbound}
- {name: outbound-grpc, direction: outbound, address: 127.0.0.1, port: $MESH_OUT_G, routeTable: grpc}
routeTables:
  outbound:
    virtualHosts:
EOF
  vhost backend 80 "backend, \"backend:80\", \"127.0.0.1:$MESH_OUT\""
  vhost backend-h2 80 "backend-h2, \"backend-h2:80\""
  echo "  grpc:"
  echo "    virtualHosts:"
  vhost ping 8079 "\"127.0.0.1:$MESH_OUT_G\""
  echo "clusters:"
  cluster backend 80 http "$MESH_IN"
  cluster backend-h2 80 http2 "$BACKEND_H2"
  cluster ping 8079 grpc "$MESH_IN_G"
} >"$WORK/out.yaml"
# backend-h2 goes from the outbound sidecar straight to nginx's h2c port: one sidecar hop,
# h2 on both legs (there is no h2c-speaking nginx pair to compare it with).

start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; MESH_IN_PID=$SIDECAR_PID
start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; MESH_OUT_PID=$SIDECAR_PID

wait_ready "http://127.0.0.1:$BACKEND/"
wait_ready "http://127.0.0.1:$NGX_S/"
wait_ready "http://127.0.0.1:$ADMIN_IN/ready"
wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
check() { # what command...
  local what=$1; shift
  "$@" >"$WORK/check.out" 2>&1 || { echo "$what broken:" >&2; cat "$WORK/check.out" "$WORK"/*.log >&2; exit 1; }
}
check "nginx h2 pair" curl -sf --http2-prior-knowledge "http://127.0.0.1:$NGX_C/" -H "host: backend"
check "meshctl h2 pair" curl -sf --http2-prior-knowledge "http://127.0.0.1:$MESH_OUT/" -H "host: backend"
check "meshctl h2 end to end" curl -sf --http2-prior-knowledge "http://127.0.0.1:$MESH_OUT/" -H "host: backend-h2"
for port in $GRPC $NGX_GC $MESH_OUT_G; do check "gRPC ping via :$port" "$FORTIO" load -grpc -ping -n 3 -qps 0 "127.0.0.1:$port"; done

NGX_S_PID=$(worker_of ngx_server); NGX_C_PID=$(worker_of ngx_client)
NGX_GS_PID=$(worker_of ngx_gserver); NGX_GC_PID=$(worker_of ngx_gclient); BACKEND_PID=$(worker_of backend)

h2max() { # url host → rps; every answer must be a 2xx
  local out
  out=$(h2load -c$CONNS -m10 -t1 -D "$DUR" -H ":authority: $2" "$1" 2>&1)
  if ! grep -q "status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx" <<<"$out"; then echo "h2load against $1 ($2) got errors:" >&2; echo "$out" >&2; return 1; fi
  awk '/^finished in/{print $4}' <<<"$out"
}
grpcmax() { # port → calls/s; every call must end SERVING
  "$FORTIO" load -grpc -ping -c $CONNS -qps 0 -t "${DUR}s" -json "$WORK/g.json" "127.0.0.1:$1" >/dev/null 2>&1
  "$PY" - "$WORK/g.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if set(r.get("RetCodes", {})) != {"SERVING"}:
    sys.exit(f"gRPC calls failed: {r.get('RetCodes')}")
print(round(r["ActualQPS"]))
EOF
}
grpcrate() { # port a_pid b_pid [fortio flags] → "p50_us p99_us cpuA_per1k cpuB_per1k ok_count"
  local t0a t0b t1a t1b
  t0a=$(cpu_ticks "$2"); t0b=$(cpu_ticks "$3")
  "$FORTIO" load -grpc -ping -c $CONNS -qps $RATE_TOTAL -t "${DUR}s" ${4:-} -json "$WORK/g.json" "127.0.0.1:$1" >/dev/null 2>&1
  t1a=$(cpu_ticks "$2"); t1b=$(cpu_ticks "$3")
  "$PY" - "$WORK/g.json" "$((t1a - t0a))" "$((t1b - t0b))" "$DUR" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
da, db, dur, hz = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
pct = {p["Percentile"]: p["Value"] for p in r["DurationHistogram"]["Percentiles"]}
n = r["DurationHistogram"]["Count"]
ok = r.get("RetCodes", {}).get("SERVING", 0)
rate = n / dur / 1000 if n else 1
print(round(pct[50] * 1e6), round(pct[99] * 1e6), f"{da / hz / dur / rate:.3f}", f"{db / hz / dur / rate:.3f}", ok)
EOF
}

echo "# HTTP/2 and gRPC: meshctl pair vs nginx pair — $(date -u +%FT%TZ), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# shared machine: other work may be running; only ratios within this run mean anything"
declare -A R L
for round in 1 2; do
  R[h2,nginx,$round]=$(h2max "http://127.0.0.1:$NGX_C/" backend)
  R[h2,meshctl,$round]=$(h2max "http://127.0.0.1:$MESH_OUT/" backend)
  R[h2e2e,meshctl,$round]=$(h2max "http://127.0.0.1:$MESH_OUT/" backend-h2)
  R[grpc,direct,$round]=$(grpcmax "$GRPC")
  R[grpc,nginx,$round]=$(grpcmax "$NGX_GC")
  R[grpc,meshctl,$round]=$(grpcmax "$MESH_OUT_G")
  echo "round $round max: h2 nginx=${R[h2,nginx,$round]} meshctl=${R[h2,meshctl,$round]} meshctl-h2-e2e(1 hop)=${R[h2e2e,meshctl,$round]}" \
       " grpc direct=${R[grpc,direct,$round]} nginx=${R[grpc,nginx,$round]} meshctl=${R[grpc,meshctl,$round]}" >&2
  L[h2,nginx,$round]=$(latency "http://127.0.0.1:$NGX_C/" backend "$NGX_C_PID" "$NGX_S_PID" -m1)
  L[h2,meshctl,$round]=$(latency "http://127.0.0.1:$MESH_OUT/" backend "$MESH_OUT_PID" "$MESH_IN_PID" -m1)
  L[grpc,nginx,$round]=$(grpcrate "$NGX_GC" "$NGX_GC_PID" "$NGX_GS_PID")
  L[grpc,meshctl,$round]=$(grpcrate "$MESH_OUT_G" "$MESH_OUT_PID" "$MESH_IN_PID")
  echo "round $round at 1,000 rps (p50_us p99_us cpuA cpuB ok): h2 nginx=[${L[h2,nginx,$round]}] meshctl=[${L[h2,meshctl,$round]}]" \
       " grpc nginx=[${L[grpc,nginx,$round]}] meshctl=[${L[grpc,meshctl,$round]}]" >&2
done
L[grpc,direct,1]=$(grpcrate "$GRPC" "$GRPC_PID" "$GRPC_PID")
U_DIRECT=$(grpcrate "$GRPC" "$GRPC_PID" "$GRPC_PID" -uniform)
U_NGINX=$(grpcrate "$NGX_GC" "$NGX_GC_PID" "$NGX_GS_PID" -uniform)
U_MESH=$(grpcrate "$MESH_OUT_G" "$MESH_OUT_PID" "$MESH_IN_PID" -uniform)
echo "gRPC at 1,000 calls/s, -uniform (p50_us p99_us cpuA cpuB ok): direct [$U_DIRECT] nginx [$U_NGINX] meshctl [$U_MESH]" >&2
# Istio's method over h2 (fortio -h2: prior-knowledge h2c, 1,000 qps, 16 conns, 1 KB, uniform)
F_DIRECT=$(fortio_lat "http://127.0.0.1:$BACKEND_H2/" backend "$BACKEND_PID" "$BACKEND_PID" -h2)
F_NGINX=$(fortio_lat "http://127.0.0.1:$NGX_C/" backend "$NGX_C_PID" "$NGX_S_PID" -h2)
F_MESH=$(fortio_lat "http://127.0.0.1:$MESH_OUT/" backend "$MESH_OUT_PID" "$MESH_IN_PID" -h2)
echo "fortio -h2 (p50 p90 p99 ms, vCPU/1k rps A B, ok): direct $F_DIRECT | nginx $F_NGINX | meshctl $F_MESH" >&2

"$PY" - <<EOF
R = {$(for k in "${!R[@]}"; do printf '"%s": %s, ' "$k" "${R[$k]:-0}"; done)}
L = {$(for k in "${!L[@]}"; do printf '"%s": [%s], ' "$k" "$(echo "${L[$k]}" | tr ' ' ',')"; done)}
rss = {"nginx h2 client": $(rss_kb "$NGX_C_PID"), "nginx grpc client": $(rss_kb "$NGX_GC_PID"),
       "meshctl outbound": $(rss_kb "$MESH_OUT_PID"), "meshctl inbound": $(rss_kb "$MESH_IN_PID")}
best = lambda kind, who: max(R[f"{kind},{who},1"], R[f"{kind},{who},2"])
low = lambda kind, who, i: min(L[f"{kind},{who},{r}"][i] for r in (1, 2) if f"{kind},{who},{r}" in L)  # the better round
print()
print(f"{'':<34}{'max rps':>9}{'p50 µs':>9}{'p99 µs':>9}{'vCPU/1k rps A':>15}{'B':>7}")
for kind, who, label in (("h2", "nginx", "h2 -m10, nginx pair"), ("h2", "meshctl", "h2 -m10, meshctl pair"),
                         ("h2e2e", "meshctl", "h2 end to end, one meshctl hop"),
                         ("grpc", "direct", "gRPC unary, direct"), ("grpc", "nginx", "gRPC unary, nginx pair"),
                         ("grpc", "meshctl", "gRPC unary, meshctl pair")):
    row = f"{label:<34}{best(kind, who):>9.0f}"
    if f"{kind},{who},1" in L:
        row += f"{low(kind, who, 0):>9.0f}{low(kind, who, 1):>9.0f}"
        if who != "direct":
            row += f"{low(kind, who, 2):>15.3f}{low(kind, who, 3):>7.3f}"
    print(row)
for k, v in rss.items():
    print(f"RSS {k:<30}{v / 1024:>7.1f} MB")
print()
print(f"h2 meshctl/nginx max rps:   {best('h2', 'meshctl') / best('h2', 'nginx'):.2f}")
print(f"gRPC meshctl/nginx calls/s: {best('grpc', 'meshctl') / best('grpc', 'nginx'):.2f}")
print(f"gRPC meshctl pair/direct:   {best('grpc', 'meshctl') / best('grpc', 'direct'):.2f}")

import json
fort = {k: list(map(float, v.split())) for k, v in {"direct": "$F_DIRECT", "nginx": "$F_NGINX", "meshctl": "$F_MESH"}.items()}
add = {k: [round(fort[k][i] - fort["direct"][i], 3) for i in range(3)] for k in ("nginx", "meshctl")}
print()
print("Istio's method over h2 (fortio -h2 -qps 1000 -c 16 -payload-size 1024 -uniform): added over direct, ms")
for k in ("nginx", "meshctl"):
    print(f"{k:<10} p50 +{add[k][0]:.3f} p90 +{add[k][1]:.3f} p99 +{add[k][2]:.3f}   vCPU per 1k rps: A {fort[k][3]:.3f} B {fort[k][4]:.3f}")
g = L.get("grpc,meshctl,1")
uni = {k: list(map(float, v.split())) for k, v in {"direct": "$U_DIRECT", "nginx": "$U_NGINX", "meshctl": "$U_MESH"}.items()}
print()
print("gRPC unary at 1,000 calls/s, calls spread evenly (fortio -uniform): p50 / p99 µs, vCPU per 1k rps A B")
for k in ("direct", "nginx", "meshctl"):
    row = f"{k:<10}{uni[k][0]:>8.0f}{uni[k][1]:>8.0f}"
    if k != "direct":
        row += f"{uni[k][2]:>10.3f}{uni[k][3]:>7.3f}"
    print(row)
print(json.dumps({
    "bench": "pair_h2", "load": "$LOAD0",
    "ratio_h2_max_rps": round(best("h2", "meshctl") / best("h2", "nginx"), 3),
    "ratio_grpc_calls": round(best("grpc", "meshctl") / best("grpc", "nginx"), 3),
    "max": {"h2_nginx": best("h2", "nginx"), "h2_meshctl": best("h2", "meshctl"), "grpc_direct": best("grpc", "direct"),
            "grpc_nginx": best("grpc", "nginx"), "grpc_meshctl": best("grpc", "meshctl")},
    "grpc_1000_meshctl_p50_p99_us": [low("grpc", "meshctl", 0), low("grpc", "meshctl", 1)],
    "grpc_1000_held": bool(g) and max(L[f"grpc,meshctl,{r}"][4] for r in (1, 2)) >= 0.98 * $RATE_TOTAL * $DUR,
    "grpc_1000_uniform_p50_p99_us": {k: uni[k][:2] for k in ("direct", "nginx", "meshctl")},
    "fortio_h2_added_ms_p50_p90_p99": add,
    "vcpu_per_1k_rps_client_server": {k: fort[k][3:5] for k in ("nginx", "meshctl")},
    "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
}))
EOF
