"""`sagellm-comm demo`: run every collective across real local processes and check it.

The demo is a smoke test a user can run right after installing: it starts
`world` processes that join through 127.0.0.1 (shared memory between them by default), runs each collective at a
small (latency algorithms) and a larger (bandwidth algorithms) size, checks each
result against numpy on every rank, and has rank 0 print one table with every
rank's verdict. It also holds the process launcher shared with the benchmark,
because both need the same guarantee: children are bounded in time and killed
on any failure, so neither command can hang.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OP_TIMEOUT = 20.0  # seconds any single demo op may take before it counts as a hang


# -- launching local worlds ---------------------------------------------------------------
class WorkersFailed(RuntimeError):
    """A local world did not finish cleanly (a rank failed or the deadline passed)."""


@dataclass
class WorkerRun:
    rank: int
    returncode: int
    result: dict[str, Any] | None
    log: str


def free_port() -> int:
    """A loopback port that was free a moment ago (good enough for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def launch(kind: str, specs: list[dict[str, Any]], *, timeout: float,
           passthrough_rank0: bool = False,
           on_poll: Callable[[], None] | None = None, module: str | None = None) -> list[WorkerRun]:
    """Run one `_worker kind` process per spec (spec i is rank i) and wait for all of them.

    Each child gets its spec as JSON plus an `out` path to write its result to. Why
    subprocesses of `python -m sagellm_comm.cli`: that is a fresh interpreter per rank
    (like the spawn context) with nothing inherited but the environment. If any child
    exits non-zero, or `timeout` seconds pass, every child still running is killed
    and `WorkersFailed` carries the logs' tails. `on_poll` runs every ~50 ms (progress).
    With `module`, the children are `python -m MODULE _worker SPEC` instead: workers
    that live in a module of their own (the calibration probe, bench cost-model).
    """
    with tempfile.TemporaryDirectory(prefix=f"sagellm-comm-{kind}-") as tmp:
        tmpdir = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        handles = []
        try:
            for rank, spec in enumerate(specs):
                spec = {**spec, "out": str(tmpdir / f"result{rank}.json")}
                log = tmpdir / f"rank{rank}.log"
                fh = open(log, "wb")  # noqa: SIM115 - closed in `finally` once the child is gone
                handles.append(fh)
                logs.append(log)
                entry = ["-m", module, "_worker"] if module else ["-m", "sagellm_comm.cli", "_worker", kind]
                cmd = [sys.executable, *entry, json.dumps(spec)]
                stdout = None if (passthrough_rank0 and rank == 0) else fh
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout,
                                              stderr=fh))
            deadline = time.monotonic() + timeout
            while True:
                if on_poll is not None:
                    on_poll()
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    time.sleep(0.5)  # let peers report the failure they saw, for the logs
                    why = f"rank(s) {failed} failed"
                    raise WorkersFailed(_failure_report(kind, procs, logs, why))
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    why = f"not finished after {timeout:g} s; killed"
                    raise WorkersFailed(_failure_report(kind, procs, logs, why))
                time.sleep(0.05)
            runs = []
            for rank, p in enumerate(procs):
                out = tmpdir / f"result{rank}.json"
                result = json.loads(out.read_text()) if out.exists() else None
                runs.append(WorkerRun(rank, p.returncode, result, _tail(logs[rank])))
            return runs
        finally:
            _stop(procs)
            for fh in handles:
                fh.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill (by pid, only the children we started) whatever still runs, and reap it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _failure_report(kind: str, procs: list[subprocess.Popen[bytes]], logs: list[Path],
                    why: str) -> str:
    _stop(procs)
    parts = [f"{kind} workers: {why}"]
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        parts.append(f"--- rank {rank} (exit {p.returncode}) ---\n{_tail(log).rstrip()}")
    return "\n".join(parts)


# -- the demo itself ------------------------------------------------------------------------
class _Clock:
    """Accumulates the seconds spent inside `with clock:` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0


def _data(tag: str, rank: int, count: int) -> np.ndarray:
    """Rank `rank`'s input for check `tag`: integer-valued floats, so sums are exact
    in float32 and every rank can rebuild every other rank's input for the check."""
    seed = zlib.crc32(f"{tag}/{rank}/{count}".encode())
    return np.random.default_rng(seed).integers(-64, 64, count).astype(np.float32)


def sizes(world: int, size_kib: int) -> tuple[int, int]:
    """(small, large) element counts, multiples of `world` so dim 0 splits evenly."""
    return 8 * world, max(world, (size_kib * 1024 // 4) // world * world)


async def _run_checks(comm: Any, size_kib: int) -> list[dict[str, Any]]:
    """Run every collective at two sizes; one row per (op, size) with this rank's verdict."""
    import anyio

    n, r = comm.world_size, comm.rank
    small, large = sizes(n, size_kib)
    rows: list[dict[str, Any]] = []
    clock = _Clock()  # times the communication only, not building inputs or checking

    async def check(name: str, stat_op: str, count: int, body: Any) -> None:
        clock.seconds = 0.0
        try:
            ok = bool(await body(count))
            err = "" if ok else "result differs from numpy"
        except Exception as e:  # a failed op is a failed check, reported, not a crash
            ok, err = False, f"{type(e).__name__}: {e}"
        rec = comm.stats.last(stat_op)
        rows.append({"op": name, "bytes": count * 4, "seconds": clock.seconds,
                     "algorithm": rec.algorithm if rec else "?", "ok": ok, "error": err})

    def inputs(tag: str, count: int) -> list[np.ndarray]:
        return [_data(tag, i, count) for i in range(n)]

    def reducer(op: str) -> Any:
        async def body(count: int) -> bool:
            xs = inputs(f"ar-{op}", count)
            x = xs[r].copy()
            with clock:
                await comm.all_reduce(x, op=op, timeout=OP_TIMEOUT)
            stacked = np.stack(xs)
            want = {"sum": stacked.sum(0), "avg": stacked.sum(0) / n, "max": stacked.max(0)}[op]
            return np.allclose(x, want.astype(np.float32), rtol=1e-6, atol=1e-6)
        return body

    async def all_gather(count: int) -> bool:
        xs = inputs("ag", count)
        with clock:
            out = await comm.all_gather(xs[r], timeout=OP_TIMEOUT)
        return np.array_equal(out, np.stack(xs))

    async def reduce_scatter(count: int) -> bool:
        xs = inputs("rs", count)
        with clock:
            out = await comm.reduce_scatter(xs[r], op="sum", timeout=OP_TIMEOUT)
        rows_per = count // n
        return np.array_equal(out, np.stack(xs).sum(0)[r * rows_per:(r + 1) * rows_per])

    async def broadcast(count: int) -> bool:
        root = n - 1
        x = _data("bc", r, count)
        with clock:
            await comm.broadcast(x, root=root, timeout=OP_TIMEOUT)
        return np.array_equal(x, _data("bc", root, count))

    async def all_to_all(count: int) -> bool:
        xs = inputs("a2a", count)
        with clock:
            out = await comm.all_to_all(xs[r], timeout=OP_TIMEOUT)
        c = count // n
        return np.array_equal(out, np.concatenate([xs[j][r * c:(r + 1) * c] for j in range(n)]))

    async def barrier(count: int) -> bool:
        with clock:
            await comm.barrier(timeout=OP_TIMEOUT)
        return True

    async def ring_p2p(count: int) -> bool:
        mine, got = _data("p2p", r, count), np.empty(count, np.float32)
        with clock:  # send and recv at once, so no rank waits on an ordering it imposed
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: comm.send(mine, (r + 1) % n, tag=7, timeout=OP_TIMEOUT))
                await comm.recv(got, (r - 1) % n, tag=7, timeout=OP_TIMEOUT)
        return np.array_equal(got, _data("p2p", (r - 1) % n, count))

    for count in (small, large):
        for op in ("sum", "avg", "max"):
            await check(f"all_reduce({op})", "all_reduce", count, reducer(op))
        await check("all_gather", "all_gather", count, all_gather)
        await check("reduce_scatter(sum)", "reduce_scatter", count, reduce_scatter)
        await check(f"broadcast(root={n - 1})", "broadcast", count, broadcast)
        await check("all_to_all", "all_to_all", count, all_to_all)
        if n > 1:
            await check("send/recv ring", "recv", count, ring_p2p)
    await check("barrier", "barrier", 0, barrier)
    return rows


def format_table(rows: list[dict[str, Any]], verdicts: list[list[bool]] | None, world: int) -> str:
    """Rank 0's table: time is the slowest rank's, ok means ok on every rank."""
    lines = [f"{'op':<22} {'size':>10} {'time(ms)':>10}  {'algorithm':<20} result"]
    for i, row in enumerate(rows):
        size = "-" if row["op"] == "barrier" else fmt_bytes(row["bytes"])
        ok = all(v[i] for v in verdicts) if verdicts else row["ok"]
        where = f"all {world} ranks" if verdicts else "rank 0 only"
        verdict = f"ok ({where})" if ok else f"FAILED {row['error']}".rstrip()
        lines.append(f"{row['op']:<22} {size:>10} {row['seconds'] * 1e3:>10.2f}  "
                     f"{row['algorithm']:<20} {verdict}")
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    """4 B, 64 KiB, 1 MiB: sizes the way the benchmark's --sizes spells them."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


async def _worker_main(spec: dict[str, Any]) -> int:
    import sagellm_comm as sc

    rank, world = int(spec["rank"]), int(spec["world"])
    url = f"tcp://127.0.0.1:{spec['port']}"
    async with sc.init_process_group(url, rank=rank, world_size=world, timeout=30.0,
                                     transport=spec.get("transport")) as comm:
        rows = await _run_checks(comm, int(spec["size_kib"]))
        mine = np.array([row["ok"] for row in rows], dtype=np.uint8)
        verdicts: list[list[bool]] | None = None
        try:  # share verdicts (and slowest times) so rank 0 can speak for every rank
            gathered = await comm.all_gather(mine, timeout=OP_TIMEOUT)
            times = np.array([row["seconds"] for row in rows])
            await comm.all_reduce(times, op="max", timeout=OP_TIMEOUT)
            verdicts = [[bool(v) for v in g] for g in gathered]
            for row, t in zip(rows, times, strict=True):
                row["seconds"] = float(t)
        except Exception as e:
            print(f"rank {rank}: could not gather verdicts: {type(e).__name__}: {e}",
                  file=sys.stderr)
        all_ok = verdicts is not None and all(all(v) for v in verdicts)
        if rank == 0:
            small, large = sizes(world, int(spec["size_kib"]))
            print(f"sagellm-comm demo: {world} processes over {comm.transport}, backend {spec['backend']}, "
                  f"float32, sizes {fmt_bytes(small * 4)} and {fmt_bytes(large * 4)}")
            for peer, link in comm.peer_transports().items():
                print(f"  rank 0 -> rank {peer}: {link['transport']} ({link['reason']})")
            print(format_table(rows, verdicts, world))
            bad = sum(not v for vs in (verdicts or [[r["ok"] for r in rows]]) for v in vs)
            print("result: all ok" if all_ok else f"result: FAILED ({bad} failed checks)",
                  flush=True)
        Path(spec["out"]).write_text(json.dumps({"rank": rank, "rows": rows, "all_ok": all_ok}))
        return 0 if all(row["ok"] for row in rows) and verdicts is not None else 1


def worker(spec: dict[str, Any]) -> int:
    """Entry point of one demo rank (`sagellm-comm _worker demo SPEC`)."""
    import anyio

    return int(anyio.run(_worker_main, spec, backend=spec["backend"]))


async def _links_main(spec: dict[str, Any]) -> int:
    import sagellm_comm as sc

    url = f"tcp://127.0.0.1:{spec['port']}"
    async with sc.init_process_group(url, rank=int(spec["rank"]), world_size=int(spec["world"]), timeout=30.0,
                                     transport=spec.get("transport")) as comm:
        await comm.barrier(timeout=OP_TIMEOUT)
        links = {str(k): v for k, v in comm.peer_transports().items()}
    Path(spec["out"]).write_text(json.dumps({"links": links}))
    return 0


def links_worker(spec: dict[str, Any]) -> int:
    """One rank of `sagellm-comm info --world N`: join, report how each peer is reached."""
    import anyio

    return int(anyio.run(_links_main, spec))


def show_links(world: int, transport: str | None = None, timeout: float = 60.0) -> int:
    """Start `world` local ranks and print, per link, the transport chosen and why."""
    port = free_port()
    specs = [{"rank": r, "world": world, "port": port, "transport": transport} for r in range(world)]
    try:
        runs = launch("links", specs, timeout=timeout)
    except WorkersFailed as e:
        print(f"links FAILED: {e}", file=sys.stderr)
        return 1
    print(f"links between {world} local ranks (setting: {transport or 'SAGELLM_COMM_TRANSPORT or auto'}):")
    for run in runs:
        for peer, link in sorted((run.result or {}).get("links", {}).items(), key=lambda kv: int(kv[0])):
            print(f"  rank {run.rank} -> rank {peer}: {link['transport']:<6} {link['reason']}")
    return 0


def run_demo(world: int = 4, backend: str = "asyncio", size_kib: int = 256,
             timeout: float = 55.0, transport: str = "auto") -> int:
    """Start the world, let rank 0 print the table; 0 only if every check passed everywhere."""
    if world < 1:
        raise ValueError("world must be at least 1")
    port = free_port()
    specs = [{"rank": r, "world": world, "port": port, "backend": backend, "size_kib": size_kib,
              "transport": transport} for r in range(world)]
    try:
        runs = launch("demo", specs, timeout=timeout, passthrough_rank0=True)
    except WorkersFailed as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    return 0 if all(run.result and run.result["all_ok"] for run in runs) else 1

