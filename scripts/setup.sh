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
pip_install() {  # quiet, but a failure shows pip's whole output and stops the script
    local log
    log=$(mktemp)
    if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
    rm -f "$log"
}
pip_install "torch==2.13.0"
pip_install -e ".[dev,torch,trio]"
# UCX is optional: without it the ucx tests skip (with the reason) and everything else runs
if ! .venv/bin/python -m pip install -q -e ".[ucx]" >/dev/null 2>&1; then
    echo "setup: ucxx could not be installed; the ucx transport and its tests will be skipped" >&2
fi
.venv/bin/python -c "import importlib.metadata as m; print(' | '.join(f'{p} {m.version(p)}' for p in ('sagellm-comm', 'torch', 'trio', 'anyio', 'msgspec', 'numpy')))"
.venv/bin/python -c "import importlib.util as u, importlib.metadata as m; print('ucxx', m.version('ucxx-cu12') if u.find_spec('ucxx') else 'not installed')"
