#!/usr/bin/env bash
# Make sure Prometheus (Debian's `prometheus` package) is installed for the tests
# that scrape a running mesh; prints the path of the binary.
set -euo pipefail
if command -v prometheus >/dev/null; then
  command -v prometheus
  exit 0
fi
command -v apt-get >/dev/null || { echo "prometheus.sh: 'prometheus' not found and no apt-get; install Prometheus" >&2; exit 1; }
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
echo "prometheus.sh: installing Debian's prometheus package" >&2
# the package's service is not wanted: tests run their own Prometheus on free ports
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends prometheus >&2 || {
  $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q --no-install-recommends prometheus >&2; }
command -v prometheus
