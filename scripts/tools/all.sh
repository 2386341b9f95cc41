#!/usr/bin/env bash
# Build every external tool the test suite needs (cached; fast when already built).
# Prints one path per tool.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$HERE/consul.sh"
"$HERE/eureka.sh"
"$HERE/fortio.sh"
"$HERE/h2spec.sh"
"$HERE/grpcurl.sh"
"$HERE/zipkin.sh"
"$HERE/otlp-receiver.sh"
"$HERE/prometheus.sh"
"$HERE/chromium.sh"
