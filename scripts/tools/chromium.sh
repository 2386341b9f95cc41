#!/usr/bin/env bash
# Make sure Debian's chromium and chromium-driver are installed for the dashboard's
# browser test (Selenium drives them; a browser download at test time cannot work
# offline). Prints the path of chromedriver.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  command -v chromedriver
  exit 0
fi
command -v apt-get >/dev/null || { echo "chromium.sh: chromium/chromedriver not found and no apt-get" >&2; exit 1; }
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
echo "chromium.sh: installing Debian's chromium and chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2 || {
  $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2; }
command -v chromedriver
