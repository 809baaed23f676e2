"""A multi-node launch with torchrun: two hosts (network namespaces), two ranks on each.

What a team running torchrun on two machines does, on one machine: on every
host `torchrun --nnodes 2 --node-rank i --nproc-per-node 2 --master-addr HOST0
...`, and each worker calls `init_process_group("env://")`. Checks that the
ranks meet through torchrun's store, that ranks on one host talk over shared
memory and across hosts over tcp, and that collectives are right.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns

pytestmark = pytest.mark.multiprocess

WORKER = str(Path(__file__).with_name("torchrun_worker.py"))
NODES, PER_NODE = 2, 2


@pytest.fixture(scope="module")
def fabric() -> Iterator[netns.Fabric]:
    why = netns.unavailable()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    pytest.importorskip("torch")
    f = netns.Fabric(NODES, name="t").up()
    try:
        yield f
    finally:
        f.down()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_torchrun_two_nodes_two_ranks_each(fabric: netns.Fabric, backend: str, tmp_path: Path) -> None:
    env = {"RESULT_DIR": str(tmp_path), "SAGELLM_COMM_TOKEN": "torchrun-secret", "WORKER_BACKEND": backend,
           "OMP_NUM_THREADS": "1"}
    nodes = [fabric.popen(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES),
                              "--nproc-per-node", str(PER_NODE), "--node-rank", str(i),
                              "--master-addr", fabric.addr(0), "--master-port", "29511", WORKER], env=env)
             for i in range(NODES)]
    outputs = []
    try:
        for p in nodes:
            out, err = p.communicate(timeout=240)
            outputs.append((p.returncode, out, err))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for code, out, err in outputs:
        assert code == 0, out + err[-4000:]
    results = {int(f.stem[4:]): json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")}
    world = NODES * PER_NODE
    assert sorted(results) == list(range(world)), outputs
    for r, res in results.items():
        assert res["world"] == world and res["env_rank"] == r
        assert res["local_rank"] == r % PER_NODE  # torchrun numbers node 0's ranks first
        assert res["all_reduce_ok"] and res["all_gather_ok"] and res["broadcast_ok"], res
        assert res["hosts"] == [[0, 1], [2, 3]], res  # the gathered topology sees two hosts
        for peer, transport in res["links"].items():
            same_host = int(peer) // PER_NODE == r // PER_NODE
            assert transport == ("shm" if same_host else "tcp"), (r, res["links"])
