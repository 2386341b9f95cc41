#!/usr/bin/env bash
# Resident memory of meshctl sidecars, plain and with mTLS, after some load. Quick (~30 s).
#
#   bench/rss.sh [requests]          (default 5000 per pair; run it under flock /tmp/bench.lock)
#
# 1. "config": the pairs of bench/pair.sh and pair_mtls.sh (`meshctl proxy run --config`,
#    nginx backend returning 12 bytes): a plain pair, and a pair with mutual TLS whose
#    certificates come from a real `meshctl citadel serve` (one-time tokens, as `up` does).
# 2. "up": `meshctl up -d` on a two-service mesh (tests/e2e/hello_app.py as both apps):
#    sidecars as `up` starts them (Pilot long-poll, Citadel certificate, mTLS between them).
#
# Load through each client-side sidecar: REQUESTS keep-alive requests over 16 connections
# (h2load --h1), then 5 × 40 short connections (curl, one request each) (connection churn).
# Reported per sidecar: VmRSS idle (ready, before load), VmRSS after load, VmHWM (peak), and
# PSS after load (smaps_rollup: pages shared with the other sidecars, such as libpython's and
# cryptography's code, counted in shares; a fairer cost per sidecar when many run).
# Last line: one JSON object ({"bench": "rss", ...}); MB = 1024 kB.
# MESHCTL=/path/to/meshctl and PY=/path/to/python override the binaries.
# SMAPS_DIR=dir: also keep each sidecar's /proc/PID/smaps, idle and after load
# (dir/<sidecar>.idle.smaps, dir/<sidecar>.after.smaps), for bench/smaps_diff.py.
set -euo pipefail

REQUESTS=${1:-5000}
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/meshctl-bench-rss.XXXXXX)
PIDS=()
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"  # cleanup, free_port, nginx_conf, start_sidecar, write_pair_configs, wait_ready
UP_DIR=""
rss_cleanup() {
  [ -n "$UP_DIR" ] && (cd "$UP_DIR" && env -u HTTP_PROXY -u http_proxy "$MESHCTL" down >/dev/null 2>&1 || true)
  cleanup
}
trap rss_cleanup EXIT
need_tools nginx:nginx-light h2load:nghttp2-client curl:curl

mem() { # pid → "rss_kb hwm_kb pss_kb" (PSS: shared pages, e.g. of libraries every sidecar maps, divided among them)
  echo "$(awk '/^VmRSS:/{r=$2} /^VmHWM:/{h=$2} END{print r+0, h+0}' "/proc/$1/status") $(awk '/^Pss:/{print $2}' "/proc/$1/smaps_rollup")"
}

load() { # url host
  h2load --h1 -n "$REQUESTS" -c 16 -t 1 -H ":authority: $2" "$1" >"$WORK/h2load.out" 2>&1
  grep -q "status codes: $REQUESTS 2xx" "$WORK/h2load.out" || { echo "load through $1 failed:" >&2; cat "$WORK/h2load.out" >&2; exit 1; }
  # (a config's headers apply to every URL in it, and repeat if written per URL: once, here)
  { printf 'header = "Host: %s"\nheader = "Connection: close"\n' "$2"
    for _ in $(seq 40); do printf 'url = "%s"\noutput = "/dev/null"\n' "$1"; done; } >"$WORK/curl.cfg"
  local curls=() _i
  for _i in 1 2 3 4 5; do curl -s --noproxy '*' -K "$WORK/curl.cfg" & curls+=($!); done
  wait "${curls[@]}"
}

SMAPS_DIR=${SMAPS_DIR:-}
[ -z "$SMAPS_DIR" ] || mkdir -p "$SMAPS_DIR"
keep_smaps() { [ -z "$SMAPS_DIR" ] || cat "/proc/$2/smaps" >"$SMAPS_DIR/$1.$3.smaps"; }  # sidecar pid idle|after
declare -A IDLE AFTER
measure_idle() { for k in "$@"; do IDLE[$k]=$(mem "${PID[$k]}"); keep_smaps "$k" "${PID[$k]}" idle; done; }
measure_after() { sleep 1; for k in "$@"; do AFTER[$k]=$(mem "${PID[$k]}"); keep_smaps "$k" "${PID[$k]}" after; done; }
declare -A PID

# ---------------------------------------------------------------- 1. the pair scripts' sidecars
BACKEND=$(free_port); CITADEL=$(free_port)
MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
PLAIN_IN=$(free_port); PLAIN_OUT=$(free_port); PADMIN_IN=$(free_port); PADMIN_OUT=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)

SD="$WORK/state"
"$MESHCTL" citadel init --state-dir "$SD" >/dev/null
"$MESHCTL" citadel serve --port "$CITADEL" --state-dir "$SD" 2>"$WORK/citadel.log" & PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$CITADEL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

write_pair_configs ", mtlsMode: STRICT" ', identity: "spiffe://cluster.local/ns/default/sa/backend"'
MESHCTL_CITADEL_URL="http://127.0.0.1:$CITADEL" MESHCTL_CITADEL_TOKEN="$("$MESHCTL" citadel token default/backend --state-dir "$SD")" \
  start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; PID[mtls_server]=$SIDECAR_PID
MESHCTL_CITADEL_URL="http://127.0.0.1:$CITADEL" MESHCTL_CITADEL_TOKEN="$("$MESHCTL" citadel token default/client --state-dir "$SD")" \
  start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; PID[mtls_client]=$SIDECAR_PID
sed -e "s/port: $MESH_IN,/port: $PLAIN_IN,/" -e "s/, mtlsMode: STRICT//" "$WORK/in.yaml" >"$WORK/plain-in.yaml"
sed -e "s/port: $MESH_OUT,/port: $PLAIN_OUT,/" -e "s/127.0.0.1:$MESH_OUT/127.0.0.1:$PLAIN_OUT/" \
    -e "s/port: $MESH_IN, identity: .*}/port: $PLAIN_IN}/" "$WORK/out.yaml" >"$WORK/plain-out.yaml"
start_sidecar plain-in "$WORK/plain-in.yaml" "$PADMIN_IN"; PID[plain_server]=$SIDECAR_PID
start_sidecar plain-out "$WORK/plain-out.yaml" "$PADMIN_OUT"; PID[plain_client]=$SIDECAR_PID
for p in "$BACKEND/" "$ADMIN_IN/ready" "$ADMIN_OUT/ready" "$PADMIN_IN/ready" "$PADMIN_OUT/ready"; do wait_ready "http://127.0.0.1:$p"; done
curl -sf "http://127.0.0.1:$MESH_OUT/" -H "host: backend" | grep -q "hello world" || { echo "mTLS pair broken" >&2; cat "$WORK"/*.log >&2; exit 1; }
grep -q 'connection_security_policy="mutual_tls"' <(curl -s "http://127.0.0.1:$ADMIN_IN/stats") \
  || { echo "the inbound sidecar did not see mutual TLS" >&2; exit 1; }
sleep 1.5  # past the sidecars' post-start gc.freeze
measure_idle plain_client plain_server mtls_client mtls_server
load "http://127.0.0.1:$PLAIN_OUT/" backend
load "http://127.0.0.1:$MESH_OUT/" backend
measure_after plain_client plain_server mtls_client mtls_server

# ---------------------------------------------------------------- 2. sidecars as `meshctl up` runs them
UP_DIR="$WORK/up"; mkdir -p "$UP_DIR"
cp "$HERE/../tests/e2e/hello_app.py" "$UP_DIR/"
BASE=$(( (RANDOM % 90) * 100 + 23000 ))  # a port block below the ephemeral range, like tests/e2e/helpers.mesh_ports
cat >"$UP_DIR/mesh.yaml" <<EOF
settings: {registry: embedded, trustDomain: cluster.local, portRange: $BASE-$((BASE + 98))}
services:
- {name: backend, port: 9080, versions: [{name: v1, command: [python3, hello_app.py]}]}
- {name: client, port: 9080, versions: [{name: v1, command: [python3, hello_app.py]}]}
EOF
(cd "$UP_DIR" && env -u HTTP_PROXY -u http_proxy "$MESHCTL" up -d -f mesh.yaml >"$WORK/up.log" 2>&1) \
  || { echo "meshctl up failed:" >&2; cat "$WORK/up.log" >&2; exit 1; }
(cd "$UP_DIR" && "$MESHCTL" status --json) >"$WORK/status.json"
read -r PID[up_client] PID[up_server] UP_OUT UP_ADMIN_IN < <("$PY" - "$WORK/status.json" <<'EOF'
import json, sys
w = {x["service"]: x for x in json.load(open(sys.argv[1]))["workloads"]}
print(w["client"]["proxy_pid"], w["backend"]["proxy_pid"], w["client"]["outbound_address"], w["backend"]["admin_address"])
EOF
)
curl -sf --noproxy '*' "http://$UP_OUT/" -H "host: backend:9080" | grep -q version || { echo "up mesh broken" >&2; exit 1; }
grep -q 'connection_security_policy="mutual_tls"' <(curl -s --noproxy '*' "http://$UP_ADMIN_IN/stats") \
  || { echo "up: the backend's sidecar did not see mutual TLS" >&2; exit 1; }
sleep 1.5
measure_idle up_client up_server
load "http://$UP_OUT/" backend:9080
measure_after up_client up_server

# ---------------------------------------------------------------- report
ROWS=""
for k in plain_client plain_server mtls_client mtls_server up_client up_server; do ROWS+="$k ${IDLE[$k]} ${AFTER[$k]}"$'\n'; done
"$PY" - "$REQUESTS" <<EOF
import json, sys
rows = {}
for line in """$ROWS""".strip().splitlines():
    k, i_rss, _i_hwm, _i_pss, a_rss, a_hwm, a_pss = line.split()
    rows[k] = {"idle": round(int(i_rss) / 1024, 1), "after": round(int(a_rss) / 1024, 1), "hwm": round(int(a_hwm) / 1024, 1),
               "pss_after": round(int(a_pss) / 1024, 1)}
print(f"# sidecar RSS, MB (1024 kB) — {sys.argv[1]} keep-alive requests + 200 short connections per pair")
print(f"{'sidecar':<14}{'idle':>8}{'after':>8}{'peak':>8}{'PSS after':>11}")
for k, v in rows.items():
    print(f"{k:<14}{v['idle']:>8}{v['after']:>8}{v['hwm']:>8}{v['pss_after']:>11}")
worst = lambda *ks: max(rows[k]["after"] for k in ks)
summary = {"plain": worst("plain_client", "plain_server"), "mtls": worst("mtls_client", "mtls_server"),
           "up": worst("up_client", "up_server")}
print(f"worst after load: plain {summary['plain']} MB (target <= 35), mTLS {summary['mtls']} MB (target <= 40), "
      f"under meshctl up {summary['up']} MB")
print(json.dumps({"bench": "rss", "load": "$(cut -d' ' -f1-3 /proc/loadavg)", "requests": int(sys.argv[1]),
                  "rss_mb_after_load": summary, "sidecars": rows}))
EOF
