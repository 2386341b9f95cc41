#!/usr/bin/env bash
# Fetch the Zipkin server (Maven Central's io.zipkin:zipkin-server exec jar) for the
# tracing tests. Idempotent: when the jar is cached, just print its path.
#
#   scripts/tools/zipkin.sh            -> prints .../zipkin/zipkin-server-<ver>-exec.jar
#
# Run by the suite as `java -jar <jar>` (tests/tools/servers.py); in-memory storage.
set -euo pipefail

ZIPKIN_VERSION="${ZIPKIN_VERSION:-3.5.1}"
TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
DIR="$TOOLS/zipkin"
JAR="$DIR/zipkin-server-$ZIPKIN_VERSION-exec.jar"

if [[ -s "$JAR" ]]; then
  echo "$JAR"
  exit 0
fi

if ! command -v java >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "zipkin.sh: installing default-jre-headless (apt)" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get install -y -q default-jre-headless >&2
  else
    echo "zipkin.sh: 'java' not found on PATH; install a JRE >= 17" >&2; exit 1
  fi
fi

mkdir -p "$DIR"
ART="io.zipkin:zipkin-server:$ZIPKIN_VERSION:jar:exec"
if command -v mvn >/dev/null; then
  echo "zipkin.sh: fetching $ART with Maven" >&2
  mvn -q -B -Dstyle.color=never dependency:copy -Dartifact="$ART" -DoutputDirectory="$DIR" \
      -Dmdep.overWriteReleases=true >&2
else
  URL="https://repo1.maven.org/maven2/io/zipkin/zipkin-server/$ZIPKIN_VERSION/zipkin-server-$ZIPKIN_VERSION-exec.jar"
  echo "zipkin.sh: fetching $URL" >&2
  curl -fsSL --retry 5 --retry-delay 5 --retry-all-errors --connect-timeout 30 -o "$JAR.part" "$URL" && mv "$JAR.part" "$JAR"
fi
[[ -s "$JAR" ]] || { echo "zipkin.sh: download finished but $JAR is missing" >&2; exit 1; }
echo "$JAR"
