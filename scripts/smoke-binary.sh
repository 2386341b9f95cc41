#!/usr/bin/env bash
# Bookinfo from the one-file build, as a user without Python packages would run it:
# dist/meshctl copied into an empty directory with the example, an environment with no
# virtualenv on PATH (only /usr/bin:/bin: python3 there runs the example apps, which use
# the standard library only). Prints the timings. Run scripts/build-binary.sh first.
#   bash scripts/smoke-binary.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x dist/meshctl ]] || { echo "smoke-binary.sh: no dist/meshctl (run scripts/build-binary.sh)" >&2; exit 1; }
work=$(mktemp -d /tmp/meshctl-smoke.XXXXXX)
cp dist/meshctl "$work/"
cp -r examples/bookinfo/apps examples/bookinfo/rules "$work/"
# Ports above the test suite's blocks (22000-32699) and below the kernel's ephemeral range.
sed 's/portRange: 21000-21999/portRange: 32700-32760/; s/{80: 8080}/{80: 32761}/' examples/bookinfo/mesh.yaml > "$work/mesh.yaml"
run() { (cd "$work" && env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 ./meshctl "$@"); }
cleanup() { run down >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
now() { date +%s.%N; }

t0=$(now); run --version; t1=$(now)
echo "--version: $(awk "BEGIN {print $t1 - $t0}") s"
t0=$(now); run up -d -f mesh.yaml >"$work/up.out" 2>&1 || { cat "$work/up.out"; exit 1; }; t1=$(now)
echo "up -d (Bookinfo, 7 sidecars): $(awk "BEGIN {print $t1 - $t0}") s"
run route apply --wait -f rules/bookinfo-gateway.yaml -f rules/destination-rule-all.yaml -f rules/virtual-service-all-v1.yaml
# Waited for with a deadline: on a loaded machine the gateway may answer a moment after `--wait`.
deadline=$((SECONDS + 60))
until page=$(curl -s --max-time 20 --noproxy '*' http://127.0.0.1:32761/productpage) && grep -q 'reviews-v1-0' <<<"$page"; do
  ((SECONDS < deadline)) || { echo "productpage through the gateway did not come from reviews v1:"; echo "$page" | head -20; exit 1; }
  sleep 1
done
run status
# Every process of the mesh runs from this one file (sidecars: `meshctl __proxy__`).
procs=0 sidecars=0 rss=0
for d in /proc/[0-9]*; do
  cmd=$({ tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null || true)
  [[ $cmd == "$work/meshctl "* ]] || continue
  procs=$((procs + 1))
  if [[ $cmd == "$work/meshctl __proxy__ "* ]]; then
    sidecars=$((sidecars + 1))
    rss=$((rss + $(awk '/^VmRSS:/ {print $2}' "$d/status")))
  fi
done
((sidecars >= 7)) || { echo "expected 7 sidecars running from $work/meshctl, found $sidecars"; exit 1; }
echo "processes from the one file: $procs; sidecars: $sidecars, mean RSS $((rss / sidecars / 1024)) MB"
run down
echo "smoke-binary: ok"
