#!/usr/bin/env bash
# Build an open-source Consul agent (MPL-2.0) from the Go module proxy, for the
# integration tests. Idempotent: if the binary is already built, just print its path.
#
#   scripts/tools/consul.sh            -> prints .../bin/consul
#   MESHCTL_TOOLS=/some/dir scripts/tools/consul.sh
#
# consul v1.14.11 is the last release line whose main module builds without the
# envoyextensions/troubleshoot submodules. `go install consul@v1.14.11` refuses it
# because its go.mod has replace directives, so we generate a tiny wrapper module
# that requires consul and its published api/sdk/proto-public modules and copies
# consul's non-local replace directives, then `go build` the consul main package.
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-1.14.11}"
# Published submodule versions that consul v1.14.11's go.mod requires.
CONSUL_API_VERSION="v1.18.1"
CONSUL_SDK_VERSION="v0.13.0"
CONSUL_PROTO_PUBLIC_VERSION="v0.2.1"

TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
BIN="$TOOLS/bin/consul"
STAMP="$TOOLS/bin/.consul-version"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$CONSUL_VERSION" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "consul.sh: 'go' not found on PATH; install Go to build Consul" >&2; exit 1; }

SRC="$TOOLS/src/consul-wrapper-$CONSUL_VERSION"
mkdir -p "$SRC" "$TOOLS/bin"
cd "$SRC"

cat > go.mod <<GOMOD
module meshctl.local/consul-build

go 1.20

require (
	github.com/hashicorp/consul v$CONSUL_VERSION
	github.com/hashicorp/consul/api $CONSUL_API_VERSION
	github.com/hashicorp/consul/sdk $CONSUL_SDK_VERSION
	github.com/hashicorp/consul/proto-public $CONSUL_PROTO_PUBLIC_VERSION
	// Go >= 1.18 needs reflect2 >= 1.0.2 (older versions crash at start-up).
	github.com/modern-go/reflect2 v1.0.2
)

// Copied from consul's own go.mod (its local ./api ./sdk ./proto-public replaces
// are replaced by the published modules required above).
replace launchpad.net/gocheck => github.com/go-check/check v0.0.0-20140225173054-eb6ee6f84d0a
GOMOD

# Start go.sum from consul's own so that versions it pins resolve without surprises.
# The module proxy is the network: a fresh CI machine retries a failed fetch twice before giving up.
for attempt in 1 2 3; do
  GOFLAGS=-mod=mod go mod download "github.com/hashicorp/consul@v$CONSUL_VERSION" >&2 && break
  ((attempt < 3)) || exit 1
  echo "consul.sh: go mod download failed (attempt $attempt of 3); retrying in 10 s" >&2; sleep 10
done
CONSUL_DIR="$(go env GOMODCACHE)/github.com/hashicorp/consul@v$CONSUL_VERSION"
cp "$CONSUL_DIR/go.sum" go.sum
chmod u+w go.sum

echo "consul.sh: building consul v$CONSUL_VERSION in $SRC (first build takes several minutes)" >&2
GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X github.com/hashicorp/consul/version.GitDescribe=v$CONSUL_VERSION -X github.com/hashicorp/consul/version.Version=$CONSUL_VERSION" \
  -o "$BIN.tmp" github.com/hashicorp/consul >&2
mv "$BIN.tmp" "$BIN"
echo "$CONSUL_VERSION" > "$STAMP"
echo "$BIN"
