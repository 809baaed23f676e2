"""Our awaited collectives on CUDA against bare torch.distributed NCCL calls, one process per GPU.

Both sides run in the same processes, interleaved size by size, on the same
tensors. Per size: the median time of one op, ours awaited (`await
comm.all_reduce(x)`, complete when it returns) and torch's `dist.all_reduce(x)`
followed by a stream synchronize (the same guarantee), plus torch's bare launch
rate (calls queued back to back, one synchronize at the end). Bus bandwidth
follows nccl-tests: all_reduce 2(n-1)/n, all_gather and reduce_scatter (n-1)/n of
the total bytes over the time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import bench_allreduce
from .demo import fmt_bytes, free_port, launch

OPS = ("all_reduce", "all_gather", "reduce_scatter")


def _busbw(op: str, total_bytes: int, n: int, seconds: float) -> float:
    factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    return factor * total_bytes / seconds / 1e9


def _pair(op: str, comm: Any, dist: Any, torch: Any, dev: Any, numel: int,
          world: int) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]:
    """(ours, torch's) call of `op` on fresh tensors of `numel` total float32 elements."""
    if op == "all_gather":
        x = torch.randn(numel // world, device=dev)
        out = torch.empty(numel, device=dev)
        return (lambda: comm.all_gather(x, out=out.view(world, -1)),
                lambda: dist.all_gather_into_tensor(out, x))
    if op == "reduce_scatter":
        x = torch.randn(numel, device=dev)
        out = torch.empty(numel // world, device=dev)
        return lambda: comm.reduce_scatter(x, out=out), lambda: dist.reduce_scatter_tensor(out, x)
    x = torch.randn(numel, device=dev)
    return lambda: comm.all_reduce(x), lambda: dist.all_reduce(x)


def nccl_worker(spec: dict[str, Any]) -> int:
    """One rank (`_worker nccl SPEC`)."""
    import anyio
    import torch
    import torch.distributed as dist

    import sagellm_comm as sc

    rank, world = int(spec["rank"]), int(spec["world"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{spec['torch_port']}", rank=rank,
                            world_size=world, device_id=dev)
    rows: list[dict[str, Any]] = []
    stream = torch.cuda.current_stream()

    async def main() -> None:
        async with sc.init_process_group(f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
                                         timeout=300, backend="nccl") as comm:
            for op in spec["ops"]:
                for nbytes in spec["sizes"]:
                    numel = max(world, nbytes // 4 // world * world)  # total elements (input of the op)
                    ours, theirs = _pair(op, comm, dist, torch, dev, numel, world)
                    iters = max(5, min(int(spec["iters"]), int(2e10 // max(nbytes, 1))))
                    t_ours: list[float] = []
                    t_sync: list[float] = []
                    for _ in range(3):
                        await ours()
                        theirs()
                    stream.synchronize()
                    await comm.barrier()
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        await ours()
                        t_ours.append(time.perf_counter() - t0)
                    await comm.barrier()
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        theirs()
                        stream.synchronize()
                        t_sync.append(time.perf_counter() - t0)
                    await comm.barrier()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        theirs()
                    stream.synchronize()
                    launch_rate = (time.perf_counter() - t0) / iters
                    await comm.barrier()
                    total = numel * 4
                    a, b = statistics.median(t_ours), statistics.median(t_sync)
                    rows.append({"op": op, "bytes": total, "iters": iters, "ours_us": a * 1e6,
                                 "torch_sync_us": b * 1e6, "torch_pipelined_us": launch_rate * 1e6,
                                 "ours_busbw": _busbw(op, total, world, a), "torch_busbw": _busbw(op, total, world, b),
                                 "torch_pipelined_busbw": _busbw(op, total, world, launch_rate),
                                 "path": comm.device_path})

    anyio.run(main, backend=spec.get("backend", "asyncio"))
    dist.destroy_process_group()
    Path(spec["out"]).write_text(json.dumps({"rank": rank, "rows": rows}))
    return 0


def run(*, world: int, sizes: list[int], ops: list[str], iters: int, backend: str, json_path: str | None,
        argv: list[str] | None = None) -> int:
    """The `bench nccl` command."""
    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = world or ngpu
    if world < 2 or world > ngpu:
        print(f"bench nccl needs 2..{ngpu} GPUs (one process each); asked for {world}", file=sys.stderr)
        return 2
    specs = [{"rank": r, "world": world, "port": free_port(), "torch_port": free_port(), "sizes": sizes,
              "ops": ops, "iters": iters, "backend": backend} for r in range(world)]
    for s in specs[1:]:
        s["port"], s["torch_port"] = specs[0]["port"], specs[0]["torch_port"]
    runs = launch("nccl", specs, timeout=600.0)
    rows = (runs[0].result or {}).get("rows", [])
    print(f"# {world} x {torch.cuda.get_device_name(0)}, one process per GPU, ours on {backend}; float32; medians")
    print("# time per op (us): ours awaited | torch + sync | torch pipelined; busbw GB/s; ratio ours/torch+sync")
    print(f"{'op':>14} {'size':>8} | {'ours':>9} {'t+sync':>9} {'t pipe':>9} | {'ours bw':>8} {'t bw':>8} "
          f"{'tpipe bw':>8} | {'bw ratio':>8} {'extra us':>8}")
    for r in rows:
        print(f"{r['op']:>14} {fmt_bytes(r['bytes']):>8} | {r['ours_us']:>9.1f} {r['torch_sync_us']:>9.1f} "
              f"{r['torch_pipelined_us']:>9.1f} | {r['ours_busbw']:>8.2f} {r['torch_busbw']:>8.2f} "
              f"{r['torch_pipelined_busbw']:>8.2f} | {r['ours_busbw'] / r['torch_busbw']:>8.3f} "
              f"{r['ours_us'] - r['torch_sync_us']:>8.1f}")
    if json_path:
        bench_allreduce.write_report(json_path, {"benchmark": "nccl", "command": argv,
                                                 "machine": bench_allreduce.machine_info(), "world": world,
                                                 "gpu": torch.cuda.get_device_name(0), "rows": rows, "all_ok": True})
    return 0
