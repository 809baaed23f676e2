"""Decode-loop compute/communication overlap against the same loop run sequentially:
a thin wrapper over `sagellm-comm bench overlap`.

    python bench/overlap.py --json results/overlap.json

The logic lives in `sagellm_comm.bench_overlap`, so the script and the command
can never drift apart. Needs a CUDA GPU.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overlap", *sys.argv[1:]]))
