#!/usr/bin/env bash
# Set up and run meshctl's whole test suite on a fresh machine.
#   bash scripts/test.sh [pytest args]
# Creates .venv, installs meshctl with its test extras, builds dist/meshctl and runs
# Bookinfo from it (scripts/build-binary.sh, smoke-binary.sh), installs the system
# tools the tests drive (curl, tmux, a JDK, openssl, h2load, ip) if missing, builds the real
# Consul and Eureka servers (cached in ~/.cache/meshctl-tools), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

need=()
for tool in curl:curl tmux:tmux java:default-jdk-headless openssl:openssl h2load:nghttp2-client ip:iproute2; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing tools: ${need[*]} (install them with apt-get)" >&2
    exit 1
  fi
fi

bash scripts/tools/all.sh

# The one-file build (dist/meshctl), and Bookinfo run from it with no virtualenv on PATH.
bash scripts/build-binary.sh
bash scripts/smoke-binary.sh

set +e
# Types: mypy as [tool.mypy] in pyproject.toml says (strict on core/, model/, protocol/;
# normal elsewhere). A type error fails the run, after the tests have run too.
.venv/bin/python -m mypy
types_rc=$?
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
# Sidecars run on evloop (proxy/aio.py); the tests that run `meshctl proxy run` as a child process,
# once more with those children on trio (MESHCTL_PROXY_LOOP=trio, still selectable)
if [[ $# == 0 ]]; then
  MESHCTL_TEST_PROXY_LOOP=trio .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_proxy_process.py \
    tests/integration/test_circuit_breaker.py tests/integration/test_hardening.py tests/integration/test_grpc_big_stream.py || rc=1
fi
((types_rc == 0)) || { echo "mypy found type errors (above)" >&2; rc=1; }
# CI: the unit and integration layers once more, against the mypyc-compiled build
if [[ ${CI:-} == true && $# == 0 ]]; then
  bash scripts/test-compiled.sh tests/unit tests/integration || rc=1
fi
set -e
# pytest's 5 means no test ran: that is a failure here, not a pass.
exit $rc
