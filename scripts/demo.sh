#!/usr/bin/env bash
# Installs On The Fly and runs the demo (about a minute of training; pass --epochs N to change).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/onthefly demo "$@"
