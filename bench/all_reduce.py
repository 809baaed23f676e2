"""all_reduce benchmark against gloo: a thin wrapper over `sagellm-comm bench all-reduce`.

    python bench/all_reduce.py --world 2 --sizes 4,64K,1M,16M,64M --compare gloo \
        --json results/allreduce.json

Kept as a script so the benchmark can be run from a checkout the same way as
other benches; the logic lives in `sagellm_comm.bench_allreduce`, so the two
can never drift apart.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "all-reduce", *sys.argv[1:]]))
