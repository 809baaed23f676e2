"""KV-cache transfer prefill -> decode against the raw transport: a thin wrapper over `sagellm-comm bench kv`.

    python bench/kv.py --tokens 1024,4096 --transport shm --json results/kv.json

The logic lives in `sagellm_comm.bench_kv`, so the script and the command can
never drift apart.
"""

from __future__ import annotations

import sys

from sagellm_comm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kv", *sys.argv[1:]]))
