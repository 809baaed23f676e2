#!/usr/bin/env bash
# One command: run every fault test (pytest -m fault) and regenerate docs/reliability.md from the outcomes.
# Extra arguments go to pytest (e.g. -k multihost). Needs root for the network-namespace tests
# (they skip, and the page says so, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
mkdir -p results
status=0
.venv/bin/python -m pytest -q -m fault -p no:cacheprovider --reliability-json=results/reliability.json "$@" || status=$?
.venv/bin/python scripts/reliability_report.py results/reliability.json > docs/reliability.md
echo "wrote docs/reliability.md ($(grep -c '^| ' docs/reliability.md) table lines); pytest exit status $status"
exit $status
