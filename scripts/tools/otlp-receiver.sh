#!/usr/bin/env bash
# Build the OpenTelemetry Collector's OTLP receiver as a small program
# (scripts/tools/otlp-receiver: go.opentelemetry.io/collector/receiver/otlpreceiver,
# modules from the Go module proxy, pinned in its go.sum) for the OTLP tracing
# test. It accepts OTLP/HTTP export requests exactly as the collector does and
# writes what it received as OTLP JSON lines. Idempotent: rebuilt only when
# its sources change; prints the binary's path.
#
#   scripts/tools/otlp-receiver.sh        -> prints .../bin/otlp-receiver
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/otlp-receiver" && pwd)"
TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
BIN="$TOOLS/bin/otlp-receiver"
STAMP="$TOOLS/bin/.otlp-receiver-version"
VERSION="$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" | sha256sum | cut -c1-16)"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "otlp-receiver: 'go' not found on PATH; install Go to build it" >&2; exit 1; }
mkdir -p "$TOOLS/bin"
OUT="$(mktemp "$TOOLS/bin/.otlp-receiver-build.XXXXXX")"
trap 'rm -f "$OUT"' EXIT
echo "otlp-receiver: building the collector's OTLP receiver (the first build takes a minute or two)" >&2
(cd "$SRC" && GOFLAGS="-buildvcs=false -mod=readonly" CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT" .) >&2
chmod +x "$OUT"
mv "$OUT" "$BIN"
trap - EXIT
echo "$VERSION" > "$STAMP"
echo "$BIN"
