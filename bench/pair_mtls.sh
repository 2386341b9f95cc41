#!/usr/bin/env bash
# meshctl pair with mutual TLS between the sidecars vs an nginx pair with mutual TLS
# between its two proxies; same backend, same machine, interleaved (A B A B).
#
#   client ──▶ [client-side proxy] ══mTLS══▶ [server-side proxy] ──▶ backend (nginx, 12-byte body)
#
# meshctl: two `meshctl proxy run --config` sidecars, each with its own EC P-256 key and
#   SPIFFE certificate from a real `meshctl citadel serve` (one-time tokens by environment,
#   as `meshctl up` does it); the inbound listener is STRICT, the client side checks the
#   server's SPIFFE ID (auto mTLS to an endpoint with an identity).
# nginx: the client-side nginx proxies to https:// the server-side nginx with a client
#   certificate (proxy_ssl_certificate, proxy_ssl_verify on, upstream keepalive and TLS
#   session reuse); the server requires and verifies it (ssl_verify_client on).
#   Certificates for nginx: openssl, EC P-256, one CA.
#
# Reported: max rps (wrk -t1 -c16), p50/p99 at a fixed 1,000 rps (h2load --h1 --rps, from
# the per-request log), CPU per 1,000 rps per proxy, RSS; the meshctl/nginx rps ratio and
# the p99 each pair adds over the backend direct.
#
# Usage: bench/pair_mtls.sh [duration-seconds]   (default 10)
set -euo pipefail

DUR=${1:-10}
RATE_TOTAL=1000
CONNS=16
MESHCTL=${MESHCTL:-$(command -v meshctl || echo /tmp/venv/bin/meshctl)}
PY=${PY:-$(dirname "$MESHCTL")/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/meshctl-bench-mtls.XXXXXX)
PIDS=()
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"  # cleanup, free_port, nginx_conf, wait_ready and the measurements
need_tools nginx:nginx-light wrk:wrk h2load:nghttp2-client curl:curl openssl:openssl
need_fortio
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)



BACKEND=$(free_port); NGX_S=$(free_port); NGX_C=$(free_port); CITADEL=$(free_port)
MESH_IN=$(free_port); MESH_OUT=$(free_port); ADMIN_IN=$(free_port); ADMIN_OUT=$(free_port)
PLAIN_IN=$(free_port); PLAIN_OUT=$(free_port); PADMIN_IN=$(free_port); PADMIN_OUT=$(free_port)

# ---------------------------------------------------------------- nginx certificates (openssl)
P="$WORK/pki"; mkdir -p "$P"
openssl ecparam -name prime256v1 -genkey -noout -out "$P/ca.key" 2>/dev/null
openssl req -x509 -new -key "$P/ca.key" -subj "/CN=bench-ca" -days 2 -out "$P/ca.pem" 2>/dev/null
for who in server client; do
  openssl ecparam -name prime256v1 -genkey -noout -out "$P/$who.key" 2>/dev/null
  openssl req -new -key "$P/$who.key" -subj "/CN=$who" -out "$P/$who.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\n' "$who" >"$P/$who.ext"
  openssl x509 -req -in "$P/$who.csr" -CA "$P/ca.pem" -CAkey "$P/ca.key" -CAcreateserial -days 2 \
    -extfile "$P/$who.ext" -out "$P/$who.pem" 2>/dev/null
done


nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'hello world\n'; } }"
nginx_conf ngx_server "upstream b { server 127.0.0.1:$BACKEND; keepalive 64; }
  server { listen 127.0.0.1:$NGX_S ssl; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $P/server.pem; ssl_certificate_key $P/server.key;
    ssl_client_certificate $P/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx_conf ngx_client "upstream s { server 127.0.0.1:$NGX_S; keepalive 64; }
  server { listen 127.0.0.1:$NGX_C; location / { proxy_pass https://s; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_ssl_certificate $P/client.pem; proxy_ssl_certificate_key $P/client.key;
    proxy_ssl_trusted_certificate $P/ca.pem; proxy_ssl_verify on; proxy_ssl_name server; proxy_ssl_session_reuse on; } }"

start_nginx() { nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" & PIDS+=($!); echo $! >"$WORK/$1.pid"; }
start_nginx backend; start_nginx ngx_server; start_nginx ngx_client

# ---------------------------------------------------------------- Citadel and the meshctl pair
SD="$WORK/state"
"$MESHCTL" citadel init --state-dir "$SD" >/dev/null
"$MESHCTL" citadel serve --port "$CITADEL" --state-dir "$SD" 2>"$WORK/citadel.log" &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$CITADEL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

write_pair_configs ", mtlsMode: STRICT" ', identity: "spiffe://cluster.local/ns/default/sa/backend"'
TOKEN_IN=$("$MESHCTL" citadel token default/backend --state-dir "$SD")
TOKEN_OUT=$("$MESHCTL" citadel token default/client --state-dir "$SD")
MESHCTL_CITADEL_URL="http://127.0.0.1:$CITADEL" MESHCTL_CITADEL_TOKEN="$TOKEN_IN" \
  start_sidecar in "$WORK/in.yaml" "$ADMIN_IN"; MESH_IN_PID=$SIDECAR_PID
MESHCTL_CITADEL_URL="http://127.0.0.1:$CITADEL" MESHCTL_CITADEL_TOKEN="$TOKEN_OUT" \
  start_sidecar out "$WORK/out.yaml" "$ADMIN_OUT"; MESH_OUT_PID=$SIDECAR_PID

# the same meshctl pair without identities (plaintext between the sidecars), for the cost of mTLS
sed -e "s/port: $MESH_IN,/port: $PLAIN_IN,/" -e "s/, mtlsMode: STRICT//" "$WORK/in.yaml" >"$WORK/plain-in.yaml"
sed -e "s/port: $MESH_OUT,/port: $PLAIN_OUT,/" -e "s/127.0.0.1:$MESH_OUT/127.0.0.1:$PLAIN_OUT/" \
    -e "s/port: $MESH_IN, identity: .*}/port: $PLAIN_IN}/" "$WORK/out.yaml" >"$WORK/plain-out.yaml"
start_sidecar plain-in "$WORK/plain-in.yaml" "$PADMIN_IN"; PLAIN_IN_PID=$SIDECAR_PID
start_sidecar plain-out "$WORK/plain-out.yaml" "$PADMIN_OUT"; PLAIN_OUT_PID=$SIDECAR_PID

wait_ready "http://127.0.0.1:$BACKEND/"
wait_ready "http://127.0.0.1:$NGX_C/"
wait_ready "http://127.0.0.1:$ADMIN_IN/ready"
wait_ready "http://127.0.0.1:$ADMIN_OUT/ready"
wait_ready "http://127.0.0.1:$PADMIN_IN/ready"
wait_ready "http://127.0.0.1:$PADMIN_OUT/ready"
curl -sf "http://127.0.0.1:$PLAIN_OUT/" -H "host: backend" | grep -q "hello world" || { echo "plain meshctl pair broken" >&2; cat "$WORK"/*.log >&2; exit 1; }
curl -sf "http://127.0.0.1:$MESH_OUT/" -H "host: backend" | grep -q "hello world" || { echo "meshctl mTLS pair broken" >&2; cat "$WORK"/*.log >&2; exit 1; }
# prove the legs are what they claim: plaintext to either server-side proxy is refused
if curl -sf -m 3 "http://127.0.0.1:$MESH_IN/" >/dev/null 2>&1; then echo "meshctl inbound accepted plaintext" >&2; exit 1; fi
if curl -sf -m 3 "http://127.0.0.1:$NGX_S/" >/dev/null 2>&1; then echo "nginx server accepted plaintext" >&2; exit 1; fi
grep -q "connection_security_policy=\"mutual_tls\"" <(curl -s "http://127.0.0.1:$ADMIN_IN/stats") \
  || { echo "meshctl inbound did not see mutual TLS" >&2; exit 1; }


# nginx does its work in the worker process (child of the master we started)
NGX_S_PID=$(worker_of ngx_server); NGX_C_PID=$(worker_of ngx_client); BACKEND_PID=$(worker_of backend)

echo "# meshctl mTLS pair vs nginx mTLS pair — $(date -u +%FT%TZ), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# shared machine: other work may be running; only ratios within this run mean anything"
declare -A RPS LAT
for round in 1 2; do
  for pair in nginx meshctl plain; do
    if [ $pair = nginx ]; then url="http://127.0.0.1:$NGX_C/"; a=$NGX_C_PID; b=$NGX_S_PID
    elif [ $pair = plain ]; then url="http://127.0.0.1:$PLAIN_OUT/"; a=$PLAIN_OUT_PID; b=$PLAIN_IN_PID
    else url="http://127.0.0.1:$MESH_OUT/"; a=$MESH_OUT_PID; b=$MESH_IN_PID; fi
    r=$(maxrps "$url" backend); RPS[$pair,$round]=$r
    l=$(latency "$url" backend "$a" "$b"); LAT[$pair,$round]=$l
    echo "round $round $pair: max_rps=$r  fixed-1000rps: p50_us p99_us cpuA cpuB ok = $l" >&2
  done
done
LAT[direct,1]=$(latency "http://127.0.0.1:$BACKEND/" backend "$BACKEND_PID" "$BACKEND_PID")
F_DIRECT=$(fortio_lat "http://127.0.0.1:$BACKEND/" backend "$BACKEND_PID" "$BACKEND_PID")
F_NGINX=$(fortio_lat "http://127.0.0.1:$NGX_C/" backend "$NGX_C_PID" "$NGX_S_PID")
F_MESH=$(fortio_lat "http://127.0.0.1:$MESH_OUT/" backend "$MESH_OUT_PID" "$MESH_IN_PID")
F_PLAIN=$(fortio_lat "http://127.0.0.1:$PLAIN_OUT/" backend "$PLAIN_OUT_PID" "$PLAIN_IN_PID")
echo "fortio (p50 p90 p99 ms, vCPU/1k rps A B, ok): direct $F_DIRECT | nginx $F_NGINX | meshctl $F_MESH | plain $F_PLAIN" >&2

"$PY" - <<EOF
rps = {"nginx": [float("${RPS[nginx,1]}"), float("${RPS[nginx,2]}")], "meshctl": [float("${RPS[meshctl,1]}"), float("${RPS[meshctl,2]}")],
       "plain": [float("${RPS[plain,1]}"), float("${RPS[plain,2]}")]}
lat = {k: [list(map(float, v.split())) for v in vs] for k, vs in {
    "nginx": ["${LAT[nginx,1]}", "${LAT[nginx,2]}"], "meshctl": ["${LAT[meshctl,1]}", "${LAT[meshctl,2]}"],
    "plain": ["${LAT[plain,1]}", "${LAT[plain,2]}"]}.items()}
direct = list(map(float, "${LAT[direct,1]}".split()))
rss = {"nginx client": $(rss_kb "$NGX_C_PID"), "nginx server": $(rss_kb "$NGX_S_PID"),
       "meshctl outbound": $(rss_kb "$MESH_OUT_PID"), "meshctl inbound": $(rss_kb "$MESH_IN_PID")}
low = lambda k, i: min(x[i] for x in lat[k])
print()
print("mutual TLS between the two proxies (plain: the meshctl pair without it); latency and CPU: the better of two rounds;")
print("A = client side, B = server side")
print(f"{'pair':<10}{'max rps (r1, r2)':>22}{'p50 µs':>9}{'p99 µs':>9}{'vCPU/1k rps A':>15}{'B':>7}")
print(f"{'direct':<10}{'-':>22}{direct[0]:>9.0f}{direct[1]:>9.0f}")
for k in ("nginx", "meshctl", "plain"):
    print(f"{k:<10}{rps[k][0]:>11.0f},{rps[k][1]:>10.0f}{low(k,0):>9.0f}{low(k,1):>9.0f}{low(k,2):>15.3f}{low(k,3):>7.3f}")
for k, v in rss.items():
    print(f"RSS {k:<18}{v / 1024:>7.1f} MB")
print()
print(f"meshctl/nginx max rps with mTLS: {max(rps['meshctl']) / max(rps['nginx']):.2f}  (target >= 0.35)")
print(f"added p99 over direct at 1,000 rps: meshctl {(low('meshctl', 1) - direct[1]) / 1000:.2f} ms, nginx {(low('nginx', 1) - direct[1]) / 1000:.2f} ms,"
      f" meshctl without mTLS {(low('plain', 1) - direct[1]) / 1000:.2f} ms")
print(f"cost of mTLS in meshctl: max rps x{max(rps['meshctl']) / max(rps['plain']):.2f}, vCPU/1k rps per sidecar "
      f"{low('plain', 2):.3f} -> {low('meshctl', 2):.3f}")

import json
fort = {k: list(map(float, v.split())) for k, v in {"direct": "$F_DIRECT", "nginx": "$F_NGINX", "meshctl": "$F_MESH",
                                                    "plain": "$F_PLAIN"}.items()}
add = {k: [round(fort[k][i] - fort["direct"][i], 3) for i in range(3)] for k in ("nginx", "meshctl", "plain")}
print()
print("Istio's method (fortio -qps 1000 -c 16 -payload-size 1024 -uniform -nocatchup): added over direct, ms")
for k in ("nginx", "meshctl", "plain"):
    print(f"{k:<10} p50 +{add[k][0]:.3f} p90 +{add[k][1]:.3f} p99 +{add[k][2]:.3f}   vCPU per 1k rps: A {fort[k][3]:.3f} B {fort[k][4]:.3f}")
print(json.dumps({
    "bench": "pair_mtls", "load": "$LOAD0",
    "ratio_max_rps": round(max(rps["meshctl"]) / max(rps["nginx"]), 3),
    "mtls_cost": round(1 - max(rps["meshctl"]) / max(rps["plain"]), 3),
    "max_rps": {k: max(v) for k, v in rps.items()},
    "fortio_added_ms_p50_p90_p99": add,
    "ratio_added_p99": round(add["meshctl"][2] / add["nginx"][2], 2) if add["nginx"][2] > 0 else None,
    "vcpu_per_1k_rps_client_server": {k: fort[k][3:5] for k in ("nginx", "meshctl", "plain")},
    "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
}))
EOF
