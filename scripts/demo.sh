#!/usr/bin/env bash
# One command: set up a fresh clone and run the demo (4 local processes over shared memory,
# every collective checked against numpy, a table printed by rank 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sagellm-comm demo "$@"
