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
exec "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh" fortio fortio.org/fortio "${FORTIO_VERSION:-1.68.2}"
