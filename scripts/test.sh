#!/usr/bin/env bash
# One command: set up a fresh clone and run the checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench examples
.venv/bin/mypy
# docs/ and the API reference from the docstrings: a broken link or anchor fails here
# (not --quiet: it hides the warnings that --strict counts)
.venv/bin/mkdocs build --strict
.venv/bin/python -m pytest -q "$@"
