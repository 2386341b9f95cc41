# Shared by pair.sh and pair_mtls.sh (sourced): process cleanup, ports, nginx
# configs and the measurements. Expects WORK, PIDS, PY, CONNS, DUR and RATE_TOTAL.

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

nginx_conf() { # name body
  mkdir -p "$WORK/$1/logs"
  cat >"$WORK/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $2
}
EOF
}

nginx_pair_configs() { # from BACKEND, NGX_S, NGX_C → $WORK/{backend,ngx_server,ngx_client}: the backend
  # (12 bytes) and the nginx pair in front of it, keep-alive on both hops
  nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
  nginx_conf ngx_server "upstream b { server 127.0.0.1:$BACKEND; keepalive 64; }
    server { listen 127.0.0.1:$NGX_S; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  nginx_conf ngx_client "upstream s { server 127.0.0.1:$NGX_S; keepalive 64; }
    server { listen 127.0.0.1:$NGX_C; location / { proxy_pass http://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}

start_sidecar() { # log-name config admin-port → pid in SIDECAR_PID (and in PIDS, for cleanup)
  # (from $WORK: a sidecar started from a checkout would import that checkout's meshctl/,
  # not the build $MESHCTL belongs to)
  (cd "$WORK" && exec "$MESHCTL" proxy run --config "$2" --admin-port "$3" --log-level warning 2>"$WORK/$1.log") &
  PIDS+=($!); SIDECAR_PID=$!
}

write_pair_configs() { # [inbound listener extras] [endpoint extras] → $WORK/in.yaml and $WORK/out.yaml
  # from MESH_IN, MESH_OUT, BACKEND: an inbound sidecar in front of the backend, an outbound one routing "backend" to it
cat >"$WORK/in.yaml" <<EOF
version: bench
workload: {name: backend-0, service: backend}
listeners:
- {name: inbound, direction: inbound, address: 127.0.0.1, port: $MESH_IN, appAddress: 127.0.0.1, appPort: $BACKEND${1:-}}
EOF
cat >"$WORK/out.yaml" <<EOF
version: bench
workload: {name: client-0, service: client}
listeners:
- {name: outbound, direction: outbound, address: 127.0.0.1, port: $MESH_OUT, routeTable: outbound}
routeTables:
  outbound:
    virtualHosts:
    - name: backend.default.svc.cluster.local:80
      domains: [backend, "backend:80", "127.0.0.1:$MESH_OUT"]
      routes:
      - route:
        - destination: {host: backend.default.svc.cluster.local, port: {number: 80}}
clusters:
  "outbound|80||backend.default.svc.cluster.local":
    service: backend.default.svc.cluster.local
    port: 80
    endpoints:
    - {address: 127.0.0.1, port: $MESH_IN${2:-}}
EOF
}

write_grpc_pair_configs() { # from MESH_IN, MESH_OUT, GRPC → $WORK/in.yaml and $WORK/out.yaml: an inbound
  # sidecar in front of fortio's gRPC ping server, an outbound one with a `grpc` cluster to it (HTTP/2 on every leg)
cat >"$WORK/in.yaml" <<EOF
version: bench
workload: {name: backend-0, service: backend}
listeners:
- {name: inbound-grpc, direction: inbound, address: 127.0.0.1, port: $MESH_IN, appAddress: 127.0.0.1, appPort: $GRPC}
EOF
cat >"$WORK/out.yaml" <<EOF
version: bench
workload: {name: client-0, service: client}
listeners:
- {name: outbound-grpc, direction: outbound, address: 127.0.0.1, port: $MESH_OUT, routeTable: grpc}
routeTables:
  grpc:
    virtualHosts:
    - name: ping.default.svc.cluster.local:8079
      domains: ["127.0.0.1:$MESH_OUT"]
      routes:
      - route:
        - destination: {host: ping.default.svc.cluster.local, port: {number: 8079}}
clusters:
  "outbound|8079||ping.default.svc.cluster.local":
    service: ping.default.svc.cluster.local
    port: 8079
    protocol: grpc
    endpoints:
    - {address: 127.0.0.1, port: $MESH_IN}
EOF
}

wait_ready() { for _ in $(seq 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $1" >&2; tail -n5 "$WORK"/*.log >&2; exit 1; }

# nginx does its work in the worker process (child of the master we started)
worker_of() { pgrep -P "$(cat "$WORK/$1.pid")" | head -1; }

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
user_sys_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

cpu_split() { # pid before-"user sys" after-"user sys" requests → "user_us kernel_us" per request
  "$PY" -c 'import sys; hz, n = int(sys.argv[1]), float(sys.argv[2]); u0, s0, u1, s1 = map(int, sys.argv[3:])
print(f"{(u1 - u0) / hz / n * 1e6:.0f} {(s1 - s0) / hz / n * 1e6:.0f}")' "$(getconf CLK_TCK)" "$4" $2 $3
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

maxrps() { # url host → rps. Every answer must be a 2xx: a fast stream of 400s is no result.
  # ("Host:" exactly: wrk sends its own Host unless -H names it with that case, and two Host
  # headers are a 400 at nginx and meshctl alike.)
  local out
  out=$(wrk -t1 -c$CONNS -d"${DUR}s" -H "Host: $2" "$1")
  if grep -q "Non-2xx" <<<"$out"; then echo "wrk against $1 (Host: $2) got errors:" >&2; echo "$out" >&2; return 1; fi
  awk '/Requests\/sec/{print $2}' <<<"$out"
}

latency() { # url host a_pid b_pid [protocol flag, default --h1] → "p50_us p99_us cpuA_per1k cpuB_per1k ok_count"
  local log="$WORK/lat.$RANDOM.log" t0a t0b t1a t1b
  t0a=$(cpu_ticks "$3"); t0b=$(cpu_ticks "$4")
  h2load "${5:---h1}" -c$CONNS -t1 --rps "$(awk -v r=$RATE_TOTAL -v c=$CONNS 'BEGIN{print r/c}')" -D "$DUR" \
    -H ":authority: $2" --log-file="$log" "$1" >/dev/null 2>&1 || true
  t1a=$(cpu_ticks "$3"); t1b=$(cpu_ticks "$4")
  "$PY" - "$log" "$((t1a - t0a))" "$((t1b - t0b))" "$DUR" "$(getconf CLK_TCK)" <<'EOF'
import sys
log, da, db, dur, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
lat = sorted(int(l.split("\t")[2]) for l in open(log) if l.strip() and l.split("\t")[1] == "200")
n = len(lat)
p = lambda q: lat[min(n - 1, int(q * n))] if n else 0
rate = n / dur / 1000 if n else 1
print(p(0.50), p(0.99), f"{da / hz / dur / rate:.3f}", f"{db / hz / dur / rate:.3f}", n)
EOF
}

# ---------------------------------------------------------------- Istio's method (fortio)
FORTIO=${FORTIO:-$(command -v fortio || echo "$HOME/.cache/meshctl-tools/bin/fortio")}
FORTIO_DUR=${FORTIO_DUR:-${DUR:-10}}

need_tools() { # tool:apt-package ... → installs what is missing (as root), else says what to install
  local need=() t
  for t in "$@"; do command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}"); done
  ((${#need[@]})) || return 0
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing tools: ${need[*]} (install them with apt-get)" >&2; exit 1
  fi
}

need_fortio() {
  [[ -x $FORTIO ]] && return 0
  bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/tools/fortio.sh" >/dev/null
  FORTIO="$HOME/.cache/meshctl-tools/bin/fortio"
}

fortio_lat() { # url host a_pid b_pid [extra fortio flags] → "p50_ms p90_ms p99_ms cpuA_per1k cpuB_per1k ok"
  # Istio's own benchmark method: 1,000 qps over 16 connections, 1 KB request bodies,
  # uniform spacing, no catch-up, fine histogram resolution; vCPU per 1,000 rps per proxy
  local json="$WORK/fortio.$RANDOM.json" t0a t0b t1a t1b
  t0a=$(cpu_ticks "$3"); t0b=$(cpu_ticks "$4")
  "$FORTIO" load -qps 1000 -c 16 -payload-size 1024 -uniform -nocatchup -r 0.00001 -t "${FORTIO_DUR}s" \
    -p "50,90,99" -H "Host: $2" ${5:-} -json "$json" "$1" >"$WORK/fortio.out" 2>&1 || true
  t1a=$(cpu_ticks "$3"); t1b=$(cpu_ticks "$4")
  "$PY" - "$json" "$((t1a - t0a))" "$((t1b - t0b))" "$(getconf CLK_TCK)" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("0 0 0 0 0 0"); sys.exit()
da, db, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = d["DurationHistogram"]
pct = {round(p["Percentile"]): p["Value"] * 1000 for p in h["Percentiles"]}
dur = d["ActualDuration"] / 1e9
ok = d.get("RetCodes", {}).get("200", 0)
rate = h["Count"] / dur / 1000 if h["Count"] else 1
print(f"{pct[50]:.3f} {pct[90]:.3f} {pct[99]:.3f} {da / hz / dur / rate:.3f} {db / hz / dur / rate:.3f} {ok}")
PYEOF
}
