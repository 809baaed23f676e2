"""GPU yardsticks in one run: completion latency, idle CPU, host overhead against NCCL, staging against PCIe.

- Completion latency: a kernel of known length, then how long after the GPU passed
  the event the awaiting task resumes. The GPU's finish is placed on the host clock
  per trial (an event synchronized just before the kernel is queued gives the
  offset, event timing gives the kernel's end), and the same trials with a bare
  `while not event.query()` loop are the peer: what polling costs at the least.
- CPU: process CPU time over a stretch with an open communicator and nothing in
  flight, and during a long wait the scheduler did not expect.
- Host overhead: `await comm.all_reduce(x)` on a small CUDA tensor against
  torch.distributed's `dist.all_reduce(x)` in the same process(es), back to back;
  torch both as a bare launch and followed by a stream synchronize (what an awaited
  op guarantees). World size 1 with backend="nccl" (so ours goes through NCCL too),
  and 2 when two GPUs are there.
- Host staging: one-way transfer of CUDA tensors between two processes on one GPU
  (no NCCL there: staged through pinned memory) against pinned H2D/D2H copies.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bench_allreduce
from .demo import fmt_bytes, free_port, launch


def _torch() -> Any:
    import torch

    return torch


def _sleep_cycles_per_us() -> float:
    torch = _torch()
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return float(10_000_000 / (start.elapsed_time(end) * 1e3))


def event_latency(durations_us: list[float], trials: int) -> list[dict[str, Any]]:
    """Median and p90 latency from the GPU's finish to the waiter resuming, ours vs a bare loop."""
    import anyio

    from .scheduler import device

    torch = _torch()
    cyc = _sleep_cycles_per_us()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def trial_start(d: float) -> float:
        torch.cuda.synchronize()
        e0.record()
        e0.synchronize()
        t0 = time.perf_counter()
        if d > 0:
            torch.cuda._sleep(int(d * cyc))
        e1.record()
        return t0

    def lateness(t0: float, t1: float) -> float:
        return float((t1 - t0 - e0.elapsed_time(e1) / 1e3) * 1e6)

    rows = []
    for d in durations_us:
        raw: list[float] = []
        for _ in range(trials):
            t0 = trial_start(d)
            while not e1.query():
                pass
            raw.append(lateness(t0, time.perf_counter()))
        ours: dict[str, list[float]] = {}
        for backend in ("asyncio", "trio"):
            lat: list[float] = []

            async def run(d: float, lat: list[float]) -> None:
                for i in range(trials + 20):  # the first waits teach it this kernel's length
                    t0 = trial_start(d)
                    await device.wait_event(e1, key=f"bench {d}")
                    t1 = time.perf_counter()
                    if i >= 20:
                        lat.append(lateness(t0, t1))

            try:
                anyio.run(run, d, lat, backend=backend)
            except ModuleNotFoundError:  # trio not installed
                continue
            ours[backend] = lat
        row: dict[str, Any] = {"kernel_us": d, "raw_median_us": statistics.median(raw),
                               "raw_p90_us": sorted(raw)[int(0.9 * len(raw))]}
        for b, lat in ours.items():
            row[f"{b}_median_us"] = statistics.median(lat)
            row[f"{b}_p90_us"] = sorted(lat)[int(0.9 * len(lat))]
        rows.append(row)
    return rows


def cpu_use(idle_seconds: float = 2.0, long_kernel_ms: float = 300.0) -> dict[str, float]:
    """Process CPU % with a world-1 communicator open and idle, and during one long unexpected wait."""
    import anyio

    import sagellm_comm as sc

    from .scheduler import device

    torch = _torch()
    cyc = _sleep_cycles_per_us()
    out: dict[str, float] = {}

    async def run() -> None:
        async with sc.init_process_group(f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1) as comm:
            x = torch.ones(4, device="cuda")
            await comm.all_reduce(x)
            c0, t0 = time.process_time(), time.perf_counter()
            await anyio.sleep(idle_seconds)
            out["idle_cpu_pct"] = 100 * (time.process_time() - c0) / (time.perf_counter() - t0)
            ev = torch.cuda.Event()
            torch.cuda._sleep(int(long_kernel_ms * 1e3 * cyc))
            ev.record()
            c0, t0 = time.process_time(), time.perf_counter()
            await device.wait_event(ev, key="cpu-use long wait")
            out["long_wait_cpu_pct"] = 100 * (time.process_time() - c0) / (time.perf_counter() - t0)
            out["long_wait_ms"] = (time.perf_counter() - t0) * 1e3

    anyio.run(run)
    return out


def overhead_worker(spec: dict[str, Any]) -> int:
    """One rank of the host-overhead comparison (`_worker gpu-overhead SPEC`)."""
    import anyio
    import torch
    import torch.distributed as dist

    import sagellm_comm as sc

    rank, world, iters = int(spec["rank"]), int(spec["world"]), int(spec["iters"])
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{spec['torch_port']}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", torch.cuda.current_device()))
    x = torch.ones(2, device="cuda")  # 8 bytes
    res: dict[str, list[float]] = {"torch_launch": [], "torch_sync": [], "ours": [], "lane_launch": []}

    def torch_blocks() -> None:
        for _ in range(50):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res["torch_launch"].append((t1 - t0) / iters * 1e6)
        stream = torch.cuda.current_stream()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
            stream.synchronize()
        res["torch_sync"].append((time.perf_counter() - t0) / iters * 1e6)

    async def main() -> None:
        async with sc.init_process_group(f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
                                         timeout=120, backend="nccl") as comm:
            for _ in range(50):
                await comm.all_reduce(x)
            for _ in range(int(spec["rounds"])):
                torch_blocks()
                await comm.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    await comm.all_reduce(x)
                res["ours"].append((time.perf_counter() - t0) / iters * 1e6)
                await comm.barrier()
                lane = comm._device_ops().open_lanes.get(0)
                if lane is not None:  # the decomposition: our process group's bare launch
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        lane.all_reduce(x, "sum")
                    res["lane_launch"].append((time.perf_counter() - t0) / iters * 1e6)
                    torch.cuda.synchronize()
                    await comm.barrier()
            res["path"] = [comm.device_path]  # type: ignore[list-item]

    anyio.run(main, backend=spec.get("backend", "asyncio"))
    dist.destroy_process_group()
    Path(spec["out"]).write_text(json.dumps({"rank": rank, **res}))
    return 0


def host_overhead(world: int, iters: int, rounds: int, backend: str) -> dict[str, Any]:
    port, tport = free_port(), free_port()
    specs = [{"rank": r, "world": world, "port": port, "torch_port": tport, "iters": iters, "rounds": rounds,
              "backend": backend} for r in range(world)]
    runs = launch("gpu-overhead", specs, timeout=300.0)
    r0 = runs[0].result or {}
    out: dict[str, Any] = {"world": world, "backend": backend, "path": r0.get("path", ["?"])[0]}
    for k in ("torch_launch", "torch_sync", "ours", "lane_launch"):
        out[f"{k}_us"] = statistics.median(r0.get(k) or [float("nan")])
    # ratios per round (the three blocks of a round run back to back), then the median
    rounds_ = list(zip(r0.get("ours") or [], r0.get("torch_sync") or [], r0.get("torch_launch") or [],
                       strict=False))
    out["ours_over_torch_sync"] = statistics.median([o / t for o, t, _ in rounds_] or [float("nan")])
    out["ours_over_torch_launch"] = statistics.median([o / t for o, _, t in rounds_] or [float("nan")])
    out["rounds"] = len(rounds_)
    return out


def pcie_gbps(nbytes: int) -> dict[str, float]:
    torch = _torch()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out = {}
    copies: list[tuple[str, Callable[[], Any]]] = [("h2d", lambda: dev.copy_(host, non_blocking=True)),
                                                   ("d2h", lambda: host.copy_(dev, non_blocking=True))]
    for name, fn in copies:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        out[name] = nbytes / statistics.median(times) / 1e9
    return out


def staged_p2p(sizes: list[int], backend: str) -> list[dict[str, Any]]:
    """One-way CUDA-to-CUDA transfers between two processes on one GPU (so no NCCL), against PCIe."""
    from .bench_transports import measure_p2p

    env_gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        os.environ["CUDA_VISIBLE_DEVICES"] = env_gpu.split(",")[0] if env_gpu else "0"
        rows = measure_p2p(None, sizes, 20, 1.0, backend, cuda=True)
    finally:
        if env_gpu is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_gpu
    out = []
    for row in rows:
        pcie = pcie_gbps(row["bytes"])
        out.append({**row, "pcie_h2d_gbps": pcie["h2d"], "pcie_d2h_gbps": pcie["d2h"],
                    "ratio_to_pcie": row["gbps"] / min(pcie["h2d"], pcie["d2h"])})
    return out


def run(*, durations_us: list[float], trials: int, overhead_iters: int, staged_sizes: list[int],
        backend: str, json_path: str | None, argv: list[str] | None = None) -> int:
    """The `bench gpu` command."""
    torch = _torch()
    if not torch.cuda.is_available():
        print("bench gpu needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    ngpu = torch.cuda.device_count()
    print(f"# {ngpu} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    lat = event_latency(durations_us, trials)
    lines = ["# completion latency: GPU finish -> awaiting task resumes (us), median / p90",
             f"{'kernel':>8} | {'bare loop':>15} | {'ours asyncio':>15} | {'ours trio':>15}"]
    for r in lat:
        cells = [f"{r.get(k + '_median_us', float('nan')):>6.2f} / {r.get(k + '_p90_us', float('nan')):>6.2f}"
                 for k in ("raw", "asyncio", "trio")]
        lines.append(f"{r['kernel_us']:>6.0f}us | " + " | ".join(f"{c:>15}" for c in cells))
    print("\n".join(lines), flush=True)
    cpu = cpu_use()
    print(f"# CPU: idle with a communicator open {cpu['idle_cpu_pct']:.2f}%; during an unexpected "
          f"{cpu['long_wait_ms']:.0f} ms wait {cpu['long_wait_cpu_pct']:.1f}%", flush=True)
    overheads = [host_overhead(1, overhead_iters, 20, backend)]
    if ngpu >= 2:
        overheads.append(host_overhead(2, overhead_iters, 20, backend))
    print("# host time per 8 B all_reduce on CUDA (us, medians of 20 interleaved rounds): "
          "torch launch only / torch + stream sync / ours awaited", flush=True)
    for o in overheads:
        print(f"world {o['world']} ({o['path']}): {o['torch_launch_us']:.1f} / {o['torch_sync_us']:.1f} / "
              f"{o['ours_us']:.1f}  ours/torch+sync {o['ours_over_torch_sync']:.2f}  "
              f"ours/torch launch {o['ours_over_torch_launch']:.2f} (median of per-round ratios); "
              f"our process group's bare launch {o['lane_launch_us']:.1f}", flush=True)
    staged = [{**row, "ring": "64 MiB"} for row in staged_p2p(staged_sizes, backend)]  # the default with CUDA
    os.environ["SAGELLM_COMM_SHM_RING_BYTES"] = str(4 << 20)  # the host-copy default, for comparison
    try:
        staged += [{**row, "ring": "4 MiB"} for row in staged_p2p(staged_sizes, backend)]
    finally:
        os.environ.pop("SAGELLM_COMM_SHM_RING_BYTES", None)
    print("# host-staged one-way CUDA->CUDA between 2 processes on one GPU (no NCCL) vs pinned PCIe copies")
    for s in staged:
        print(f"{fmt_bytes(s['bytes']):>8} ring {s.get('ring', 'default'):>7}: {s['gbps']:.2f} GB/s "
              f"({s['how']}), PCIe h2d {s['pcie_h2d_gbps']:.1f} "
              f"d2h {s['pcie_d2h_gbps']:.1f}  ratio {s['ratio_to_pcie']:.2f}  ok={s['ok']}", flush=True)
    ok = all(s["ok"] for s in staged)
    if json_path:
        bench_allreduce.write_report(json_path, {
            "benchmark": "gpu", "command": argv, "machine": bench_allreduce.machine_info(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(ngpu)],
            "event_latency": lat, "cpu": cpu, "host_overhead": overheads, "staged_p2p": staged, "all_ok": ok})
    return bench_allreduce.finish(ok)
