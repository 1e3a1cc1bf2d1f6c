#!/usr/bin/env bash
# Installs the official Segment clients used by the compatibility test into target/clients.
# Idempotent: does nothing when they are already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="${CIBLE_CLIENTS_DIR:-$here/../../target/clients}"
mkdir -p "$out"
if [ ! -d "$out/py/segment/analytics" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$out/py" -r "$here/requirements.txt"
fi
if [ ! -d "$out/node/node_modules/@segment/analytics-node" ]; then
  mkdir -p "$out/node"
  cp "$here/package.json" "$out/node/"
  (cd "$out/node" && npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "$out"
