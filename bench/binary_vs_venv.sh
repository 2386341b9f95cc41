#!/usr/bin/env bash
# The one-file build against the virtualenv: file size, `meshctl --version` wall time
# (median of 5), Bookinfo `up -d` time and the mean RSS of its 7 sidecars.
#   bash scripts/build-binary.sh && bash bench/binary_vs_venv.sh
# Uses .venv/bin/meshctl and dist/meshctl (or $VENV_MESHCTL, $BIN); ports 32700-32761.
set -euo pipefail
cd "$(dirname "$0")/.."
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

measure() {  # $1: label, $2: meshctl command (absolute), $3: what a sidecar's argv contains
  local label=$1 cmd=$2 mark=$3 work t0 t1 i
  work=$(mktemp -d /tmp/meshctl-measure.XXXXXX)
  cp -r examples/bookinfo/apps "$work/"
  sed 's/portRange: 21000-21999/portRange: 32700-32760/; s/{80: 8080}/{80: 32761}/' examples/bookinfo/mesh.yaml > "$work/mesh.yaml"
  local run=(env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 "$cmd")
  for i in 1 2 3 4 5; do
    t0=$(now); "${run[@]}" --version >/dev/null; t1=$(now); awk "BEGIN {print $t1 - $t0}"
  done | median > "$work/version.txt"
  t0=$(now); (cd "$work" && "${run[@]}" up -d -f mesh.yaml >/dev/null 2>&1); t1=$(now)
  sleep 5  # settled sidecars
  local n=0 rss=0 anon=0 d c
  for d in /proc/[0-9]*; do
    c=$({ tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null || true)
    [[ $c == *"$mark"*"$work/.meshctl/nodes/"* ]] || continue
    n=$((n + 1)); rss=$((rss + $(awk '/^VmRSS:/ {print $2}' "$d/status")))
    anon=$((anon + $(awk '/^RssAnon:/ {print $2}' "$d/status")))
  done
  (cd "$work" && "${run[@]}" down >/dev/null)
  printf '%-8s --version %5.2fs   up -d %5.1fs   sidecars %d, mean RSS %5.1f MB (anonymous %5.1f MB)\n' \
    "$label" "$(cat "$work/version.txt")" "$(awk "BEGIN {print $t1 - $t0}")" "$n" \
    "$(awk "BEGIN {print $rss / ($n ? $n : 1) / 1024}")" "$(awk "BEGIN {print $anon / ($n ? $n : 1) / 1024}")"
  rm -rf "$work"
}

bin=$(realpath "${BIN:-dist/meshctl}")
venv=$(realpath "${VENV_MESHCTL:-.venv/bin/meshctl}")
ls -l "$bin" | awk '{printf "binary: %.1f MB\n", $5 / 1048576}'
"$bin" --version
"$venv" --version
measure venv "$venv" "-m meshctl.proxy "
measure binary "$bin" "meshctl __proxy__ "
