"""`sagellm-comm topo --calibrate`: measure each link class and fit the cost model's constants.

What it measures, per transport (2 local processes joined through 127.0.0.1, the
same way `bench transports` starts them; inproc: 2 simulated ranks in this
process), for every size of the list (4 B to 64 MiB by default):

- one-way: a ping-pong of `n` bytes each way; one-way = round trip / 2;
- exchange: both ranks send `n` bytes to each other at once (receive posted
  first, then send, then wait: one step of recursive doubling or of a 2-rank
  ring), back to back as a loop of collectives runs. On a box where every rank
  has one core, an exchange costs each rank both the copy out and the copy in,
  so it is not simply the one-way time (and for small messages it can be less:
  the two sides' latencies overlap);
- every algorithm (forced), at its smallest size: minus what the fitted curves
  give its messages and reductions, that is the algorithm's base cost;
- barrier: back-to-back `comm.barrier()`; minus an empty exchange, the generic
  fixed cost of a call (used where no base was measured).

Messages go through the progress engine exactly as a collective's steps do
(post, send, wait), not through `comm.send`, whose per-call record is not part
of a collective step. Buffers are written before use (untouched memory would
read as the shared zero page). Each series runs twice, the passes spread over
the probe, and a point is the median of the pooled repeats on rank 0, so that a
burst of load elsewhere on the host lands in one pass, not in a whole point.

And in this process: the in-place reduction (`reduce_into`, float32 sum), a
plain copy per byte at several sizes, and the ring's background sender.

Each curve is fitted with `cost.fit_curve` (continuous piecewise-linear in n,
see cost.py for why one line does not fit), and the whole thing is cached per
host at `$XDG_CACHE_HOME/sagellm-comm/calibration-<host key>.json` (default
`~/.cache`; the host key of `transports.shm.host_key`: this boot of this machine
in this network namespace), with the date, the versions, the load average, the
raw points, the fit and each point's fit error. Calibrate on a quiet host: with
other work on the cores, shared-memory latencies grow tenfold.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import cost

DEFAULT_SIZES = [4, 16, 64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20,
                 16 << 20, 64 << 20]
DEFAULT_TRANSPORTS = ("shm", "tcp")
DEFAULT_BUDGET = 12.0  # seconds, roughly: scales the repeats (shm + tcp took 7.5 s on the 2-vCPU box)
SCHEMA = 1


# -- where the cache lives ------------------------------------------------------------------
def host_key() -> str:
    from ..transports.shm import host_key as shm_host_key

    return shm_host_key()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sagellm-comm"


def cache_path(key: str | None = None) -> Path:
    return cache_dir() / f"calibration-{key or host_key()}.json"


def load(host_key: str | None = None) -> dict[str, Any] | None:
    """The cached calibration of this host (or of `host_key`), or None if there is none or it is unreadable."""
    path = cache_path(host_key)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("fit"), dict):
        return None
    return doc


# -- the probe on one pair of ranks ---------------------------------------------------------
def _reps(nbytes: int, scale: float) -> int:
    """Repeats per size and pass: a pure function of the size, so both ranks run the same loop without talking."""
    return max(4, min(int(100 * scale), int(scale * (1 << 25) / max(nbytes, 1 << 16))))


PASSES = 2  # every series is measured this many times, spread over the probe, and the samples pooled


async def warm_up(comm: Any, seconds: float = 0.3) -> None:
    """Back-to-back barriers for a while: connections, engine tasks and caches settle before timing."""
    end = time.perf_counter() + seconds
    while True:
        flag = np.array([1.0 if time.perf_counter() > end else 0.0])
        await comm.all_reduce(flag, op="max")  # both ranks stop together
        if flag[0]:
            return


async def probe(comm: Any, sizes: Sequence[int], scale: float) -> dict[str, Any]:
    """Measure one-way, exchange, barrier and each algorithm's time between ranks 0 and 1 (both call it).

    Every series runs PASSES times, the passes spread over the probe, and the
    samples are pooled: a burst of load on the host lands in one pass, not in
    every sample of a point. Returns rank 0's raw times in seconds:
    {"oneway": {n: [..]}, "exchange": {n: [..]}, "barrier": [..], "algorithms": {...}}.
    """
    from ..buffers import bytes_view
    from ..wire import Fingerprint

    eng = comm._engine
    rank = comm.rank
    peer_global = comm.global_ranks[1 - rank]
    gid = comm.group_id
    out: dict[str, Any] = {"oneway": {n: [] for n in sizes}, "exchange": {n: [] for n in sizes}, "barrier": [],
                           "algorithms": {}}
    ping, swap = (gid, -1, 1 << 30), (gid, -1, (1 << 30) + 1)  # p2p channels clear of a caller's tags
    await warm_up(comm)

    async def p2p(n: int) -> None:
        a = touched(n, np.uint8, 7)
        b = touched(n, np.uint8)
        fp = Fingerprint(-1, "p2p", "uint8", (n,))
        ra, rb = bytes_view(a), bytes_view(b)
        reps = _reps(n, scale)
        warm = 2
        for i in range(warm + reps):
            t0 = time.perf_counter()
            if rank == 0:
                back = eng.post(peer_global, ping, rb, fp)
                await eng.send(peer_global, ping, ra, fp)
                await back.wait()
            else:
                got = eng.post(peer_global, ping, rb, fp)
                await got.wait()
                await eng.send(peer_global, ping, ra, fp)
            if i >= warm:
                out["oneway"][n].append((time.perf_counter() - t0) / 2)
        for i in range(warm + reps):
            # back to back, as a loop of collectives runs: a rank that is ahead finds the
            # peer's data already there, so the time is each side's own work, not a wake-up
            t0 = time.perf_counter()
            got = eng.post(peer_global, swap, rb, fp)
            await eng.send(peer_global, swap, ra, fp)
            await got.wait()
            if i >= warm:
                out["exchange"][n].append(time.perf_counter() - t0)

    for pass_ in range(PASSES):
        for n in sizes if pass_ % 2 == 0 else reversed(sizes):
            await p2p(n)
        for i in range(10 + int(100 * scale)):
            t0 = time.perf_counter()
            await comm.barrier()
            if i >= 10:
                out["barrier"].append(time.perf_counter() - t0)
        for key, res in (await probe_algorithms(comm, scale)).items():
            got_alg = out["algorithms"].setdefault(key, {"bytes": res["bytes"], "times": []})
            got_alg["times"].extend(res["times"])
    return out


def tiny_bytes(op: str, world: int) -> int:
    """The smallest size an op runs at in the probe and the benchmark (float32 for reductions)."""
    return actual_bytes(op, 4, world)


def actual_bytes(op: str, n: int, world: int) -> int:
    """Requested size n rounded up to what runs: whole float32 elements for reductions, whole blocks per rank."""
    unit = 4 if op in ("all_reduce", "reduce_scatter") else 1
    per = world if op in ("all_gather", "reduce_scatter", "all_to_all") else 1
    step = unit * per
    return max(step, -(-n // step) * step) if op != "barrier" else 0


def touched(shape: Any, dtype: Any, value: int = 0) -> np.ndarray[Any, Any]:
    """An array whose pages are all written: untouched memory reads as the kernel's shared zero
    page, which no real tensor does, and would make sends of it look faster (or fault on first use)."""
    arr = np.empty(shape, dtype)
    arr.fill(value)
    return arr


def make_call(comm: Any, op: str, nbytes: int) -> Callable[[], Awaitable[Any]]:
    """One call of `op` on `nbytes` (as the selector counts them), on buffers made once and reused.

    Reductions: float32 zeros (they stay zeros), sum. Outputs are passed in
    (`out=`), as a caller that reuses memory does, so no call pays for fresh pages.
    """
    world, rank = comm.world_size, comm.rank
    if op == "all_reduce":
        x = touched(nbytes // 4, np.float32)
        return lambda: comm.all_reduce(x)
    if op == "all_gather":
        g = touched(nbytes // world, np.uint8, rank)
        go = touched((world, nbytes // world), np.uint8)
        return lambda: comm.all_gather(g, out=go)
    if op == "reduce_scatter":
        r = touched(nbytes // 4, np.float32)
        ro = touched(nbytes // 4 // world, np.float32)
        return lambda: comm.reduce_scatter(r, out=ro)
    if op == "broadcast":
        bx = touched(nbytes, np.uint8, 3)
        return lambda: comm.broadcast(bx, root=0)
    if op == "all_to_all":
        a = touched(nbytes, np.uint8, rank)
        ao = touched(nbytes, np.uint8)
        return lambda: comm.all_to_all(a, out=ao)
    if op == "barrier":
        return lambda: comm.barrier()
    raise ValueError(f"unknown op {op!r}")


async def probe_algorithms(comm: Any, scale: float) -> dict[str, Any]:
    """Every algorithm, forced, at its smallest size: {"op/algorithm": {"bytes": n, "times": [...]}}.

    What these cost beyond their messages is each algorithm's fixed (base) cost.
    """
    from .cost import ALGORITHMS, default_model

    model = comm.cost_model or default_model(comm.link_classes())
    out: dict[str, Any] = {}
    try:
        for op, algos in ALGORITHMS.items():
            nbytes = tiny_bytes(op, comm.world_size)
            for algo in algos:
                comm.cost_model = model.forcing(op, algo)
                call = make_call(comm, op, nbytes)
                times = []
                for i in range(5 + max(20, int(75 * scale))):
                    t0 = time.perf_counter()
                    await call()
                    if i >= 5:
                        times.append(time.perf_counter() - t0)
                out[f"{op}/{algo}"] = {"bytes": nbytes, "times": times}
    finally:
        comm.cost_model = model
    return out


def worker(spec: dict[str, Any]) -> int:
    """One rank of the link probe (`python -m sagellm_comm.topology.calibrate _worker SPEC`)."""
    import anyio

    import sagellm_comm as sc

    async def main() -> dict[str, Any]:
        url = f"tcp://127.0.0.1:{spec['port']}"
        async with sc.init_process_group(url, rank=int(spec["rank"]), world_size=2, timeout=120.0,
                                         transport=spec["transport"]) as comm:
            res = await probe(comm, spec["sizes"], float(spec["scale"]))
            res["transport_seen"] = comm.transport
            return res

    res = anyio.run(main, backend=spec.get("backend", "asyncio"))
    Path(spec["out"]).write_text(json.dumps({"rank": spec["rank"], **res}))
    return 0


def launch_module(module: str, specs: list[dict[str, Any]], *, timeout: float) -> list[Any]:
    """`demo.launch` for workers that live in a module of their own (`python -m MODULE _worker SPEC`)."""
    from ..demo import launch

    return launch(module, specs, timeout=timeout, module=module)


def measure_link(transport: str, sizes: Sequence[int], scale: float, backend: str = "asyncio") -> dict[str, Any]:
    """Rank 0's raw probe over `transport` between 2 fresh local processes."""
    from ..demo import free_port

    port = free_port()
    specs = [{"rank": r, "port": port, "sizes": list(sizes), "scale": scale, "transport": transport,
              "backend": backend} for r in range(2)]
    runs = launch_module(__name__ if __name__ != "__main__" else "sagellm_comm.topology.calibrate", specs,
                         timeout=60.0 + 30.0 * len(sizes) * max(1.0, scale))
    res: dict[str, Any] | None = runs[0].result
    assert res is not None
    return res


def measure_inproc(sizes: Sequence[int], scale: float, backend: str = "asyncio") -> dict[str, Any]:
    """The probe between 2 simulated ranks of this process (the inproc class: one thread runs both)."""
    import anyio

    from ..testing import run_ranks

    async def main() -> list[Any]:
        return await run_ranks(2, probe, list(sizes), scale)

    results = anyio.run(main, backend=backend)
    res: dict[str, Any] = results[0]
    return res


def measure_compute(sizes: Sequence[int], scale: float) -> dict[str, dict[int, list[float]]]:
    """Per size: the in-place float32 sum (`reduce_into`, as the collectives call it) and a copy."""
    from ..buffers import reduce_into

    out: dict[str, dict[int, list[float]]] = {"reduce": {}, "copy": {}}
    for n in sizes:
        count = max(1, n // 4)
        acc = touched(count, np.float32)
        other = touched(count, np.float32)
        reps = 2 * _reps(n, scale)
        for name in ("reduce", "copy"):
            times = []
            for i in range(2 + reps):
                t0 = time.perf_counter()
                if name == "reduce":
                    reduce_into(acc, other, "sum")
                else:
                    np.copyto(acc, other)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            out[name][n] = times
    return out



def measure_sender(reps: int = 300, backend: str = "asyncio") -> list[float]:
    """Seconds to open and close the background sender that ring and tree pipeline through (no messages)."""
    import anyio

    from ..collectives.context import OpContext

    class _Quiet:
        async def send(self, dst: int, tag: int, raw: memoryview) -> None:
            pass

    async def main() -> list[float]:
        fake: Any = _Quiet()
        times = []
        for i in range(reps + 20):
            t0 = time.perf_counter()
            async with OpContext.sender(fake):
                pass
            if i >= 20:
                times.append(time.perf_counter() - t0)
        return times

    res: list[float] = anyio.run(main, backend=backend)
    return res


# -- fitting and the cache -------------------------------------------------------------------
LINK_OF_TRANSPORT = {"shm": "shm", "tcp": "tcp_loopback", "inproc": "inproc", "ucx": "ucx"}


def _median_points(by_size: dict[Any, list[float]]) -> list[tuple[int, float]]:
    return sorted((int(n), statistics.median(ts)) for n, ts in by_size.items())


def fit_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The "fit" section (see `cost.CostModel.to_fit`) and each point's relative error, from raw medians.

    raw: {"links": {class: {"oneway": [[n, s], ..], "exchange": [..], "barrier": s}},
          "reduce": [[n, s], ..], "copy": [..], "sender": s}
    """
    links: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    calls = []
    red, er = cost.fit_curve(raw["reduce"])
    cpy, ec = cost.fit_curve(raw["copy"])
    errors["reduce"], errors["copy"] = er, ec
    for name, r in raw["links"].items():
        one, e1 = cost.fit_curve(r["oneway"])
        exch, e2 = cost.fit_curve(r["exchange"])
        algos = r.get("algorithms", {})
        # each algorithm's base: its time at the smallest size minus what the model gives its messages
        bare = cost.CostModel(links=(cost.LinkCost(name, one, exch, tuple((k, 0.0) for k in sorted(algos))),),
                              reduce=red, copy=cpy, call=0.0, sender=0.0)
        base = []
        for key, (nbytes, seconds) in sorted(algos.items()):
            op, algo = key.split("/")
            base.append((key, float(seconds) - bare.predict(op, algo, int(nbytes), 2)))
        links[name] = cost.LinkCost(name, one, exch, tuple(base)).to_json()
        errors[name] = {"oneway": e1, "exchange": e2}
        if r.get("barrier"):
            calls.append(max(0.0, float(r["barrier"]) - exch(0)))
    call = statistics.median(calls) if calls else float(cost.DEFAULT_FIT["call"])
    fit = {"links": links, "reduce": red.to_json(), "copy": cpy.to_json(), "call": call,
           "sender": float(raw.get("sender", cost.DEFAULT_FIT["sender"]))}
    return {"fit": fit, "errors": errors}


def _versions() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0], "numpy": np.__version__, "anyio": v("anyio"),
            "sagellm_comm": v("sagellm-comm"), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def run(transports: Sequence[str] = DEFAULT_TRANSPORTS, sizes: Sequence[int] = tuple(DEFAULT_SIZES),
        seconds_budget: float = DEFAULT_BUDGET, *, backend: str = "asyncio", write: bool = True,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe every transport, fit, and (with `write`) cache the result for this host. Returns the document.

    transports: any of shm, tcp (measured as tcp_loopback), ucx, inproc. The
    budget scales the repeats per size (process start-up comes on top).
    """
    import socket

    scale = max(0.05, seconds_budget / (2.0 * max(1, len(transports))))
    load_before = os.getloadavg()
    raw: dict[str, Any] = {"links": {}, "repeats": {}}
    for t in transports:
        if t not in LINK_OF_TRANSPORT:
            raise ValueError(f"cannot calibrate transport {t!r}; use {', '.join(LINK_OF_TRANSPORT)}")
        if log:
            log(f"# probing {t} ...")
        res = measure_inproc(sizes, scale, backend) if t == "inproc" else measure_link(t, sizes, scale, backend)
        raw["links"][LINK_OF_TRANSPORT[t]] = {
            "oneway": _median_points(res["oneway"]), "exchange": _median_points(res["exchange"]),
            "barrier": statistics.median(res["barrier"]) if res["barrier"] else None,
            "algorithms": {k: [v["bytes"], statistics.median(v["times"])] for k, v in res["algorithms"].items()}}
        raw["repeats"][LINK_OF_TRANSPORT[t]] = {str(n): len(ts) for n, ts in res["oneway"].items()}
    if log:
        log("# measuring reduction, copy and the sender ...")
    comp = measure_compute(sizes, scale)
    raw["reduce"] = _median_points(comp["reduce"])
    raw["copy"] = _median_points(comp["copy"])
    raw["sender"] = statistics.median(measure_sender(backend=backend))
    fitted = fit_raw(raw)
    key = host_key()
    doc: dict[str, Any] = {
        "schema": SCHEMA, "host_key": key, "hostname": socket.gethostname(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "versions": _versions(),
        "settings": {"transports": list(transports), "sizes": list(sizes), "seconds_budget": seconds_budget,
                     "backend": backend, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "raw": raw, "fit": fitted["fit"], "fit_errors": fitted["errors"]}
    if write:
        path = cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
        doc["path"] = str(path)
    return doc


# -- the command ------------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def format_report(doc: dict[str, Any]) -> str:
    """The fitted constants per class and curve, then every point's fit error."""
    fit, raw, errs = doc["fit"], doc["raw"], doc.get("fit_errors", {})
    lines = [f"# calibration of host {doc['host_key']} ({doc.get('hostname', '?')}), {doc.get('date', '?')}",
             "# each curve: t(n) = alpha + beta * n within a band (bands join continuously)",
             f"{'class':<13} {'curve':<9} {'from':>8} {'alpha us':>10} {'beta ns/B':>10} {'GB/s':>8}"]

    def curve_rows(name: str, label: str, bands: list[list[float]]) -> None:
        for lo, a, b in bands:
            gbps = f"{1 / b / 1e9:8.2f}" if b > 0 else f"{'inf':>8}"
            lines.append(f"{name:<13} {label:<9} {_fmt_bytes(int(lo)):>8} {a * 1e6:>10.2f} {b * 1e9:>10.4f} {gbps}")

    for name, link in fit["links"].items():
        curve_rows(name, "one-way", link["oneway"])
        curve_rows(name, "exchange", link["exchange"])
    curve_rows("host", "reduce", fit["reduce"])
    curve_rows("host", "copy", fit["copy"])
    lines.append(f"# fixed: call {fit['call'] * 1e6:.1f} us (barrier minus an empty exchange), "
                 f"sender {fit['sender'] * 1e6:.1f} us (ring/tree background sender)")
    keys = sorted({k for link in fit["links"].values() for k in link.get("base", {})})
    if keys:
        lines.append("# base cost of each algorithm (us): its time at the smallest size minus its messages")
        lines.append(f"{'class':<13} " + " ".join(f"{k.replace('/', ' ')[:24]:>24}" for k in keys))
        for name, link in fit["links"].items():
            lines.append(f"{name:<13} " + " ".join(f"{link.get('base', {}).get(k, float('nan')) * 1e6:>24.1f}"
                                                   for k in keys))
    cols = [(name, curve) for name in raw["links"] for curve in ("oneway", "exchange")]
    lines.append("# fit error per point: measured us, then fitted/measured - 1 in %")
    lines.append(f"{'size':>8} | " + " | ".join(f"{(n + ' ' + c)[:19]:>19}" for n, c in cols)
                 + f" | {'reduce':>15} | {'copy':>15}")
    sizes = [int(n) for n, _ in raw["reduce"]]
    for i, n in enumerate(sizes):
        cells = []
        for name, curve in cols:
            pts = raw["links"][name][curve]
            e = errs.get(name, {}).get(curve, [])
            cells.append(f"{pts[i][1] * 1e6:>11.1f} {e[i] * 100:>+6.1f}%" if i < len(pts) and i < len(e)
                         else f"{'':>19}")
        for what in ("reduce", "copy"):
            pts, e = raw[what], errs.get(what, [])
            cells.append(f"{pts[i][1] * 1e6:>8.1f} {e[i] * 100:>+5.1f}%" if i < len(e) else f"{'':>15}")
        lines.append(f"{_fmt_bytes(n):>8} | " + " | ".join(cells))
    all_errs = [abs(x) for name in raw["links"] for c in ("oneway", "exchange") for x in errs.get(name, {}).get(c, [])]
    if all_errs:
        lines.append(f"# link fit error: median {statistics.median(all_errs) * 100:.1f} %, "
                     f"max {max(all_errs) * 100:.1f} % over {len(all_errs)} points")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`sagellm-comm topo --calibrate` (the lead wires it): probe, fit, cache, print."""
    from ..bench_allreduce import parse_sizes

    ap = argparse.ArgumentParser(prog="sagellm-comm topo --calibrate",
                                 description="Measure each link class and fit the cost model's constants; "
                                             "cache them for this host.")
    ap.add_argument("--transports", default=",".join(DEFAULT_TRANSPORTS),
                    help="comma-separated: shm, tcp (loopback), ucx, inproc (default: shm,tcp)")
    ap.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                    help="message sizes, e.g. 4,64K,1M,64M (default: 4 B to 64 MiB by 4x)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds to spend probing, roughly")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the cache file")
    ap.add_argument("--json", help="also write the whole document (raw points, fit, errors) here")
    args = ap.parse_args(list(argv) if argv is not None else None)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    doc = run(transports, parse_sizes(args.sizes), args.budget, backend=args.backend, write=not args.no_write,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(doc))
    if "path" in doc:
        print(f"# cached at {doc['path']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        sys.exit(worker(json.loads(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))
