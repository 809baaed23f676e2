"""Transports side by side: all_reduce and point-to-point over tcp, shm and ucx, in one run.

One table answers "what does each transport give on this host": all_reduce
(latency at small sizes, bus bandwidth at large ones) against torch.distributed's
gloo, and one-way point-to-point bandwidth against a single-core memcpy of the
same bytes (the ceiling of any shared-memory path that copies once in and once
out: two copies of each byte in parallel on two cores, each at most memcpy speed).
Each library runs in its own fresh process set, one after the other.

Point-to-point method: rank 0 sends `size` bytes, rank 1 answers with 4 bytes once
they have all landed; the time is the median over iterations of that round, so it
includes one small-message latency (negligible from 1 MiB up).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import bench_allreduce
from .demo import fmt_bytes, free_port, launch

DEFAULT_AR_SIZES = "4,64K,1M,16M,64M"
DEFAULT_P2P_SIZES = "4,64K,1M,16M,64M"


def available_transports() -> list[str]:
    from .transports.shm import shm_supported

    out = ["tcp"]
    if shm_supported()[0]:
        out.append("shm")
    try:
        from .transports.ucx import ucx_available

        if ucx_available()[0]:
            out.append("ucx")
    except ImportError:
        pass
    return out


def memcpy_gbps(nbytes: int, seconds: float = 0.5) -> float:
    """Single-core copy into a warm buffer (numpy), median GB/s: the ceiling for a copy."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def p2p_worker(spec: dict[str, Any]) -> int:
    """One rank of the p2p benchmark (`sagellm-comm _worker p2p SPEC`)."""
    import anyio

    import sagellm_comm as sc

    if spec.get("cuda"):
        import torch  # before init: links dialed by a process with CUDA get rings sized for device copies

    async def main() -> list[dict[str, Any]]:
        url = f"tcp://127.0.0.1:{spec['port']}"
        rank = int(spec["rank"])
        rows = []
        async with sc.init_process_group(url, rank=rank, world_size=2, timeout=60.0,
                                         transport=spec.get("transport")) as comm:
            if spec.get("cuda"):  # CUDA tensors on both sides (bench gpu: host-staged transfers)
                def full(n: int, value: int) -> Any:
                    return torch.full((n,), value, dtype=torch.uint8, device="cuda")
            else:
                def full(n: int, value: int) -> Any:
                    return np.full(n, value, np.uint8)
            ack = full(4, 0)
            for nbytes in spec["sizes"]:
                buf = full(nbytes, 7 if rank == 0 else 0)
                budget = float(spec["max_seconds"])
                times: list[float] = []
                ok = True
                for i in range(int(spec["iters"])):
                    t0 = time.perf_counter()
                    if rank == 0:
                        await comm.send(buf, 1)
                        await comm.recv(ack, 1)
                    else:
                        await comm.recv(buf, 0)
                        ok = ok and bool(buf[0] == 7 and buf[-1] == 7)
                        await comm.send(ack, 0)
                    times.append(time.perf_counter() - t0)
                    flag = np.array([1.0 if sum(times) > budget and i >= 4 else 0.0])
                    await comm.all_reduce(flag, op="max")
                    if flag[0]:
                        break
                how = comm.stats.last("send" if rank == 0 else "recv")
                rows.append({"bytes": nbytes, "ok": ok, "iters": len(times), "times": times[1:] or times,
                             "how": how.algorithm if how else "?"})
        return rows

    rows = anyio.run(main, backend=spec.get("backend", "asyncio"))
    Path(spec["out"]).write_text(json.dumps({"rank": spec["rank"], "rows": rows}))
    return 0


def measure_p2p(transport: str | None, sizes: list[int], iters: int, max_seconds: float,
                backend: str, cuda: bool = False) -> list[dict[str, Any]]:
    port = free_port()
    specs = [{"rank": r, "world": 2, "port": port, "sizes": sizes, "iters": iters, "max_seconds": max_seconds,
              "transport": transport, "backend": backend, "cuda": cuda} for r in range(2)]
    runs = launch("p2p", specs, timeout=120.0 + len(sizes) * (4 * max_seconds + 30.0))
    out = []
    for row in runs[0].result["rows"] if runs[0].result else []:
        t = statistics.median(row["times"])
        ok = all(r.result and any(x["bytes"] == row["bytes"] and x["ok"] for x in r.result["rows"]) for r in runs)
        out.append({"bytes": row["bytes"], "time_us": t * 1e6, "gbps": row["bytes"] / t / 1e9,
                    "iters": row["iters"], "ok": ok, "how": row.get("how", "?")})
    return out


def _row(nbytes: int, measured: list[dict[str, Any]], bw_key: str) -> str:
    """One table line: the size, then time and bandwidth of each transport."""
    cells = [f"{m['time_us']:>9.1f} {m[bw_key]:>7.3f}" for m in measured]
    return f"{fmt_bytes(nbytes):>8} | " + " | ".join(cells)


def run(*, transports: list[str], ar_sizes: list[int], p2p_sizes: list[int], iters: int,
        max_seconds: float, backend: str, compare_gloo: bool, json_path: str | None,
        argv: list[str] | None = None) -> int:
    """The `bench transports` command."""
    ar: dict[str, list[dict[str, Any]]] = {}
    p2p: dict[str, list[dict[str, Any]]] = {}
    for t in transports:
        print(f"# measuring {t} ...", file=sys.stderr, flush=True)
        ar[t] = bench_allreduce.measure("ours", world=2, sizes=ar_sizes, iters=iters, warmup=5,
                                        max_seconds=max_seconds, backend=backend, transport=t)
        p2p[t] = measure_p2p(t, p2p_sizes, iters, max_seconds, backend)
    gloo = None
    if compare_gloo:
        print("# measuring gloo ...", file=sys.stderr, flush=True)
        gloo = bench_allreduce.measure("gloo", world=2, sizes=ar_sizes, iters=iters, warmup=5,
                                       max_seconds=max_seconds, backend="asyncio")
    memcpy = {n: memcpy_gbps(n) for n in p2p_sizes if n >= 64 * 1024}

    lines = [f"# 2 processes on this host, ours on {backend}; medians; GB/s = 1e9 B/s",
             "# all_reduce float32 sum: time(us) and busbw per transport, gloo in the same run"]
    head = f"{'size':>8} | " + " | ".join(f"{t + ' us':>9} {t + ' bw':>7}" for t in transports)
    if gloo:
        head += f" | {'gloo us':>9} {'gloo bw':>7} | " + " ".join(f"{t + '/gloo':>9}" for t in transports)
    lines.append(head)
    ok = all(m["ok"] for rows in (*ar.values(), *p2p.values()) for m in rows)
    for i, n in enumerate(ar_sizes):
        line = _row(n, [ar[t][i] for t in transports], "busbw_gbps")
        if gloo:
            g = gloo[i]
            ratios = [(ar[t][i]["busbw_gbps"] / g["busbw_gbps"]) if n >= 64 * 1024 else
                      (ar[t][i]["time_us"] / g["time_us"]) for t in transports]
            line += f" | {g['time_us']:>9.1f} {g['busbw_gbps']:>7.3f} | " + " ".join(f"{r:>9.2f}" for r in ratios)
        lines.append(line)
    if gloo:
        lines.append("# ours/gloo: time ratio below 64 KiB (lower is better), busbw ratio from 64 KiB (higher)")
    lines.append("# point-to-point one-way: time(us) per message (incl. a 4 B answer) and GB/s; memcpy = 1 core")
    head = f"{'size':>8} | " + " | ".join(f"{t + ' us':>9} {t + ' bw':>7}" for t in transports)
    head += f" | {'memcpy':>7} | " + " ".join(f"{t + '/cpy':>8}" for t in transports)
    lines.append(head)
    for i, n in enumerate(p2p_sizes):
        line = _row(n, [p2p[t][i] for t in transports], "gbps")
        if n in memcpy:
            line += f" | {memcpy[n]:>7.2f} | " + " ".join(f"{p2p[t][i]['gbps'] / memcpy[n]:>8.2f}" for t in transports)
        lines.append(line)
    print("\n".join(lines))
    if json_path:
        doc = {"benchmark": "transports", "command": argv, "machine": bench_allreduce.machine_info(),
               "settings": {"world": 2, "backend": backend, "transports": transports, "iters_max": iters,
                            "max_seconds_per_size": max_seconds},
               "all_reduce": {"ours": ar, "gloo": gloo}, "p2p": p2p,
               "memcpy_gbps": {str(k): v for k, v in memcpy.items()}, "all_ok": ok}
        bench_allreduce.write_report(json_path, doc)
    return bench_allreduce.finish(ok)
