#!/usr/bin/env bash
# Install grpcurl (MIT, the curl of gRPC) from the Go module proxy, for the
# test that calls a gRPC service through a sidecar pair with mTLS.
#
#   scripts/tools/grpcurl.sh           -> prints .../bin/grpcurl
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh" grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "${GRPCURL_VERSION:-1.9.1}"
