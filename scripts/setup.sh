#!/usr/bin/env bash
# Create .venv (once) and install the project with its test and torch extras.
# torch is pinned to the CPU build first so that the range in pyproject.toml
# is already satisfied and pip does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev,torch,trio]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import importlib.metadata as m; print(' | '.join(f'{p} {m.version(p)}' for p in ('sagellm-comm', 'torch', 'trio', 'anyio', 'msgspec', 'numpy')))"
