#!/usr/bin/env bash
# Run tests against the mypyc-compiled build of meshctl (see setup.py).
#   bash scripts/test-compiled.sh [pytest args]      (default: tests/unit tests/integration)
# Builds a non-editable, compiled install into .venv-compiled (mypy from PyPI,
# the system C compiler), checks that it really is compiled, then runs pytest
# from a copy of the repository without meshctl/, so that every import and
# every `python -m meshctl` the tests start gets the compiled package.
# Prints how long the compile took.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
V=$REPO/.venv-compiled
PIP=(--disable-pip-version-check -q)

[[ -x $V/bin/python ]] || python3 -m venv "$V"
"$V/bin/python" -m pip install "${PIP[@]}" 'mypy>=1.10,<3' 'setuptools>=68' wheel
t0=$(date +%s)
# --no-build-isolation: the build must see the mypy installed above (pip's isolated
# build environment has setuptools only, which is what makes the quick start pure)
MESHCTL_PURE=0 "$V/bin/python" -m pip install "${PIP[@]}" --no-build-isolation '.[test]'
echo "meshctl: compiled build installed in $(( $(date +%s) - t0 ))s on $(nproc) cores" >&2

RUN=$(mktemp -d /tmp/meshctl-compiled-XXXXXX)
trap 'rm -rf "$RUN"' EXIT
tar -c --exclude=./meshctl --exclude='./.venv*' --exclude=./.git --exclude=./build . | tar -x -C "$RUN"
cd "$RUN"
export PYTHONSAFEPATH=1  # no cwd on sys.path for `python -m` children either
"$V/bin/python" -c 'import meshctl._build as b, sys; print("meshctl build:", b.describe()); sys.exit(0 if b.COMPILED else 1)'
(($#)) || set -- tests/unit tests/integration
set +e
"$V/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
exit $rc
