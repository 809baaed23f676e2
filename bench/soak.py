"""Soak with random cancellations, nothing may grow: a thin wrapper over `sagellm-comm bench soak`.

    python bench/soak.py --seconds 60 --transport shm --json results/soak_shm.json

The logic lives in `sagellm_comm.bench_soak`, so the script and the command can
never drift apart.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "soak", *sys.argv[1:]]))
