"""Ranks as Ray actors: a team that already runs Ray scales out without another launcher.

    python examples/ray_actors.py --world 4            # a local Ray instance
    python examples/ray_actors.py --world 8 --address auto   # an existing cluster (`ray start ...`)

Each actor is one rank. Ray runs an async actor's methods as separate asyncio
tasks on one event loop, while a communicator's `async with` must begin and end
in one task; so each actor starts a long-lived task that holds the communicator
and serves the steps the driver asks for through a queue. Rank 0's actor picks
the rendezvous address on its own node (a cluster's nodes reach it there; loopback for a local instance), and
the driver passes it and a fresh token to every actor: ranks that listen off
loopback need one.

The work is a tensor-parallel linear layer: W is split by rows over the ranks,
each rank computes its partial x_shard @ W_shard, and an all_reduce sums them;
the driver checks the result against the unsplit product.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray

import sagellm_comm as sc

HIDDEN, OUT = 256, 128


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((HIDDEN, OUT)), rng.standard_normal((4, HIDDEN))


@ray.remote
class Rank:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.jobs: asyncio.Queue[tuple[Callable[[sc.Communicator], Awaitable[Any]] | None, asyncio.Future[Any]]]
        self.jobs = asyncio.Queue()
        w, _ = weights()
        rows = HIDDEN // world
        self.lo, self.hi = rank * rows, (rank + 1) * rows
        self.w_shard = w[self.lo : self.hi]

    def rendezvous_address(self, local: bool) -> str:
        """Rank 0 only: an address on this node, with a free port, for the others to reach
        (loopback when every actor runs on this machine)."""
        ip = "127.0.0.1" if local else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return f"tcp://{ip}:{s.getsockname()[1]}"

    async def start(self, url: str, token: str) -> dict[str, Any]:
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.holder = asyncio.create_task(self._hold(url, token, ready))
        return await ready

    async def _hold(self, url: str, token: str, ready: asyncio.Future[dict[str, Any]]) -> None:
        try:
            async with sc.init_process_group(url, rank=self.rank, world_size=self.world, token=token,
                                             timeout=120) as comm:
                ready.set_result({"rank": comm.rank, "links": {str(k): v["transport"]
                                                               for k, v in comm.peer_transports().items()}})
                while True:
                    job, done = await self.jobs.get()
                    if job is None:
                        done.set_result(None)
                        return
                    try:
                        done.set_result(await job(comm))
                    except Exception as e:  # the driver gets it from its ray.get
                        done.set_exception(e)
        except Exception as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    async def _run(self, job: Callable[[sc.Communicator], Awaitable[Any]] | None) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.jobs.put((job, done))
        return await done

    async def linear(self, x: np.ndarray) -> np.ndarray:
        """This rank's partial product, summed over the ranks."""
        async def step(comm: sc.Communicator) -> np.ndarray:
            y = x[:, self.lo : self.hi] @ self.w_shard
            await comm.all_reduce(y)
            return y
        return await self._run(step)  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self._run(None)
        await self.holder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto); default: start one here")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if HIDDEN % args.world:
        ap.error(f"--world must divide {HIDDEN}")
    ray.init(address=args.address, num_cpus=None if args.address else args.world, include_dashboard=False,
             log_to_driver=False)
    try:
        ranks = [Rank.remote(r, args.world) for r in range(args.world)]  # type: ignore[attr-defined]
        url = ray.get(ranks[0].rendezvous_address.remote(args.address is None))
        token = secrets.token_hex(16)
        infos = ray.get([a.start.remote(url, token) for a in ranks], timeout=180)
        print(f"{args.world} ranks as Ray actors, rendezvous at {url}")
        for info in infos:
            print(f"  rank {info['rank']}: links {info['links']}")
        w, x = weights()
        want = x @ w
        for step in range(args.steps):
            t0 = time.perf_counter()
            outs = ray.get([a.linear.remote(x * (step + 1)) for a in ranks], timeout=60)
            dt = time.perf_counter() - t0
            err = max(float(np.abs(o - want * (step + 1)).max()) for o in outs)
            print(f"step {step}: tensor-parallel linear on {args.world} ranks, {dt * 1e3:.1f} ms, max error {err:.2e}")
            if err > 1e-9 * HIDDEN * (step + 1):
                print("FAILED: the ranks' sum differs from the unsplit product")
                return 1
        ray.get([a.close.remote() for a in ranks], timeout=60)
        print("ok: every step matched the unsplit product on every rank")
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
