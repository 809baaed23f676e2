"""One torchrun worker: joins with `env://`, checks a few collectives, writes what it saw to RESULT_DIR.

torchrun gives RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and runs
its agent's store there; `init_process_group("env://")` rendezvous through that
store. The token comes from SAGELLM_COMM_TOKEN (ranks listen off loopback here).
"""

from __future__ import annotations

import json
import os

import anyio
import numpy as np
import torch

import sagellm_comm as sc


async def main() -> None:
    async with sc.init_process_group("env://", timeout=120) as comm:
        r, n = comm.rank, comm.world_size
        x = np.full(1000, r + 1, dtype=np.float32)
        await comm.all_reduce(x)
        gathered = await comm.all_gather(torch.arange(4, dtype=torch.int64) + 4 * r)
        b = torch.zeros(3, dtype=torch.float64) if r else torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64)
        await comm.broadcast(b, root=0)
        await comm.barrier()
        assert comm.topology is not None
        result = json.dumps({
            "rank": r, "world": n, "env_rank": int(os.environ["RANK"]),
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "all_reduce_ok": bool((x == n * (n + 1) / 2).all()),
            "all_gather_ok": bool(torch.equal(gathered.flatten(), torch.arange(4 * n, dtype=torch.int64))),
            "broadcast_ok": bool(torch.equal(b, torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64))),
            "hosts": sorted(comm.topology.hosts().values()),
            "links": {str(peer): v["transport"] for peer, v in comm.peer_transports().items()},
        })
        # a file per rank: torchrun's agent interleaves its workers' stdout
        with open(os.path.join(os.environ["RESULT_DIR"], f"rank{r}.json"), "w") as f:
            f.write(result)


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("WORKER_BACKEND", "asyncio"))
