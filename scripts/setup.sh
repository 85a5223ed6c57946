#!/usr/bin/env bash
# Installs everything On The Fly needs (idempotent; fast when already done):
# a virtual environment in .venv, the Python packages, and the dashboard built from dashboard/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first and pinned: an unpinned torch can pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The dashboard: TypeScript built with Vite into src/onthefly/dashboard (not committed). The build
# first generates the page's API types from the server's OpenAPI document with .venv's python
# (installed above), so a drift between the server's models and the page fails here, in tsc.
(cd dashboard && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
