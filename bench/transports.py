"""tcp, shm and ucx side by side, against gloo and memcpy: a thin wrapper over `sagellm-comm bench transports`.

    python bench/transports.py --json results/transports.json

The logic lives in `sagellm_comm.bench_transports`, so the script and the command
can never drift apart.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "transports", *sys.argv[1:]]))
