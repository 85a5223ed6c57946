#!/usr/bin/env bash
# Installs what the tests need, then runs the whole gate: tsc, vitest, ruff, mypy, pytest (the browser
# tests drive Debian's chromium with Playwright).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # builds the dashboard: its API types generated, then tsc, then vite
echo "== dashboard unit tests (vitest)"
(cd dashboard && npm test --silent)
if [ ! -x /usr/bin/chromium ]; then
  echo "== installing chromium for the browser tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "== ruff"
.venv/bin/ruff check src tests benchmarks
echo "== mypy"
.venv/bin/mypy
bash scripts/test_vscode.sh  # the VS Code extension: unit tests, .vsix, end to end in code-server
echo "== pytest"
.venv/bin/python -m pytest "$@"
