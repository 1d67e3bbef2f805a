#!/usr/bin/env bash
# Installs what the tests need, then runs the fast suite (slow end-to-end runs: pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
