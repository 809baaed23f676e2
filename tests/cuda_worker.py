"""One rank of a CUDA test: `python cuda_worker.py SCENARIO RANK WORLD PORT BACKEND`.

Prints `RESULT <json>`. Scenarios: `ops` (every op on CUDA tensors, every dtype,
checked against values computed on the host), `kill` (rank 1 leaves before an
all_reduce that rank 0 is already waiting in).
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio
import numpy as np
import torch

import sagellm_comm as sc

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8]


def report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


async def every_op(comm: sc.Communicator, priority: str) -> dict[str, bool]:
    r, n = comm.rank, comm.world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    checks: dict[str, bool] = {}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        for size in (5, 300_000):
            x = (torch.arange(size, device=dev) % 7 + r).to(dt)
            want = sum((torch.arange(size, device=dev) % 7 + q).to(torch.float64) for q in range(n))
            await comm.all_reduce(x, priority=priority)
            checks[f"all_reduce/{name}/{size}"] = bool((x.to(torch.float64) == want.to(dt).to(torch.float64)).all())
            y = torch.full((size,), r, device=dev).to(dt)
            await comm.all_reduce(y, op="max", priority=priority)
            checks[f"all_reduce_max/{name}/{size}"] = bool((y == n - 1).all())
            g = await comm.all_gather(torch.full((size,), r + 1, device=dev).to(dt), priority=priority)
            checks[f"all_gather/{name}/{size}"] = g.shape == (n, size) and g.device == dev and all(
                bool((g[i] == i + 1).all()) for i in range(n))
            rs = await comm.reduce_scatter(torch.ones(n * size, device=dev).to(dt), priority=priority)
            checks[f"reduce_scatter/{name}/{size}"] = rs.shape == (size,) and bool((rs == n).all())
            b = torch.full((size,), 9 if r == n - 1 else 0, device=dev).to(dt)
            await comm.broadcast(b, root=n - 1, priority=priority)
            checks[f"broadcast/{name}/{size}"] = bool((b == 9).all())
            a = (torch.arange(n, device=dev).repeat_interleave(size) + 10 * r).to(dt)
            out = await comm.all_to_all(a, priority=priority)
            expect = (torch.tensor([10 * j + r for j in range(n)], device=dev).repeat_interleave(size)).to(dt)
            checks[f"all_to_all/{name}/{size}"] = bool((out == expect).all())
            if n > 1:
                msg = torch.full((size,), 3 + r, device=dev).to(dt)
                got = torch.zeros(size, device=dev).to(dt)
                if r == 0:
                    await comm.send(msg, 1, tag=4, priority=priority)
                    await comm.recv(got, n - 1, tag=5, priority=priority)
                    checks[f"p2p/{name}/{size}"] = bool((got == 3 + n - 1).all())
                elif r == n - 1:
                    await comm.recv(got, 0, tag=4, priority=priority)
                    await comm.send(msg, 0, tag=5, priority=priority)
                    checks[f"p2p/{name}/{size}"] = bool((got == 3).all())
    if n > 1 and r in (0, n - 1):  # a CUDA tensor on one side, a host array on the other
        other = n - 1 - r
        for size in (7, 5_000_000):
            if r == 0:
                await comm.send(torch.arange(size, device=dev, dtype=torch.int32), other, tag=8, priority=priority)
                host = np.zeros(size, np.int32)
                await comm.recv(host, other, tag=9, priority=priority)
                checks[f"p2p_host_to_cuda/{size}"] = bool((host == np.arange(size) * 2).all())
            else:
                got = await comm.recv(np.zeros(size, np.int32), other, tag=8, priority=priority)
                checks[f"p2p_cuda_to_host/{size}"] = bool((got == np.arange(size)).all())
                await comm.send(torch.arange(size, device=dev, dtype=torch.int32) * 2, other, tag=9,
                                priority=priority)
    xs = [torch.full((k + 1,), float(r + k), device=dev) for k in range(20)]
    async with comm.fuse(priority=priority) as bucket:
        for x in xs:
            bucket.all_reduce(x)
    checks["fuse"] = bucket.launches == 1 and all(
        bool((x == sum(q + k for q in range(n))).all()) for k, x in enumerate(xs))
    return checks


async def main(scenario: str, rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank % torch.cuda.device_count())
    async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=120,
                                     heartbeat_interval=0.5, heartbeat_timeout=5) as comm:
        if scenario == "ops":
            checks = await every_op(comm, "normal")
            checks.update({f"high/{k}": v for k, v in (await every_op(comm, "high")).items()})
            bad = [k for k, v in checks.items() if not v]
            algos = sorted({rec.algorithm for rec in comm.stats.records if rec.op in ("send", "recv")})
            report(rank=rank, ok=not bad, bad=bad[:20], n=len(checks), path=comm.device_path, p2p=algos,
                   transport=comm.transport)
        elif scenario == "cancel_recv":
            # a CUDA receive over shm withdrawn while its message streams in by DMA: the message is
            # kept whole for the next receive, which may be a host array
            n = 1 << 28  # 1 GiB of int32
            if rank == 0:
                src = torch.arange(n, device="cuda", dtype=torch.int32)
                await comm.send(src, 1, tag=1)
                await comm.send(src[:1024], 1, tag=2)
                report(rank=rank, ok=True)
            else:
                dst = torch.zeros(n, device="cuda", dtype=torch.int32)
                with anyio.move_on_after(0.004) as scope:
                    await comm.recv(dst, 0, tag=1)
                cancelled = scope.cancelled_caught
                partial = int((dst != 0).sum().item())
                again = torch.zeros(n, device="cuda", dtype=torch.int32)
                await comm.recv(again, 0, tag=1)
                whole = bool(torch.equal(again, torch.arange(n, device="cuda", dtype=torch.int32)))
                small = await comm.recv(np.zeros(1024, np.int32), 0, tag=2)
                report(rank=rank, ok=cancelled and whole and bool((small == np.arange(1024)).all()),
                       cancelled=cancelled, whole=whole, partial=partial, transport=comm.transport)
        elif scenario == "kill":
            x = torch.ones(1 << 20, device="cuda")
            await comm.all_reduce(x)  # the lane is up on both ranks
            if rank == 1:
                os._exit(0)
            t0 = time.monotonic()
            try:
                with anyio.fail_after(30):
                    await comm.all_reduce(x)
                report(rank=rank, error="none", seconds=time.monotonic() - t0)
            except sc.CommError as e:
                report(rank=rank, error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0,
                       path=comm.device_path)
            comm.abort()


if __name__ == "__main__":
    scenario, rank, world, port, backend = sys.argv[1:6]
    anyio.run(main, scenario, int(rank), int(world), int(port), backend=backend)
