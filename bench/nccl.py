"""Awaited collectives on CUDA against bare torch.distributed NCCL, one process per GPU:
a thin wrapper over `sagellm-comm bench nccl`.

    python bench/nccl.py --json results/nccl.json

The logic lives in `sagellm_comm.bench_nccl`, so the script and the command
can never drift apart. Needs a CUDA GPU.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "nccl", *sys.argv[1:]]))
