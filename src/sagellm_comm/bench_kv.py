"""KV-cache transfer between a prefill and a decode process, against the raw transport, in one run.

Two real processes: rank 0 holds a filled paged KV cache and sends a request's
blocks (prefill), rank 1 receives them into blocks of its own cache (decode).
Per request size and codec the receiver times the whole transfer and the first
layer, measured from the moment both sides leave a barrier.

The peer in the same processes is the bare transport moving the same bytes:
one contiguous message per layer (its K and V together), every receive posted
in advance, all layers sent back to back. What the KV channel adds on top
(gathering scattered blocks, checksums, credits, codecs) is what the ratio
kv/raw shows. Raw and KV transfers alternate iteration by iteration, so a slow
moment of the host lands on both.

Ceilings printed beside them: a single-core memcpy of one layer's bytes (CPU
caches), or on CUDA a device-to-device copy and pinned host<->device copies of
the whole request.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from . import bench_allreduce
from .demo import fmt_bytes, free_port, launch

DEFAULT_TOKENS = "1024,4096,16384"
CODECS = ("none", "fp8", "int8")
RAW_TAG = 7000  # tags of the raw peer's messages: RAW_TAG + layer
SIG_TAG = 6999  # the sender's signature of what it sent, for the receiver's check


@dataclass(frozen=True)
class Shape:
    """The cache layout as plain numbers, so sizes are known without building a cache."""

    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        import torch

        return int(getattr(torch, self.dtype).itemsize)

    @property
    def block_bytes(self) -> int:
        """One block of one of K/V of one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    def blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def raw_bytes(self, tokens: int) -> int:
        """KV bytes of a request of `tokens` tokens, whole blocks (what TransferStats.raw_bytes counts)."""
        return 2 * self.num_layers * self.blocks(tokens) * self.block_bytes

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_kv_heads} kv heads x head dim {self.head_dim}, "
                f"block {self.block_size}, {self.dtype} ({fmt_bytes(self.bytes_per_token)}/token)")


def cache_blocks(shape: Shape, tokens: list[int]) -> int:
    """Blocks per cache: the largest request plus spare, so the receiver's range can sit at an offset."""
    need = shape.blocks(max(tokens))
    return need + max(16, need // 4)


def block_ids(mode: str, n: int, num_blocks: int, rank: int, seed: int) -> list[int]:
    """This rank's blocks for a request of `n` blocks.

    contiguous: the sender's 0..n-1 and the receiver's last n blocks (an offset
    range, so no id maps to itself); shuffled: a random subset in random order,
    different per rank, the way a long-running cache's free list hands them out.
    """
    if mode == "shuffled":
        return random.Random(seed * 1000 + rank * 7919 + n).sample(range(num_blocks), n)
    start = 0 if rank == 0 else num_blocks - n
    return list(range(start, start + n))


# -- one rank --------------------------------------------------------------------------------
class _Rank:
    """One side of the benchmark: its cache, its channel and its raw buffers.

    The cache is built and filled before the group is joined: filling gigabytes
    takes seconds of CPU in which the event loop would not answer heartbeats.
    Later bulk work on the host (raw buffers, signatures) runs in a thread.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.comm: Any = None
        self.spec = spec
        self.rank = int(spec["rank"])
        self.shape = Shape(**spec["layout"])
        self.device = torch.device("cuda", int(spec.get("gpu", 0))) if spec["device"] == "cuda" else torch.device("cpu")
        self.codecs: list[str] = list(spec["codecs"])
        self.num_blocks = cache_blocks(self.shape, spec["tokens"])
        self.cache: Any = None
        self.chan: Any = None
        self.raw_good = True  # every raw transfer so far wrote the receiver's sampled bytes
        if self.codecs:
            self._build_cache()

    def _build_cache(self) -> None:
        from . import kv

        s = self.shape
        layout = kv.KVLayout(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                             block_size=s.block_size, dtype=s.dtype)
        self.cache = kv.KVCache.allocate(layout, num_blocks=self.num_blocks, device=self.device)
        if self.rank == 0:  # random normal data: what the codecs see in a real cache, roughly
            gen = self.torch.Generator(device=self.device).manual_seed(int(self.spec["seed"]))
            for layer in range(s.num_layers):
                self.cache.key(layer).normal_(generator=gen)
                self.cache.value(layer).normal_(generator=gen)
            self._sync()

    def attach(self, comm: Any) -> None:
        """Join the benchmark to the group: the channel over `comm`, with the options asked for."""
        from . import kv

        self.comm = comm
        if self.cache is None:
            return
        opts: dict[str, Any] = {"checksum": bool(self.spec["checksum"])}
        for k in ("window", "chunk_bytes"):
            if self.spec.get(k):
                opts[k] = int(self.spec[k])
        if self.spec.get("ipc") is not None:
            opts["ipc"] = bool(self.spec["ipc"])
        self.chan = kv.KVChannel(self.comm, self.cache, name="bench-kv", **opts)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def ids(self, tokens: int) -> list[int]:
        return block_ids(self.spec["ids"], self.shape.blocks(tokens), self.num_blocks, self.rank,
                         int(self.spec["seed"]))

    # -- the raw transport ---------------------------------------------------------------------
    def raw_buffer(self, tokens: int) -> Any:
        """Every layer's bytes, one row each, on both sides: the sender reads as much distinct memory as a
        KV transfer does (one row sent 32 times would be read from the CPU's cache and flatter the peer)."""
        per_layer = self.shape.raw_bytes(tokens) // self.shape.num_layers
        buf = self.torch.full((self.shape.num_layers, per_layer), 7 if self.rank == 0 else 0,
                              dtype=self.torch.uint8, device=self.device)
        self._sync()
        return buf

    async def raw_once(self, buf: Any) -> tuple[float, float]:
        """One request's bytes over the bare transport: (seconds, first-layer seconds) on the receiver."""
        layers = self.shape.num_layers
        if self.rank == 0:
            await self.comm.barrier()
            for layer in range(layers):
                await self.comm.send(buf[layer], 1, tag=RAW_TAG + layer)
            return 0.0, 0.0
        self._mark(buf)
        t0 = [0.0]
        first = [0.0]
        entered = anyio.Event()

        async def one(layer: int) -> None:
            await self.comm.recv(buf[layer], 0, tag=RAW_TAG + layer)
            await entered.wait()
            if layer == 0:
                first[0] = time.perf_counter() - t0[0]

        async with anyio.create_task_group() as tg:
            for layer in range(layers):  # posted before the barrier: every byte lands in place
                tg.start_soon(one, layer)
            await self.comm.barrier()
            t0[0] = time.perf_counter()
            entered.set()
        seconds = time.perf_counter() - t0[0]
        self.raw_good = self.raw_good and self._marked_ok(buf)
        return seconds, first[0]

    @staticmethod
    def _samples(buf: Any) -> tuple[Any, Any]:
        """A sparse grid of every row plus its last byte: enough to see a message that did not land."""
        return buf[:, :: max(1, buf.shape[1] // 4096)], buf[:, -1]

    def _mark(self, buf: Any) -> None:
        """Zero the sampled bytes before a raw transfer, so each transfer has to write them again."""
        for view in self._samples(buf):
            view.zero_()
        self._sync()

    def _marked_ok(self, buf: Any) -> bool:
        return all(bool((view == 7).all().item()) for view in self._samples(buf))

    # -- the KV channel --------------------------------------------------------------------------
    async def kv_once(self, request: str, ids: list[int], codec: str) -> tuple[float, float, Any]:
        """One transfer through the channel: (seconds, first-layer seconds, stats) on the receiver."""
        await self.comm.barrier()
        if self.rank == 0:
            st = await self.chan.send(request, 1, ids, codec=None if codec == "none" else codec)
            return 0.0, 0.0, st
        t0 = time.perf_counter()
        first = -1.0
        async with self.chan.receive(request, 0, ids) as layers:
            async for _ in layers:
                if first < 0:
                    first = time.perf_counter() - t0
        return time.perf_counter() - t0, first, layers.stats

    def signature(self, ids: list[int], exact: bool) -> Any:
        """Per layer and K/V of the blocks `ids`: a word sum (exact transfers) or the L2 norm (lossy codecs)."""
        torch = self.torch
        idx = torch.tensor(ids, device=self.device)
        word = torch.int32 if self.shape.head_dim * self.shape.itemsize % 4 == 0 else torch.uint8
        out: list[float] = []
        for layer in range(self.shape.num_layers):
            for t in (self.cache.key(layer), self.cache.value(layer)):
                blocks = t.index_select(0, idx)
                if exact:
                    out.append(int(blocks.view(word).sum(dtype=torch.int64).item()))
                else:
                    out.append(float(torch.linalg.vector_norm(blocks, dtype=torch.float32).item()))
        return np.array(out, dtype=np.int64 if exact else np.float64)

    async def kv_ok(self, ids: list[int], codec: str) -> bool:
        """The receiver's blocks against the sender's: words equal without a codec, norms close with one."""
        mine = await anyio.to_thread.run_sync(self.signature, ids, codec == "none")
        if self.rank == 0:
            await self.comm.send(mine, 1, tag=SIG_TAG)
            return True
        theirs = np.empty_like(mine)
        await self.comm.recv(theirs, 0, tag=SIG_TAG)
        if codec == "none":
            return bool(np.array_equal(mine, theirs))
        rel = np.abs(mine - theirs) / np.maximum(theirs, 1e-30)
        return bool(np.all(mine > 0) and float(rel.max()) < 0.05)

    # -- one request size ------------------------------------------------------------------------
    async def measure(self, tokens: int) -> dict[str, Any]:
        """Warm-up, then `iters` rounds of raw and every codec, alternating; the receiver's times."""
        iters = int(self.spec["iters"])
        buf = await anyio.to_thread.run_sync(self.raw_buffer, tokens)
        ids = self.ids(tokens) if self.codecs else []
        raw: list[tuple[float, float]] = []
        kv: dict[str, list[tuple[float, float, Any]]] = {c: [] for c in self.codecs}
        ok = dict.fromkeys(self.codecs, True)
        for i in range(-1, iters):  # -1: the warm-up, not recorded
            r = await self.raw_once(buf)
            if i >= 0:
                raw.append(r)
            for codec in self.codecs:
                k = await self.kv_once(f"{tokens}/{codec}/{i}", ids, codec)
                if i >= 0:
                    kv[codec].append(k)
                if i == iters - 1:  # before the next codec overwrites the receiver's blocks
                    ok[codec] = await self.kv_ok(ids, codec)
        return {"tokens": tokens, "raw_seconds": [r[0] for r in raw], "raw_first_seconds": [r[1] for r in raw],
                "raw_ok": self.raw_good,
                "kv": {c: _kv_summary(kv[c], ok[c]) for c in self.codecs}}


def _kv_summary(runs: list[tuple[float, float, Any]], ok: bool) -> dict[str, Any]:
    """What a rank keeps of one codec's transfers: times, and the channel's own stats of the last one."""
    st = runs[-1][2]
    return {"seconds": [r[0] for r in runs], "first_seconds": [r[1] for r in runs],
            "stats_seconds": [float(r[2].seconds) for r in runs], "wire_bytes": int(st.nbytes),
            "raw_bytes": int(st.raw_bytes), "path": str(st.path), "ok": ok}


def kv_worker(spec: dict[str, Any]) -> int:
    """One rank of the KV benchmark (`sagellm-comm _worker kv SPEC`)."""
    import torch  # before init: a process with CUDA gets shm rings sized for device copies

    import sagellm_comm as sc

    if spec["device"] == "cuda":
        torch.cuda.set_device(int(spec.get("gpu", 0)))

    me = _Rank(spec)

    async def main() -> list[dict[str, Any]]:
        url = f"tcp://127.0.0.1:{spec['port']}"
        async with sc.init_process_group(url, rank=int(spec["rank"]), world_size=2,
                                         timeout=float(spec["op_timeout"]), transport=spec["transport"]) as comm:
            me.attach(comm)
            rows = []
            for tokens in spec["tokens"]:
                rows.append(await me.measure(int(tokens)))
                print(f"rank {spec['rank']}: {tokens} tokens done", file=sys.stderr, flush=True)
            return rows

    try:
        rows = anyio.run(main, backend=spec["backend"])
    except Exception as e:  # the traceback, then one line the parent's log tail is sure to show
        traceback.print_exc()
        print(f"rank {spec['rank']} FAILED: {_first_error(e)}", file=sys.stderr, flush=True)
        return 1
    Path(spec["out"]).write_text(json.dumps({"rank": spec["rank"], "rows": rows}))
    return 0


def _first_error(e: BaseException) -> str:
    """The innermost error of a task group's exception group, as `Type: message`."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"


# -- the parent: launching, ceilings, the table ----------------------------------------------------
@dataclass
class Settings:
    """Everything one `bench kv` run was asked for."""

    shape: Shape
    tokens: list[int]
    codecs: list[str]
    transports: list[str]
    backend: str = "asyncio"
    device: str = "cpu"
    gpus: int = 1  # CUDA caches: 1, both ranks on the first GPU; 2, rank r on GPU r (NVLink / PCIe P2P between them)
    iters: int = 5
    ids: str = "contiguous"
    checksum: bool = True
    ipc: bool | None = None
    window: int | None = None
    chunk_bytes: int | None = None
    seed: int = 1234
    op_timeout: float = 120.0
    timeout: float = 0.0  # seconds per transport's worker pair; 0: estimated from the bytes moved

    def budget(self) -> float:
        """A bound for one worker pair: every byte moved at 100 MB/s (far below any transport), plus start-up."""
        if self.timeout > 0:
            return self.timeout
        per_size = sum(self.shape.raw_bytes(t) for t in self.tokens)
        moved = per_size * (self.iters + 1) * (1 + len(self.codecs))
        cache = self.shape.raw_bytes(max(self.tokens)) * 1.25
        return 120.0 + moved / 100e6 + 3 * cache / 100e6


def measure(settings: Settings, transport: str) -> list[dict[str, Any]]:
    """One worker pair over `transport`: the receiver's rows, summarised."""
    s = settings
    port = free_port()
    base = {"port": port, "transport": transport, "backend": s.backend, "device": s.device,
            "layout": asdict(s.shape), "tokens": s.tokens, "codecs": s.codecs, "iters": s.iters, "ids": s.ids,
            "checksum": s.checksum, "ipc": s.ipc, "window": s.window, "chunk_bytes": s.chunk_bytes, "seed": s.seed,
            "op_timeout": s.op_timeout}
    with _one_gpu(s.device == "cuda" and s.gpus == 1):
        runs = launch("kv", [{**base, "rank": r, "gpu": r if s.gpus == 2 else 0} for r in range(2)],
                      timeout=s.budget())
    got = runs[1].result
    if not got:
        raise bench_allreduce.WorkersFailed(f"kv workers: rank 1 wrote no result\n{runs[1].log}")
    return [_rows(transport, s, r) for r in got["rows"]]


@contextmanager
def _one_gpu(cuda: bool) -> Iterator[None]:
    """Both ranks on the first GPU (CUDA_VISIBLE_DEVICES), so one-GPU and many-GPU hosts run the same test."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = env.split(",")[0] if env else "0"
    try:
        yield
    finally:
        if cuda and env is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        elif cuda and env is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = env


def _rows(transport: str, s: Settings, r: dict[str, Any]) -> dict[str, Any]:
    """The receiver's record of one request size -> one table row per codec (medians)."""
    tokens = int(r["tokens"])
    raw_bytes = s.shape.raw_bytes(tokens)
    raw_t = statistics.median(r["raw_seconds"])
    common = {"transport": transport, "backend": s.backend, "device": s.device, "tokens": tokens,
              "blocks": s.shape.blocks(tokens), "raw_bytes": raw_bytes, "mib": raw_bytes / (1 << 20),
              "raw_seconds": raw_t, "raw_gbps": raw_bytes / raw_t / 1e9,
              "raw_first_layer_ms": statistics.median(r["raw_first_seconds"]) * 1e3,
              "raw_times": r["raw_seconds"], "raw_ok": r["raw_ok"], "iters": len(r["raw_seconds"])}
    rows = []
    for codec, k in r["kv"].items():
        t = statistics.median(k["seconds"])
        rows.append({**common, "codec": codec, "kv_seconds": t, "kv_gbps": raw_bytes / t / 1e9,
                     "kv_over_raw": raw_t / t, "first_layer_ms": statistics.median(k["first_seconds"]) * 1e3,
                     "channel_seconds": statistics.median(k["stats_seconds"]), "wire_bytes": k["wire_bytes"],
                     "compression": raw_bytes / k["wire_bytes"] if k["wire_bytes"] else None,  # ipc: no wire
                     "path": k["path"], "kv_times": k["seconds"],
                     "ok": bool(k["ok"] and r["raw_ok"] and k["raw_bytes"] == raw_bytes)})
    return {"tokens": tokens, "rows": rows, "raw": common}


def d2d_gbps(nbytes: int, src_gpu: int = 0, dst_gpu: int = 0) -> float:
    """A device-to-device copy of `nbytes` from GPU `src_gpu` to GPU `dst_gpu` (the same one by
    default), median of 10, timed by CUDA events on the source's current stream."""
    torch: Any = importlib.import_module("torch")
    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_gpu}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_gpu}")
    dst.copy_(src)
    torch.cuda.synchronize(dst_gpu)
    times = []
    with torch.cuda.device(src_gpu):  # a copy between GPUs runs on the source's current stream
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    return float(nbytes / statistics.median(times) / 1e9)


def ceilings(s: Settings) -> dict[str, dict[str, float]]:
    """Per request size: what a copy of its bytes reaches on this host (no transport at all)."""
    out: dict[str, dict[str, float]] = {}
    for tokens in s.tokens:
        nbytes = s.shape.raw_bytes(tokens)
        if s.device == "cuda":
            from .bench_gpu import pcie_gbps

            with _one_gpu(s.gpus == 1):
                pcie = pcie_gbps(nbytes)
                # with two GPUs, the copy the transfer competes with: GPU 0 straight into GPU 1
                row = {"d2d_gbps": d2d_gbps(nbytes, 0, s.gpus - 1), "h2d_gbps": pcie["h2d"], "d2h_gbps": pcie["d2h"]}
                if s.gpus == 2:
                    row["same_gpu_gbps"] = d2d_gbps(nbytes)
                out[str(tokens)] = row
        else:
            from .bench_transports import memcpy_gbps

            out[str(tokens)] = {"memcpy_gbps": memcpy_gbps(nbytes // s.shape.num_layers, seconds=0.3)}
    return out


def format_table(s: Settings, results: dict[str, list[dict[str, Any]]], ceil: dict[str, dict[str, float]]) -> str:
    """The readable summary: one line per transport, size and codec."""
    cuda = s.device == "cuda"
    where = "GPU 0 -> GPU 1" if cuda and s.gpus == 2 else s.device
    lines = [f"# kv transfer, 2 processes (rank 0 sends, rank 1 receives), {s.backend}, caches on {where}; "
             f"{s.shape.describe()}",
             f"# block ids {s.ids}; checksum {'on' if s.checksum else 'off'}; medians of {s.iters} after a warm-up; "
             "GB/s = raw KV bytes / receiver's seconds (1e9 B/s)",
             "# raw = the same bytes over the bare transport, one message per layer, receives pre-posted; "
             + (("d2d = one device copy of the request" + (" from GPU 0 to GPU 1" if s.gpus == 2 else "")
                 + ", h2d/d2h = pinned copies") if cuda
                else "memcpy = one core copying one layer's bytes"),
             f"{'transport':>9} {'tokens':>7} {'MiB':>8} {'codec':>5} {'kv GB/s':>8} {'raw GB/s':>8} "
             f"{'kv/raw':>6} {'1st ms':>8} {'raw 1st':>8} {'compr':>5} {'path':>6} "
             + (f"{'d2d':>7} {'h2d':>6} {'d2h':>6}" if cuda else f"{'memcpy':>7}") + "  ok"]
    for transport, sizes in results.items():
        for size in sizes:
            c = ceil.get(str(size["tokens"]), {})
            tail = (f"{c.get('d2d_gbps', 0):>7.1f} {c.get('h2d_gbps', 0):>6.1f} {c.get('d2h_gbps', 0):>6.1f}" if cuda
                    else f"{c.get('memcpy_gbps', 0):>7.2f}")
            for r in size["rows"]:
                lines.append(f"{transport:>9} {r['tokens']:>7} {r['mib']:>8.2f} {r['codec']:>5} {r['kv_gbps']:>8.3f} "
                             f"{r['raw_gbps']:>8.3f} {r['kv_over_raw']:>6.2f} {r['first_layer_ms']:>8.2f} "
                             f"{r['raw_first_layer_ms']:>8.2f} {_ratio(r['compression']):>5} {r['path']:>6} {tail}  "
                             f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run(s: Settings, *, json_path: str | None, argv: list[str] | None = None) -> int:
    """The `bench kv` command."""
    results: dict[str, list[dict[str, Any]]] = {}
    for transport in s.transports:
        print(f"# measuring {transport} ...", file=sys.stderr, flush=True)
        results[transport] = measure(s, transport)
    ceil = ceilings(s)
    print(format_table(s, results, ceil), flush=True)
    rows = [r for sizes in results.values() for size in sizes for r in size["rows"]]
    ok = all(r["ok"] for r in rows) and all(size["raw"]["raw_ok"] for sizes in results.values() for size in sizes)
    if json_path:
        import torch

        machine = bench_allreduce.machine_info()  # cpu count, versions (torch's too), date
        if s.device == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(0)
            machine["gpus_used"] = s.gpus
        bench_allreduce.write_report(json_path, {
            "benchmark": "kv", "command": argv, "machine": machine,
            "settings": {**asdict(s), "bytes_per_token": s.shape.bytes_per_token,
                         "budget_seconds": s.budget()},
            "rows": rows, "raw": [size["raw"] for sizes in results.values() for size in sizes],
            "ceilings": ceil, "all_ok": ok})
    return bench_allreduce.finish(ok)
