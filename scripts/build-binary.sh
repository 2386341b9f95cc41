#!/usr/bin/env bash
# Build dist/meshctl: one executable file for Linux x86-64 carrying Python, meshctl and
# its dependencies (and meshctl's compiled modules, when they are built), so
# `./meshctl up -f mesh.yaml` works with no virtualenv and no pip.
#   bash scripts/build-binary.sh            # -> dist/meshctl
#
# Tool: PyInstaller --onefile. Well kept (releases every month or two), it freezes C
# extensions (httptools, cryptography, jh2, mypyc modules) from their wheels with no
# compiler, in about a minute, and its one-file bootloader lets the supervisor start
# sidecars and control roles from the same file (children reuse the parent's unpacked
# files). Nuitka would compile every dependency to C (many minutes on two cores, too slow
# for CI); PEX's interpreter-carrying "scie" mode downloads a Python build at build time.
# The build uses its own virtualenv (build/venv), never the developer's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=build/binary
rm -rf "$BUILD" && mkdir -p "$BUILD" dist
if [[ ! -x build/venv/bin/python ]]; then
  "$PY" -m venv build/venv
fi
# PyInstaller 6.x: a compatible range, as for every dependency. mypy brings mypyc: where
# setup.py compiles the hot path (and a C compiler is here) the binary carries the
# compiled modules; MESHCTL_PURE=1 builds it pure.
build/venv/bin/python -m pip install -q --disable-pip-version-check "pyinstaller>=6.10,<7" "mypy>=1.10" setuptools wheel
build/venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation .
# mypyc's compiled modules share a top-level helper module (NAME__mypyc) that PyInstaller
# cannot see them import: name it.
# (mypy has one of its own: only those meshctl's extension modules name.)
hidden=()
site=$(build/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for so in "$site"/*__mypyc*.so; do
  [[ -e $so ]] || continue
  name=$(basename "$so"); name=${name%%.*}
  if grep -rlaq --include='*.so' "$name" "$site/meshctl"; then hidden+=(--hidden-import "$name"); fi
done
# What `meshctl --version` reports as the commit (the binary carries no .git).
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit-dirty"; fi
echo "$commit" > "$BUILD/commit.txt"
# Run from the build folder, with an entry script there: meshctl then comes from the
# build venv (compiled modules included), not from this source tree. The build tools
# stay out (setuptools' pkg_resources would be imported by every process at start).
echo "from meshctl.frozen import main; main()" > "$BUILD/meshctl_main.py"
root=$PWD
(cd "$BUILD" && "$root/build/venv/bin/python" -m PyInstaller --onefile --noconfirm --clean --log-level WARN \
  --name meshctl --distpath "$root/dist" --workpath work --specpath . \
  --collect-submodules meshctl --copy-metadata meshctl "${hidden[@]}" \
  --exclude-module setuptools --exclude-module pkg_resources --exclude-module distutils \
  --exclude-module _distutils_hack --exclude-module mypy --exclude-module mypyc \
  --add-data "$root/$BUILD/commit.txt:meshctl" \
  meshctl_main.py)
ls -l dist/meshctl
dist/meshctl --version
