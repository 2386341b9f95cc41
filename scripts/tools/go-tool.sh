#!/usr/bin/env bash
# Build a Go command-line tool from the Go module proxy into the tools cache,
# once; print its path. Used by fortio.sh, h2spec.sh and grpcurl.sh.
#
#   go-tool.sh NAME MODULE_PATH VERSION     e.g. go-tool.sh fortio fortio.org/fortio 1.68.2
#
# Idempotent: when that version is already installed it only prints the path.
# The binary is built in a scratch GOBIN and moved into place, so a failed or
# interrupted build never leaves a half-written tool behind.
set -euo pipefail
NAME="$1"; MODULE="$2"; VERSION="$3"

TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
BIN="$TOOLS/bin/$NAME"
STAMP="$TOOLS/bin/.$NAME-version"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "$NAME: 'go' not found on PATH; install Go to build $NAME" >&2; exit 1; }

mkdir -p "$TOOLS/bin"
BUILD="$(mktemp -d "$TOOLS/.$NAME-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

echo "$NAME: building $MODULE@v$VERSION (the first build takes a minute or two)" >&2
# The module proxy is the network: a fresh CI machine retries a failed fetch twice before giving up.
for attempt in 1 2 3; do
  GOBIN="$BUILD" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$MODULE@v$VERSION" >&2 && break
  ((attempt < 3)) || exit 1
  echo "$NAME: go install failed (attempt $attempt of 3); retrying in 10 s" >&2; sleep 10
done
mv "$BUILD/$NAME" "$BIN"
echo "$VERSION" > "$STAMP"
echo "$BIN"
