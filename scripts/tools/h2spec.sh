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
exec "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh" h2spec github.com/summerwind/h2spec/cmd/h2spec "${H2SPEC_VERSION:-2.2.1+incompatible}"
