"""Tensor-parallel MLP with the all-reduce overlapped with the next step's compute.

Run on 2 processes with torchrun (env://):

    torchrun --nproc-per-node 2 examples/tensor_parallel_overlap.py

or without torchrun, as simulated ranks in one process:

    python examples/tensor_parallel_overlap.py --simulate 2

Each rank holds a column slice of W1 and the matching row slice of W2, so
y = relu(x @ W1) @ W2 is a sum of per-rank partials: one all_reduce per layer.
While layer N's all_reduce is in flight, the rank computes the next request's
layer-N partial in the same task group.
"""

from __future__ import annotations

import argparse

import anyio
import numpy as np

import sagellm_comm as sc

HIDDEN, FFN, STEPS = 512, 2048, 8


def shard(rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)  # same full weights on every rank
    w1 = (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)).astype(np.float32)
    cols = slice(rank * FFN // world, (rank + 1) * FFN // world)
    return w1[:, cols].copy(), w2[cols, :].copy()


async def decode_loop(comm: sc.Communicator) -> float:
    w1, w2 = shard(comm.rank, comm.world_size)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((4, HIDDEN)).astype(np.float32) for _ in range(STEPS)]
    partial = np.maximum(inputs[0] @ w1, 0) @ w2
    outputs = []
    for step in range(STEPS):
        in_flight = partial
        async with anyio.create_task_group() as tg:
            tg.start_soon(comm.all_reduce, in_flight)  # communication ...
            if step + 1 < STEPS:  # ... overlapped with the next step's compute
                partial = np.maximum(inputs[step + 1] @ w1, 0) @ w2
        outputs.append(in_flight)
    # check against the unsplit model
    rng_full = np.random.default_rng(0)
    full_w1 = (rng_full.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
    full_w2 = (rng_full.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)).astype(np.float32)
    expected = [np.maximum(x @ full_w1, 0) @ full_w2 for x in inputs]
    return max(float(np.abs(o - e).max()) for o, e in zip(outputs, expected, strict=True))


async def main_env() -> None:
    async with sc.init_process_group("env://") as comm:
        err = await decode_loop(comm)
        print(f"rank {comm.rank}/{comm.world_size}: {STEPS} steps, max |tp - full| = {err:.2e}")


async def main_simulated(world: int) -> None:
    errs = await sc.testing.run_ranks(world, decode_loop)
    print(f"{world} simulated ranks: {STEPS} steps, max |tp - full| = {max(errs):.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", type=int, default=0, help="run N simulated ranks in one process")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = ap.parse_args()
    if args.simulate:
        anyio.run(main_simulated, args.simulate, backend=args.backend)
    else:
        anyio.run(main_env, backend=args.backend)
