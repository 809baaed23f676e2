"""`sagellm-comm bench cost-model`: how far the cost model's predictions are from measured times.

One process per rank joins through 127.0.0.1 over the chosen transport. For each
op and size, rank 0 times the op (after a warm-up; the median of several calls)
and compares it with the prediction that the selector recorded for the
algorithm that ran (`OpRecord.predicted`). Where an op has a second algorithm,
that one is forced (`CostModel.forcing`) and measured too, so the table shows
whether the model's choice was the faster one.

The model is the one `init_process_group` users get: the host's cached
calibration (`sagellm-comm topo --calibrate`) through `cost_model_for`, or
the built-in defaults if there is none (or with `--model defaults`).

Sizes are what the selector sees: the buffer for all_reduce and broadcast, the
gathered output for all_gather, the input (world_size blocks) for
reduce_scatter and all_to_all. Reductions run on float32 (sum); a size too small
for one float32 per rank is rounded up (the table shows the bytes that ran).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SIZES = "4,64,1K,16K,64K,256K,1M,4M,16M,64M"
DEFAULT_OPS = "all_reduce,all_gather,reduce_scatter,broadcast,all_to_all"


def _iters(predicted: float, max_seconds: float, cap: int) -> int:
    """Timed calls per point: a function of the (rank-identical) prediction, so ranks agree without talking."""
    return max(5, min(cap, int(max_seconds / max(predicted, 1e-6))))


async def _measure(comm: Any, op: str, nbytes: int, spec: dict[str, Any]) -> dict[str, Any]:
    from .topology.calibrate import make_call

    call = make_call(comm, op, nbytes)
    await comm.barrier()
    await call()  # first call: scratch allocated, pages touched
    rec = comm.stats.last(op)
    assert rec is not None
    iters = _iters(rec.predicted, float(spec["max_seconds"]), int(spec["iters"]))
    for _ in range(int(spec["warmup"])):
        await call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    rec = comm.stats.last(op)
    assert rec is not None
    return {"algorithm": rec.algorithm, "reason": rec.reason, "predicted": rec.predicted,
            "measured": statistics.median(times), "iters": iters, "p10": float(np.percentile(times, 10)),
            "p90": float(np.percentile(times, 90))}


def worker(spec: dict[str, Any]) -> int:
    """One rank (`python -m sagellm_comm.bench_cost _worker SPEC`)."""
    import anyio

    import sagellm_comm as sc

    from .topology.calibrate import actual_bytes, warm_up
    from .topology.cost import ALGORITHMS, cost_model_for

    async def main() -> dict[str, Any]:
        url = f"tcp://127.0.0.1:{spec['port']}"
        rows = []
        async with sc.init_process_group(url, rank=int(spec["rank"]), world_size=int(spec["world"]),
                                         timeout=300.0, transport=spec["transport"]) as comm:
            await warm_up(comm)
            calibrations = [spec["calibration"]] * comm.world_size if spec.get("calibration") else []
            model = cost_model_for(comm.link_classes(), calibrations, chunk_bytes=int(spec["chunk_bytes"]))
            classes = sorted({link.name for link in model.links})
            for op in spec["ops"]:
                for n in spec["sizes"]:
                    nbytes = actual_bytes(op, int(n), comm.world_size)
                    comm.cost_model = model
                    chosen = await _measure(comm, op, nbytes, spec)
                    row: dict[str, Any] = {"op": op, "bytes": nbytes, "requested": int(n), **chosen,
                                           "alternatives": []}
                    for alt in ALGORITHMS[op]:
                        if alt == chosen["algorithm"]:
                            continue
                        entry: dict[str, Any] = {"algorithm": alt,
                                                 "predicted": model.predict(op, alt, nbytes, comm.world_size)}
                        if spec.get("alternatives"):
                            comm.cost_model = model.forcing(op, alt)
                            forced = await _measure(comm, op, nbytes, spec)
                            entry.update(measured=forced["measured"], iters=forced["iters"],
                                         p10=forced["p10"], p90=forced["p90"])
                        row["alternatives"].append(entry)
                    rows.append(row)
            comm.cost_model = model
        return {"rows": rows, "link_classes": classes, "model_source": model.source, "fit": model.to_fit()}

    res = anyio.run(main, backend=spec.get("backend", "asyncio"))
    Path(spec["out"]).write_text(json.dumps({"rank": spec["rank"], **res}))
    return 0


# -- the report ----------------------------------------------------------------------------------
def _err(pred: float, meas: float) -> float:
    return pred / meas - 1.0 if meas > 0 else float("nan")


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def _loads(v: Any) -> str:
    return " ".join(f"{x:.2f}" for x in v) if v else "?"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |error| of the chosen algorithms' predictions, overall and per op; and with alternatives."""
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    chosen = [abs(_err(r["predicted"], r["measured"])) for r in rows]
    per_op: dict[str, float | None] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        per_op[op] = med([abs(_err(r["predicted"], r["measured"])) for r in rows if r["op"] == op])
    alts = [abs(_err(a["predicted"], a["measured"])) for r in rows for a in r["alternatives"] if "measured" in a]
    right = wrong = 0
    for r in rows:
        for a in r["alternatives"]:
            if "measured" in a:
                if r["measured"] <= a["measured"]:
                    right += 1
                else:
                    wrong += 1
    return {"median_abs_error": med(chosen), "per_op": per_op, "points": len(chosen),
            "median_abs_error_with_alternatives": med(chosen + alts), "alternative_points": len(alts),
            "choice_faster": right, "choice_slower": wrong}


def format_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    from .demo import fmt_bytes

    lines = [f"# cost model vs measured: {settings['world']} processes on 127.0.0.1 over {settings['transport']}, "
             f"{settings['backend']}; rank 0's median of each op's timed calls; model: {settings['model']}",
             f"# load average before/after (1, 5, 15 min): {_loads(settings.get('loadavg_before'))} / "
             f"{_loads(settings.get('loadavg_after'))}",
             "# err = predicted / measured - 1; alt: the other algorithm (forced), predicted and measured",
             f"{'op':<15} {'size':>8} {'algorithm':<19} {'pred us':>11} {'meas us':>11} {'err':>7} | "
             f"{'alternative':<19} {'pred us':>11} {'meas us':>11} {'err':>7}  choice"]
    for r in rows:
        line = (f"{r['op']:<15} {fmt_bytes(r['bytes']):>8} {r['algorithm']:<19} {_us(r['predicted']):>11} "
                f"{_us(r['measured']):>11} {_err(r['predicted'], r['measured']) * 100:>+6.1f}%")
        for a in r["alternatives"]:
            meas = a.get("measured")
            line += (f" | {a['algorithm']:<19} {_us(a['predicted']):>11} "
                     + (f"{_us(meas):>11} {_err(a['predicted'], meas) * 100:>+6.1f}%" if meas else f"{'':>19}"))
            if meas:
                line += "  ok" if r["measured"] <= meas else "  SLOWER"
        lines.append(line)
    s = summarize(rows)
    lines.append(f"# median |error| of the chosen algorithm: {s['median_abs_error'] * 100:.1f} % over "
                 f"{s['points']} points; per op: "
                 + ", ".join(f"{op} {v * 100:.1f} %" for op, v in s["per_op"].items() if v is not None))
    if s["alternative_points"]:
        lines.append(f"# with the forced alternatives: {s['median_abs_error_with_alternatives'] * 100:.1f} % over "
                     f"{s['points'] + s['alternative_points']} points; the model's choice was the faster one "
                     f"{s['choice_faster']} of {s['choice_faster'] + s['choice_slower']} times")
    return "\n".join(lines)


def measure(*, world: int, transport: str, sizes: list[int], ops: list[str], iters: int, warmup: int,
            max_seconds: float, backend: str, alternatives: bool, calibration: dict[str, Any] | None,
            chunk_bytes: int) -> dict[str, Any]:
    from .demo import free_port
    from .topology.calibrate import launch_module

    port = free_port()
    specs = [{"rank": r, "world": world, "port": port, "sizes": sizes, "ops": ops, "iters": iters,
              "warmup": warmup, "max_seconds": max_seconds, "backend": backend, "transport": transport,
              "alternatives": alternatives, "calibration": calibration, "chunk_bytes": chunk_bytes}
             for r in range(world)]
    points = len(sizes) * len(ops) * (2 if alternatives else 1)
    runs = launch_module("sagellm_comm.bench_cost", specs, timeout=120.0 + points * (3 * max_seconds + 10.0))
    res: dict[str, Any] | None = runs[0].result
    assert res is not None
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """`sagellm-comm bench cost-model` (the lead wires it) and `python bench/cost_model.py`."""
    from . import bench_output

    ap = argparse.ArgumentParser(prog="sagellm-comm bench cost-model",
                                 description="Predicted against measured time of every collective, per size.")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--transport", default="shm", help="shm, tcp, ucx or auto")
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--ops", default=DEFAULT_OPS)
    ap.add_argument("--iters", type=int, default=100, help="timed calls per point, at most")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=0.3, help="about this many timed seconds per point")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--no-alternatives", action="store_true", help="do not force and time the other algorithm")
    ap.add_argument("--model", default="auto", choices=["auto", "defaults", "calibration"],
                    help="auto: this host's cached calibration if there is one, else the built-in defaults")
    ap.add_argument("--json", help="write rows, summary, model and machine here")
    bench_output.add_args(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    return bench_output.run(args.trace, args.plot, args.json, lambda json_path: _run(args, argv, json_path))


def _run(args: Any, argv: Sequence[str] | None, json_path: str | None) -> int:
    from .bench_allreduce import machine_info, parse_sizes, write_report
    from .group import DEFAULT_CHUNK_BYTES
    from .topology import calibrate

    cal = None if args.model == "defaults" else calibrate.load()
    if args.model == "calibration" and cal is None:
        print(f"no calibration at {calibrate.cache_path()}; run `sagellm-comm topo --calibrate`", file=sys.stderr)
        return 2
    sizes = parse_sizes(args.sizes)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    load_before = os.getloadavg()
    res = measure(world=args.world, transport=args.transport, sizes=sizes, ops=ops, iters=args.iters,
                  warmup=args.warmup, max_seconds=args.max_seconds, backend=args.backend,
                  alternatives=not args.no_alternatives, calibration=cal, chunk_bytes=DEFAULT_CHUNK_BYTES)
    model_desc = (f"calibration of {cal.get('date', '?')}" if cal else "built-in defaults") + \
        f" ({', '.join(res['link_classes'])})"
    settings = {"world": args.world, "transport": args.transport, "backend": args.backend, "model": model_desc,
                "iters_max": args.iters, "warmup": args.warmup, "max_seconds_per_point": args.max_seconds,
                "statistic": "rank 0's median over timed calls", "chunk_bytes": DEFAULT_CHUNK_BYTES,
                "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(format_table(res["rows"], settings))
    if json_path:
        write_report(json_path, {"benchmark": "cost_model", "command": list(argv or sys.argv[1:]),
                                 "machine": machine_info(), "settings": settings, "summary": summarize(res["rows"]),
                                 "rows": res["rows"], "model_fit": res["fit"]})
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        sys.exit(worker(json.loads(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))
