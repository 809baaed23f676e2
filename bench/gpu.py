"""GPU yardsticks (completion latency, CPU use, overhead vs NCCL, staging vs PCIe):
a thin wrapper over `sagellm-comm bench gpu`.

    python bench/gpu.py --json results/gpu.json

The logic lives in `sagellm_comm.bench_gpu`, so the script and the command
can never drift apart. Needs a CUDA GPU.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
