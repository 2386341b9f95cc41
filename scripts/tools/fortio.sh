#!/usr/bin/env bash
# Install fortio (Apache-2.0, Istio's load generator) from the Go module proxy,
# for the circuit-breaking end-to-end test. Idempotent: if the pinned version is
# already installed, just print its path.
#
#   scripts/tools/fortio.sh            -> prints .../bin/fortio
#   MESHCTL_TOOLS=/some/dir scripts/tools/fortio.sh
#   FORTIO_VERSION=1.68.2 scripts/tools/fortio.sh
#
# v1.68.2 is the newest release that builds from the Go module proxy alone:
# from v1.69.0 fortio requires grol.io/grol, whose module zip the proxy refuses
# (403), so `go install` fails there.
set -euo pipefail

FORTIO_VERSION="${FORTIO_VERSION:-1.68.2}"

TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
BIN="$TOOLS/bin/fortio"
STAMP="$TOOLS/bin/.fortio-version"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$FORTIO_VERSION" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "fortio.sh: 'go' not found on PATH; install Go to build fortio" >&2; exit 1; }

mkdir -p "$TOOLS/bin"
BUILD="$(mktemp -d "$TOOLS/.fortio-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

echo "fortio.sh: building fortio v$FORTIO_VERSION (first build takes a minute or two)" >&2
# Install into a scratch GOBIN and move the binary into place, so that a failed
# or interrupted build never leaves a half-written fortio behind.
GOBIN="$BUILD" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "fortio.org/fortio@v$FORTIO_VERSION" >&2
mv "$BUILD/fortio" "$BIN"
echo "$FORTIO_VERSION" > "$STAMP"
echo "$BIN"
