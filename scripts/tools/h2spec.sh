#!/usr/bin/env bash
# Install h2spec (MIT, an HTTP/2 conformance tester) from the Go module proxy,
# for the proxy's HTTP/2 conformance test (tests/integration/test_h2spec.py).
# Idempotent: if the pinned version is already installed, just print its path.
#
#   scripts/tools/h2spec.sh            -> prints .../bin/h2spec
#   MESHCTL_TOOLS=/some/dir scripts/tools/h2spec.sh
#   H2SPEC_VERSION=2.2.1+incompatible scripts/tools/h2spec.sh
# The Go module proxy serves h2spec as v2.2.1+incompatible (the repository has
# no /v2 module path); newer GitHub releases are not published there.
set -euo pipefail

H2SPEC_VERSION="${H2SPEC_VERSION:-2.2.1+incompatible}"

TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
BIN="$TOOLS/bin/h2spec"
STAMP="$TOOLS/bin/.h2spec-version"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$H2SPEC_VERSION" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "h2spec.sh: 'go' not found on PATH; install Go to build h2spec" >&2; exit 1; }

mkdir -p "$TOOLS/bin"
BUILD="$(mktemp -d "$TOOLS/.h2spec-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

echo "h2spec.sh: building h2spec v$H2SPEC_VERSION" >&2
# Build into a scratch GOBIN and move the binary into place, so that a failed
# or interrupted build never leaves a half-written h2spec behind.
GOBIN="$BUILD" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "github.com/summerwind/h2spec/cmd/h2spec@v$H2SPEC_VERSION" >&2
mv "$BUILD/h2spec" "$BIN"
echo "$H2SPEC_VERSION" > "$STAMP"
echo "$BIN"
