"""Cost model: predicted against measured time per op and size: a thin wrapper over `sagellm-comm bench cost-model`.

    python bench/cost_model.py --world 2 --transport shm --json results/cost_model_shm.json

The logic lives in `sagellm_comm.bench_cost`, so the script and the command can
never drift apart. Calibrate first (`python -m sagellm_comm.topology.calibrate`,
or `sagellm-comm topo --calibrate`) to compare against this host's own constants.
"""

from __future__ import annotations

import sys

from sagellm_comm.bench_cost import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
