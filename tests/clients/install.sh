#!/usr/bin/env bash
# Installs what the tests need from PyPI, npm and Debian into target/clients: the official
# Segment clients (compatibility tests: analytics-node, and analytics-next driven in headless
# Chromium by playwright-core), jsonschema (OpenAPI validation), and Debian's chromium.
# Idempotent: does nothing when they are already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="${CIBLE_CLIENTS_DIR:-$here/../../target/clients}"
mkdir -p "$out"
# Tests running in parallel may all call this: one installs, the others wait.
exec 9>"$out/.install.lock"
flock 9
# Reinstalled when the requirements change.
stamp="$out/py/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$out/py" -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$stamp"
fi
if ! cmp -s "$here/package.json" "$out/node/package.json" 2>/dev/null \
  || [ ! -d "$out/node/node_modules/@segment/analytics-next" ]; then
  mkdir -p "$out/node"
  cp "$here/package.json" "$out/node/"
  (cd "$out/node" && npm install --silent --no-audit --no-fund >/dev/null)
fi
if [ ! -x /usr/bin/chromium ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || { echo "installing Debian's chromium failed (apt-get install chromium)" >&2; exit 1; }
fi
echo "$out"
