"""A decode-loop-shaped overlap benchmark: matmuls on the compute stream, communication beside them.

Each step does a fixed amount of compute (bf16 matrix products, like a layer's
MLP) and one communication: an all_reduce of an activation-sized tensor between
ranks (`--mode all-reduce`, NCCL when each rank has its own GPU, host-staged
otherwise) or a KV-cache block offloaded to pinned host memory on the
communication stream (`--mode offload`, one process). Four loops in one run:
compute alone, communication alone, both one after the other (sequential), and
both in `comm.overlap()`. Efficiency = (sequential - overlapped) / min(compute,
comm): 1.0 when the shorter side is hidden entirely. `overlap()`'s own report
(hidden time over the spans it saw) is printed beside it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import bench_allreduce
from .demo import fmt_bytes, free_port, launch

TIMELINE_STEPS = 4  # overlapped steps per rank whose spans the report keeps


async def _loops(comm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .scheduler import device

    dev = torch.device("cuda", torch.cuda.current_device())
    hidden, matmuls, steps = int(spec["hidden"]), int(spec["matmuls"]), int(spec["steps"])
    a = torch.randn(int(spec["tokens"]), hidden, device=dev, dtype=torch.bfloat16)
    w = torch.randn(hidden, hidden, device=dev, dtype=torch.bfloat16) / hidden**0.5
    payload = torch.randn(int(spec["comm_bytes"]) // 2, device=dev, dtype=torch.bfloat16)
    host = torch.empty(payload.numel(), dtype=torch.bfloat16, pin_memory=True)
    compute_stream = torch.cuda.Stream(device=dev)  # type: ignore[no-untyped-call]
    mode = spec["mode"]

    async def compute() -> None:
        with torch.cuda.stream(compute_stream):
            x = a
            for _ in range(matmuls):
                x = torch.matmul(x, w)
        await device.wait_stream(compute_stream)

    async def communicate() -> None:
        if mode == "offload":
            s = device.comm_stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                host.copy_(payload, non_blocking=True)
            await device.wait_stream(s)
        else:
            await comm.all_reduce(payload, priority="high")

    async def seq_step() -> None:
        await compute()
        await communicate()

    efficiencies: list[float] = []
    timeline: list[dict[str, Any]] = []  # the last few overlapped steps' spans, for `--plot`

    async def ovl_step() -> None:
        async with comm.overlap() as ov:
            ov.start_comm(communicate)
            ov.start_compute(compute)
        efficiencies.append(ov.report.efficiency)
        timeline.append({"rank": comm.rank, "step": len(efficiencies) - 1, "wall": ov.report.wall_s,
                         **{kind: [list(s) for s in spans] for kind, spans in ov.spans().items()}})
        del timeline[:-TIMELINE_STEPS]

    async def timed(step: Any) -> float:
        for _ in range(3):
            await step()
        await comm.barrier()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            await step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict[str, Any] = {}
    for _ in range(int(spec["rounds"])):
        for name, step in (("compute", compute), ("comm", communicate), ("sequential", seq_step),
                           ("overlapped", ovl_step)):
            out.setdefault(name, []).append(await timed(step))
    res = {k: statistics.median(v) for k, v in out.items()}
    res["efficiency"] = (res["sequential"] - res["overlapped"]) / min(res["compute"], res["comm"])
    res["overlap_report_efficiency"] = statistics.median(efficiencies) if efficiencies else float("nan")
    res["path"] = comm.device_path if mode != "offload" else "offload on the comm stream"
    res["rounds"] = out
    res["timeline"] = timeline
    return res


def overlap_worker(spec: dict[str, Any]) -> int:
    """One rank (`_worker overlap SPEC`)."""
    import anyio
    import torch

    import sagellm_comm as sc

    rank, world = int(spec["rank"]), int(spec["world"])
    torch.cuda.set_device(rank % torch.cuda.device_count() if spec.get("gpu_per_rank") else 0)
    result: dict[str, Any] = {}

    async def main() -> None:
        async with sc.init_process_group(f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
                                         timeout=120) as comm:
            result.update(await _loops(comm, spec))

    anyio.run(main, backend=spec.get("backend", "asyncio"))
    Path(spec["out"]).write_text(json.dumps({"rank": rank, **result}))
    return 0


def run(*, mode: str, world: int, hidden: int, tokens: int, matmuls: int, comm_bytes: int, steps: int,
        rounds: int, backend: str, json_path: str | None, argv: list[str] | None = None) -> int:
    """The `bench overlap` command."""
    import torch

    if not torch.cuda.is_available():
        print("bench overlap needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    ngpu = torch.cuda.device_count()
    world = 1 if mode == "offload" else world
    spec = {"mode": mode, "world": world, "hidden": hidden, "tokens": tokens, "matmuls": matmuls,
            "comm_bytes": comm_bytes, "steps": steps, "rounds": rounds, "backend": backend,
            "gpu_per_rank": ngpu >= world, "port": free_port()}
    runs = launch("overlap", [{**spec, "rank": r} for r in range(world)], timeout=600.0)
    r = runs[0].result or {}
    r["timeline"] = [step for run in runs for step in (run.result or {}).get("timeline", [])]  # every rank's
    print(f"# {mode}, world {world} on {ngpu} GPU(s) ({r.get('path')}); {backend}; per-step medians of "
          f"{steps} steps x {rounds} rounds")
    print(f"# compute: {matmuls} x ({tokens}x{hidden}) @ ({hidden}x{hidden}) bf16; comm: "
          f"{fmt_bytes(comm_bytes)} {'all_reduce' if mode == 'all-reduce' else 'D2H offload'}")
    print(f"compute {r['compute'] * 1e3:.3f} ms | comm {r['comm'] * 1e3:.3f} ms | sequential "
          f"{r['sequential'] * 1e3:.3f} ms | overlapped {r['overlapped'] * 1e3:.3f} ms")
    print(f"overlap efficiency (sequential - overlapped) / min(compute, comm): {r['efficiency']:.3f}; "
          f"overlap() report: {r['overlap_report_efficiency']:.3f}; speedup "
          f"{r['sequential'] / r['overlapped']:.2f}x")
    if json_path:
        bench_allreduce.write_report(json_path, {"benchmark": "overlap", "command": argv,
                                                 "machine": bench_allreduce.machine_info(),
                                                 "settings": spec, "result": r, "all_ok": True})
    return 0
