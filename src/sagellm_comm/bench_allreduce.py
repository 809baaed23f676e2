"""all_reduce benchmark, nccl-tests style, against torch.distributed's gloo in the same run.

Why in the same run: on a shared or small box the absolute numbers drift from
minute to minute, so a ratio is only meaningful if both sides were measured
back to back on the same machine. Ours and gloo run in separate process sets,
one after the other, never at once (they would steal each other's cores).

Method (identical for both): float32 buffers, op sum; per size a correctness
check, warmup, then `iters` timed back-to-back calls. Each iteration's time is
the slowest rank's; the reported time is the median over iterations. Iteration
counts adapt down for big sizes (about `max_seconds` per size per library); the
ranks agree on the count with one untimed all_reduce(max), since a collective
loop must have the same length everywhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .demo import WorkersFailed, fmt_bytes, free_port, launch

__all__ = ["WorkersFailed", "measure", "parse_sizes", "run"]

MIN_ITERS = 3
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """'4,64K,1M' -> [4, 65536, 1048576] (binary units; whole float32 elements only)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        digits = part.rstrip("bBkKmMgGiI")
        unit = part[len(digits):].upper()
        if not digits or unit not in _UNITS:
            raise ValueError(f"bad size {part!r}: use bytes with an optional K, M or G suffix")
        n = int(float(digits) * _UNITS[unit])
        if n < 4 or n % 4:
            raise ValueError(f"size {part!r} = {n} B is not a whole number of float32 elements")
        sizes.append(n)
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def busbw_factor(world: int) -> float:
    """nccl-tests' all_reduce bus-bandwidth factor 2(n-1)/n: bytes each link really carries."""
    return 2 * (world - 1) / world if world > 1 else 1.0


def _plan(est_seconds: float, spec: dict[str, Any]) -> int:
    """How many timed iterations fit the per-size budget (never fewer than MIN_ITERS)."""
    budget, cap = float(spec["max_seconds"]), int(spec["iters"])
    if budget <= 0:
        return cap
    return max(min(MIN_ITERS, cap), min(cap, int(budget / max(est_seconds, 1e-7))))


def _progress(spec: dict[str, Any], done: int) -> None:
    """Rank 0 tells the parent (which draws the progress bar) how many sizes are done."""
    if spec["rank"] == 0 and spec.get("progress"):
        Path(spec["progress"]).write_text(str(done))


async def _run_sizes(spec: dict[str, Any], lib: Any) -> list[dict[str, Any]]:
    """The measurement loop, shared by both libraries so they are timed the same way.

    `lib` provides async `check(count) -> bool`, `once(x)` (one all_reduce),
    `agree_max(seconds) -> float`, and sync `make(count)`, `algorithm() -> str`.
    """
    rows = []
    for i, nbytes in enumerate(spec["sizes"]):
        count = nbytes // 4
        ok = await lib.check(count)
        x = lib.make(count)  # zeros stay zeros: no overflow or denormals over many sums
        t0 = time.perf_counter()
        await lib.once(x)  # first call: connections warm, scratch allocated, pages faulted
        est = await lib.agree_max(time.perf_counter() - t0)
        warm = max(0, min(int(spec["warmup"]) - 1, int(0.25 * float(spec["max_seconds"]) / est)))
        samples = []
        for _ in range(warm):
            t0 = time.perf_counter()
            await lib.once(x)
            samples.append(time.perf_counter() - t0)
        iters = _plan(await lib.agree_max(statistics.median(samples) if samples else est), spec)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            await lib.once(x)
            times.append(time.perf_counter() - t0)
        rows.append({"bytes": nbytes, "count": count, "ok": ok, "iters": iters,
                     "algorithm": lib.algorithm(), "times": times})
        _progress(spec, i + 1)
    return rows


class _Ours:
    """sagellm-comm on numpy float32 arrays (it reduces in place on the caller's memory)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    async def check(self, count: int) -> bool:
        n = self.comm.world_size
        x = np.full(count, self.comm.rank + 1, np.float32)
        await self.comm.all_reduce(x)
        return bool(np.all(x == n * (n + 1) / 2))

    def make(self, count: int) -> Any:
        return np.zeros(count, np.float32)

    async def once(self, x: Any) -> None:
        await self.comm.all_reduce(x)

    async def agree_max(self, seconds: float) -> float:
        v = np.array([seconds])
        await self.comm.all_reduce(v, op="max")
        return float(v[0])

    def algorithm(self) -> str:
        rec = self.comm.stats.last("all_reduce")
        return rec.algorithm if rec else "?"


class _Gloo:
    """torch.distributed gloo on torch float32 tensors; its calls block, so the awaits are
    plain calls (the wrapper costs well under a microsecond)."""

    def __init__(self, rank: int, world: int) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.rank, self.world = torch, dist, rank, world

    async def check(self, count: int) -> bool:
        x = self.torch.full((count,), float(self.rank + 1), dtype=self.torch.float32)
        self.dist.all_reduce(x)
        return bool(self.torch.all(x == self.world * (self.world + 1) / 2))

    def make(self, count: int) -> Any:
        return self.torch.zeros(count, dtype=self.torch.float32)

    async def once(self, x: Any) -> None:
        self.dist.all_reduce(x)

    async def agree_max(self, seconds: float) -> float:
        v = self.torch.tensor([seconds], dtype=self.torch.float64)
        self.dist.all_reduce(v, op=self.dist.ReduceOp.MAX)
        return float(v[0])

    def algorithm(self) -> str:
        return "gloo"


def ours_worker(spec: dict[str, Any]) -> int:
    """One rank of the sagellm-comm side (`sagellm-comm _worker ours SPEC`).

    The timed loop runs inside the event loop, so each time includes what a real
    caller pays: scheduling the op, the engine's tasks and the transport.
    """
    import anyio

    import sagellm_comm as sc

    async def main() -> list[dict[str, Any]]:
        url = f"tcp://127.0.0.1:{spec['port']}"
        async with sc.init_process_group(url, rank=int(spec["rank"]), world_size=int(spec["world"]),
                                         timeout=60.0, transport=spec.get("transport")) as comm:
            return await _run_sizes(spec, _Ours(comm))

    rows = anyio.run(main, backend=spec["backend"])
    Path(spec["out"]).write_text(json.dumps({"rank": spec["rank"], "rows": rows}))
    return 0


def gloo_worker(spec: dict[str, Any]) -> int:
    """One rank of the gloo side (`sagellm-comm _worker gloo SPEC`): torch.distributed, CPU."""
    import anyio
    import torch.distributed as dist

    rank, n = int(spec["rank"]), int(spec["world"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=n, timeout=_dt.timedelta(seconds=60))
    try:
        rows = anyio.run(_run_sizes, spec, _Gloo(rank, n))
    finally:
        dist.destroy_process_group()
    Path(spec["out"]).write_text(json.dumps({"rank": rank, "rows": rows}))
    return 0


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank): the spread that shows how noisy a median is."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _summarize(runs: list[Any], world: int) -> list[dict[str, Any]]:
    """Per size: the slowest rank's time per iteration, then the median over iterations."""
    per_rank = [run.result["rows"] for run in runs]
    out = []
    for rows in zip(*per_rank, strict=True):
        slowest = [max(ts) for ts in zip(*(r["times"] for r in rows), strict=True)]
        t = statistics.median(slowest)
        algbw = rows[0]["bytes"] / t / 1e9
        out.append({"bytes": rows[0]["bytes"], "count": rows[0]["count"], "iters": rows[0]["iters"],
                    "algorithm": rows[0]["algorithm"], "ok": all(r["ok"] for r in rows),
                    "time_us": t * 1e6, "min_time_us": min(slowest) * 1e6,
                    "p10_time_us": _pct(slowest, 10) * 1e6, "p90_time_us": _pct(slowest, 90) * 1e6,
                    "algbw_gbps": algbw, "busbw_gbps": algbw * busbw_factor(world),
                    "rank_median_us": [statistics.median(r["times"]) * 1e6 for r in rows]})
    return out


def measure(kind: str, *, world: int, sizes: list[int], iters: int, warmup: int,
            max_seconds: float, backend: str, timeout: float | None = None,
            on_size_done: Callable[[int], None] | None = None,
            transport: str | None = None) -> list[dict[str, Any]]:
    """Run one library's whole benchmark in a fresh set of `world` processes."""
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="sagellm-comm-progress-", delete=False) as f:
        progress = f.name
    seen = 0

    def poll() -> None:
        nonlocal seen
        try:
            done = int(Path(progress).read_text() or 0)
        except (OSError, ValueError):
            return
        if done > seen and on_size_done is not None:
            on_size_done(done - seen)
        seen = max(seen, done)

    port = free_port()
    specs = [{"rank": r, "world": world, "port": port, "sizes": sizes, "iters": iters,
              "warmup": warmup, "max_seconds": max_seconds, "backend": backend,
              "progress": progress, "transport": transport} for r in range(world)]
    limit = timeout if timeout is not None else 90.0 + len(sizes) * (4 * max_seconds + 30.0)
    try:
        runs = launch(kind, specs, timeout=limit, on_poll=poll)
        poll()
    finally:
        os.unlink(progress)
    return _summarize(runs, world)


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: the box and the versions."""
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": v("torch"), "numpy": np.__version__,
            "anyio": v("anyio"), "trio": v("trio"), "sagellm_comm": v("sagellm-comm"),
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def combine(ours: list[dict[str, Any]], gloo: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per size; busbw_ratio > 1 and time_ratio < 1 mean we are faster."""
    rows = []
    for i, o in enumerate(ours):
        g = gloo[i] if gloo else None
        rows.append({"size_bytes": o["bytes"], "count": o["count"], "ours": o, "gloo": g,
                     "busbw_ratio": o["busbw_gbps"] / g["busbw_gbps"] if g else None,
                     "time_ratio": o["time_us"] / g["time_us"] if g else None})
    return rows


def _cells(m: dict[str, Any]) -> str:
    return (f"{m['iters']:>5} {m['time_us']:>10.1f} {m['algbw_gbps']:>7.3f} "
            f"{m['busbw_gbps']:>7.3f}")


def format_table(rows: list[dict[str, Any]], world: int, backend: str) -> str:
    """nccl-tests style: one line per size, ours then gloo then the ratios."""
    has_gloo = any(r["gloo"] for r in rows)
    head = (f"# all_reduce float32 sum, {world} processes on 127.0.0.1, ours on {backend}; "
            f"time = median over iterations of the slowest rank; busbw = algbw * 2(n-1)/n")
    lib = f"{'iters':>5} {'time(us)':>10} {'algbw':>7} {'busbw':>7}"
    cols = f"{'size':>10} {'count':>9} | {lib}  {'algorithm':<18}"
    if has_gloo:
        cols += f" | {lib} | {'busbw x':>7} {'time x':>6}"
    title = f"{'':>21}| {'ours (sagellm-comm)':<53}"
    if has_gloo:
        title += f"| {'gloo (torch.distributed)':<33}| ours/gloo"
    lines = [head, "# bandwidth in GB/s (1e9 B/s)", title.rstrip(), cols.rstrip()]
    for r in rows:
        o, g = r["ours"], r["gloo"]
        line = (f"{fmt_bytes(r['size_bytes']):>10} {r['count']:>9} | {_cells(o)}  "
                f"{o['algorithm']:<18}")
        if g:
            line += f" | {_cells(g)} | {r['busbw_ratio']:>7.2f} {r['time_ratio']:>6.2f}"
        if not (o["ok"] and (g is None or g["ok"])):
            line += "  WRONG RESULT"
        lines.append(line.rstrip())
    return "\n".join(lines)


def run(*, world: int, sizes: list[int], iters: int, warmup: int, max_seconds: float,
        backend: str, compare: str | None, json_path: str | None, argv: list[str] | None = None,
        progress: bool = True, transport: str | None = None) -> int:
    """The `bench all-reduce` command: measure ours, then gloo, print, optionally write JSON."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev extra: without it, no bar
        tqdm = None
    libs = ["ours"] + (["gloo"] if compare == "gloo" else [])
    bar = (tqdm(total=len(sizes) * len(libs), file=sys.stderr, unit="size", leave=False,
                disable=not progress) if tqdm else None)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for lib in libs:
            if bar is not None:
                bar.set_description(f"all_reduce {lib}")
            results[lib] = measure(lib, world=world, sizes=sizes, iters=iters, warmup=warmup,
                                   max_seconds=max_seconds, backend=backend,
                                   on_size_done=bar.update if bar is not None else None,
                                   transport=transport if lib == "ours" else None)
    finally:
        if bar is not None:
            bar.close()
    rows = combine(results["ours"], results.get("gloo"))
    print(format_table(rows, world, backend))
    ok = all(r["ours"]["ok"] and (r["gloo"] is None or r["gloo"]["ok"]) for r in rows)
    if json_path:
        settings = {"world": world, "backend": backend, "transport": transport or "auto",
                    "dtype": "float32", "op": "sum",
                    "iters_max": iters, "warmup": warmup, "max_seconds_per_size": max_seconds,
                    "compare": compare,
                    "statistic": "median over iterations of the slowest rank"}
        write_report(json_path, {"benchmark": "all_reduce", "command": argv, "machine": machine_info(),
                                 "settings": settings, "results": rows, "all_ok": ok})
    return finish(ok)


def write_report(path: str, doc: dict[str, Any]) -> None:
    """A benchmark's JSON file: results beside the machine and the settings they came from."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"# wrote {path}")


def finish(ok: bool) -> int:
    """Exit code of a benchmark: a wrong result fails it, whatever the speed."""
    if not ok:
        print("# some results were WRONG", file=sys.stderr)
    return 0 if ok else 1
