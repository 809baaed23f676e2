"""Tensor-parallel greedy decoding of a small transformer, with each layer's all-reduce overlapped.

The model is `tiny_model.TinyLlama` (a Llama-like decoder with random weights drawn
from a seed, built on every rank), split Megatron-style over the ranks:

- attention: each rank holds a contiguous slice of the query heads and of the KV
  heads (column-parallel Q, K and V; 8 query heads and 4 KV heads here, so the
  groups of grouped-query attention stay on one rank), its own paged KV cache for
  its KV heads, and the matching rows of the output projection (row-parallel), so
  the attention output is a sum of per-rank partials: one `all_reduce` per layer;
- MLP: columns of the gate and up projections, rows of the down projection (SwiGLU
  is elementwise, so each rank's slice of the intermediate is complete): a second
  `all_reduce` per layer;
- embeddings, norms and the LM head are replicated: after each all_reduce every
  rank holds the same hidden state, so every rank computes the same logits and
  picks the same token without a further collective.

A batch of independent sequences (prompts of different lengths) is decoded as
two micro-batches. Each layer's two halves (attention, MLP) are stages: compute a
partial, all-reduce it, add it to the residual. With overlap on, micro-batch A's
all_reduce of stage N runs in the same task group (`comm.overlap()`) as micro-batch
B's compute of stage N (which does not need A's result), then B's all_reduce of
stage N runs while A computes stage N+1, and so on: ping-pong between the two. On
the CPU the compute runs in a worker thread (torch releases the GIL in its kernels),
so the event loop moves the all_reduce's bytes meanwhile; on CUDA the compute is
launched on a side stream and awaited with `sc.device.wait_stream`. `--no-overlap`
runs the very same compute and all_reduces one after the other. The report per
decode step: wall time, and from `comm.overlap()`: time communicating, time
computing, and the part of the communication that ran while compute ran (hidden).

Why the tokens equal the unsplit model's: TP adds the same products in another
order (per-rank partial sums, then the all_reduce's sum), so hidden states may
differ from the unsplit model's in the last bits; the all_reduce gives every rank
bitwise-identical sums, so the ranks never disagree with each other. A greedy token
can only change where the winning logit's margin over the runner-up is under twice
the largest logit difference. The model runs in float64 by default: the reordering
errors (about 1e-16 relative) are rounded away where tiny_model computes norms,
rotary embeddings and attention in float32, and the logits came out bit-identical
in every CPU run so far (2 and 4 ranks). With `--dtype float32` they differ by
about 1e-5, while the smallest margin of these prompts is about 0.02 (the LM
head's 4x output scale makes the next-token distribution peaked), a thousand times
more. The check prints both numbers and compares the tokens exactly with those of
the unsplit model's `tiny_model.greedy`, run in the same process (rank 0's); a
mismatch exits non-zero.

Runs:

    python examples/tp_decode.py --simulate 2                  # 2 simulated ranks in one process
    python examples/tp_decode.py --simulate 4 --backend trio --no-overlap
    torchrun --nproc-per-node 2 examples/tp_decode.py          # 2 processes, env://
    python examples/tp_decode.py --world 2                     # starts 2 processes itself (env://)
    python examples/tp_decode.py --simulate 2 --device cuda    # on a GPU machine: simulated ranks share GPU 0
    python examples/tp_decode.py --world 2 --device cuda       # a GPU per process where there are enough
                                                               # (NCCL), else both on GPU 0 (host staging)

The world size must divide the 8 query heads, the 4 KV heads and the 704 MLP
columns: 1, 2 or 4.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import torch

import sagellm_comm as sc
from sagellm_comm.kv import KVCache, KVLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TinyConfig, TinyLlama, blocks_needed, greedy, random_prompt

PROMPT_LENS = (23, 40, 9, 31)  # one sequence each; micro-batches take them in turn
STEPS = 8
MICRO_BATCHES = 2


def model_config(dtype: str = "float64", seed: int = 0) -> TinyConfig:
    """tiny_model's default shape with 4 KV heads instead of 2, so that 4 ranks get one each."""
    return TinyConfig(num_heads=8, num_kv_heads=4, dtype=dtype, seed=seed)


# -- one rank's shard of the model ---------------------------------------------------------------
@dataclass
class Seq:
    """One sequence being generated: its prompt, its KV blocks, the tokens so far."""

    prompt: list[int]
    block_ids: list[int]
    tokens: list[int] = field(default_factory=list)


# (sequence, first position, number of positions) of one micro-batch's rows in one pass
Item = tuple[Seq, int, int]


class TPShard:
    """This rank's slices of the layers of `model`, and its paged KV cache (its KV heads only)."""

    def __init__(self, model: TinyLlama, rank: int, world: int, num_blocks: int) -> None:
        c = model.config
        for what, n in (("num_heads", c.num_heads), ("num_kv_heads", c.num_kv_heads),
                        ("intermediate", c.intermediate)):
            if n % world:
                raise ValueError(f"{what} ({n}) must be divisible by the number of ranks ({world})")
        self.model, self.config = model, c
        self.heads, self.kv_heads, d = c.num_heads // world, c.num_kv_heads // world, c.head_dim
        q = slice(rank * self.heads * d, (rank + 1) * self.heads * d)
        kv = slice(rank * self.kv_heads * d, (rank + 1) * self.kv_heads * d)
        f = slice(rank * c.intermediate // world, (rank + 1) * c.intermediate // world)
        self.layers = [replace(layer, wq=layer.wq[:, q].contiguous(), wk=layer.wk[:, kv].contiguous(),
                               wv=layer.wv[:, kv].contiguous(), wo=layer.wo[q, :].contiguous(),
                               w_gate=layer.w_gate[:, f].contiguous(), w_up=layer.w_up[:, f].contiguous(),
                               w_down=layer.w_down[f, :].contiguous())
                       for layer in model.layers]
        layout = KVLayout(num_layers=c.num_layers, num_kv_heads=self.kv_heads, head_dim=d,
                          block_size=c.block_size, dtype=c.dtype)
        self.cache = KVCache.allocate(layout, num_blocks, device=model.device)

    @property
    def num_stages(self) -> int:
        return 2 * self.config.num_layers  # per layer: attention, then MLP; each ends in an all_reduce

    def stage(self, s: int, x: torch.Tensor, items: Sequence[Item]) -> torch.Tensor:
        """This rank's partial of stage s (its part of the sum to add to the residual x)."""
        layer = self.layers[s // 2]
        if s % 2:
            hn = self.model._norm(x, layer.mlp_norm)
            return (torch.nn.functional.silu(hn @ layer.w_gate) * (hn @ layer.w_up)) @ layer.w_down
        return self._attention(s // 2, x, items) @ layer.wo

    def _attention(self, li: int, x: torch.Tensor, items: Sequence[Item]) -> torch.Tensor:
        """This rank's heads of layer li for every row of x: write the rows' K/V, attend over the cache."""
        m, d, layer = self.model, self.config.head_dim, self.layers[li]
        hn = m._norm(x, layer.attn_norm)
        q = (hn @ layer.wq).view(-1, self.heads, d)
        k = (hn @ layer.wk).view(-1, self.kv_heads, d)
        v = (hn @ layer.wv).view(-1, self.kv_heads, d)
        keys = self.cache.key(li).view(-1, self.kv_heads, d)
        values = self.cache.value(li).view(-1, self.kv_heads, d)
        out, row = [], 0
        for seq, start, count in items:
            positions = torch.arange(start, start + count)
            rows = slice(row, row + count)
            slots = m._slots(self.cache, seq.block_ids, 0, start + count)
            keys[slots[start:]] = m._rope(k[rows], positions)
            values[slots[start:]] = v[rows]
            out.append(self._attend(m._rope(q[rows], positions), keys[slots], values[slots], start))
            row += count
        return torch.cat(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
        """tiny_model's grouped-query attention (float32 inside), over this rank's heads only."""
        group = self.heads // self.kv_heads
        qf = q.float().transpose(0, 1)
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qf @ kf.transpose(1, 2)) / self.config.head_dim ** 0.5
        tq, tk = q.shape[0], k.shape[0]
        qpos = torch.arange(first_pos, first_pos + tq, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vf
        return out.transpose(0, 1).reshape(tq, self.heads * self.config.head_dim).to(q.dtype)


# -- timing --------------------------------------------------------------------------------------
@dataclass
class Meter:
    """Seconds summed over the measured passes (what comm.overlap() reported, or sequential spans)."""

    comm_s: float = 0.0
    compute_s: float = 0.0
    hidden_s: float = 0.0

    def add(self, comm_s: float = 0.0, compute_s: float = 0.0, hidden_s: float = 0.0) -> None:
        self.comm_s += comm_s
        self.compute_s += compute_s
        self.hidden_s += hidden_s


class Runner:
    """Runs forward passes of micro-batches through the shard, with or without overlap."""

    def __init__(self, comm: sc.Communicator, shard: TPShard, overlap: bool) -> None:
        self.comm, self.shard, self.overlap = comm, shard, overlap
        self.device = shard.model.device
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    async def compute(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run fn's torch work so that the event loop (and the all_reduce in flight) keeps running."""
        if self.side is None:
            return await anyio.to_thread.run_sync(_no_grad, fn)
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # the inputs (embeddings) come from there
        with torch.cuda.stream(self.side), torch.no_grad():
            out = fn()  # launches kernels on the side stream, returns at once
        await sc.device.wait_stream(self.side)
        return out

    async def _compute_into(self, fn: Callable[[], torch.Tensor], out: list[torch.Tensor]) -> None:
        out.append(await self.compute(fn))

    async def forward(self, batches: list[list[Item]], xs: list[torch.Tensor], meter: Meter) -> list[torch.Tensor]:
        """All stages of every micro-batch; returns each micro-batch's final hidden states."""
        n_mb = len(batches)
        order = [(mb, s) for s in range(self.shard.num_stages) for mb in range(n_mb)]
        pending: list[torch.Tensor | None] = [None] * n_mb  # reduced, not yet added to the residual

        def work(mb: int, s: int) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                r = pending[mb]
                if r is not None:
                    xs[mb], pending[mb] = xs[mb] + r, None
                return self.shard.stage(s, xs[mb], batches[mb])
            return run

        partial = await self.compute(work(*order[0]))
        for i, (mb, _) in enumerate(order):
            nxt = order[i + 1] if i + 1 < len(order) else None
            if self.overlap and nxt is not None and n_mb > 1:
                # micro-batch mb's all_reduce in flight while the next (another micro-batch) computes
                got: list[torch.Tensor] = []
                async with self.comm.overlap() as ov:
                    ov.start_comm(self.comm.all_reduce, partial)
                    ov.start_compute(self._compute_into, work(*nxt), got)
                r = ov.report
                meter.add(r.comm_s, r.compute_s, r.hidden_s)
                pending[mb], partial = partial, got[0]
            else:
                t0 = time.perf_counter()
                await self.comm.all_reduce(partial)
                t1 = time.perf_counter()
                pending[mb] = partial
                meter.add(comm_s=t1 - t0)
                if nxt is not None:
                    partial = await self.compute(work(*nxt))
                    meter.add(compute_s=time.perf_counter() - t1)
        for mb in range(n_mb):
            r = pending[mb]
            assert r is not None
            xs[mb] = xs[mb] + r
        return xs


def _no_grad(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():  # grad mode is per thread
        return fn()


# -- generation on one rank ----------------------------------------------------------------------
@dataclass
class Options:
    device: str = "cpu"
    dtype: str = "float64"
    steps: int = STEPS
    prompt_lens: tuple[int, ...] = PROMPT_LENS
    micro_batches: int = MICRO_BATCHES
    overlap: bool = True
    seed: int = 0


def make_sequences(cfg: TinyConfig, opts: Options) -> tuple[list[Seq], int]:
    """The prompts, and block ids interleaved across sequences (sequence i of n owns blocks i, i+n, i+2n, ...);
    returns them and the number of blocks the cache needs."""
    n = len(opts.prompt_lens)
    per_seq = max(blocks_needed(cfg, p + opts.steps) for p in opts.prompt_lens)
    seqs = [Seq(random_prompt(cfg, p, seed=opts.seed + 100 + i), list(range(i, n * per_seq, n)))
            for i, p in enumerate(opts.prompt_lens)]
    return seqs, n * per_seq


def rank_device(opts: Options, local_rank: int) -> torch.device:
    """CUDA: GPU `local_rank` where there are enough GPUs, else GPU 0 (ranks then share it)."""
    if opts.device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError("--device cuda, but torch sees no CUDA GPU")
        return torch.device("cuda", local_rank if local_rank < n else 0)
    return torch.device(opts.device)


async def decode(comm: sc.Communicator, opts: Options, local_rank: int = 0) -> dict[str, Any]:
    """Prefill and `opts.steps` greedy decode steps of every sequence on this rank: its tokens, logits, timings."""
    device = rank_device(opts, local_rank)
    cfg = model_config(opts.dtype, opts.seed)
    model = TinyLlama(cfg, device=device)
    seqs, num_blocks = make_sequences(cfg, opts)
    shard = TPShard(model, comm.rank, comm.world_size, num_blocks)
    runner = Runner(comm, shard, opts.overlap)
    groups = [g for g in (list(range(mb, len(seqs), opts.micro_batches)) for mb in range(opts.micro_batches)) if g]
    logits_seen: list[list[torch.Tensor]] = [[] for _ in seqs]

    async def one_pass(feed: list[list[int]], meter: Meter) -> None:
        """Feed sequence i the tokens feed[i] (its next positions); append its greedy next token."""
        batches: list[list[Item]] = []
        xs: list[torch.Tensor] = []
        for members in groups:
            # the fed tokens take the positions after everything already in the cache
            batches.append([(seqs[i], len(seqs[i].prompt) + len(seqs[i].tokens) - len(feed[i]), len(feed[i]))
                            for i in members])
            xs.append(model.embed[torch.as_tensor([t for i in members for t in feed[i]], device=device)])
        outs = await runner.forward(batches, xs, meter)
        for members, items, x in zip(groups, batches, outs, strict=True):
            last_rows = torch.tensor([c for _, _, c in items]).cumsum(0) - 1
            with torch.no_grad():
                logits = model._logits(x[last_rows.to(device)])  # the LM head is replicated
            for i, row in zip(members, logits, strict=True):
                seqs[i].tokens.append(int(row.argmax()))
                logits_seen[i].append(row.cpu())

    await one_pass([list(s.prompt) for s in seqs], Meter())  # prefill: positions 0..len(prompt)-1
    meter, step_s = Meter(), []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        await one_pass([[s.tokens[-1]] for s in seqs], meter)
        step_s.append(time.perf_counter() - t0)
    return {"tokens": [s.tokens for s in seqs], "logits": logits_seen, "step_s": step_s, "meter": meter,
            "device": str(device), "device_path": comm.device_path if device.type == "cuda" else "host"}


# -- the check against the unsplit model ---------------------------------------------------------
def reference(opts: Options, device: torch.device) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """tiny_model.greedy of the whole model, one sequence at a time, in this process."""
    cfg = model_config(opts.dtype, opts.seed)
    model = TinyLlama(cfg, device=device)
    seqs, num_blocks = make_sequences(cfg, opts)
    tokens, logits = [], []
    for s in seqs:
        out: list[torch.Tensor] = []
        tokens.append(greedy(model, s.prompt, opts.steps, model.allocate_cache(num_blocks), s.block_ids, out))
        logits.append([x.cpu() for x in out])
    return tokens, logits


def check(result: dict[str, Any], opts: Options, world: int) -> dict[str, Any]:
    """Compare rank 0's tokens with the unsplit model's; margins and logit differences say how close it was."""
    ref_tokens, ref_logits = reference(opts, torch.device(result["device"]))
    margins, diffs = [], []
    for got, want in zip(result["logits"], ref_logits, strict=True):
        for a, b in zip(got, want, strict=True):
            top = b.double().topk(2).values
            margins.append(float(top[0] - top[1]))
            diffs.append(float((a.double() - b.double()).abs().max()))
    st = result["step_s"][1:] or result["step_s"]  # the first decode step warms up
    m: Meter = result["meter"]
    n = len(result["step_s"])
    return {"world": world, "overlap": opts.overlap, "device": result["device"], "dtype": opts.dtype,
            "device_path": result["device_path"], "tokens": result["tokens"], "reference": ref_tokens,
            "match": result["tokens"] == ref_tokens, "min_margin": min(margins), "max_logit_diff": max(diffs),
            "step_ms": 1e3 * sum(st) / len(st), "comm_ms": 1e3 * m.comm_s / n, "compute_ms": 1e3 * m.compute_s / n,
            "hidden_ms": 1e3 * m.hidden_s / n,
            # as comm.overlap() reports it: the share of what could be hidden that was
            "overlap_efficiency": m.hidden_s / min(m.comm_s, m.compute_s) if min(m.comm_s, m.compute_s) > 0 else 0.0}


def show(rep: dict[str, Any]) -> None:
    for i, (got, want) in enumerate(zip(rep["tokens"], rep["reference"], strict=True)):
        print(f"seq {i} tp:      {got}")
        print(f"      unsplit: {want}{'' if got == want else '   <-- MISMATCH'}")
    print(f"tokens {'match' if rep['match'] else 'DO NOT match'} the unsplit model "
          f"({rep['world']} ranks, {rep['dtype']} on {rep['device']}, collectives: {rep['device_path']}); "
          f"smallest greedy margin {rep['min_margin']:.3g}, largest logit difference {rep['max_logit_diff']:.2g}")
    print(f"decode ({'overlap' if rep['overlap'] else 'no overlap'}): {rep['step_ms']:.2f} ms/step; per step "
          f"comm {rep['comm_ms']:.2f} ms, compute {rep['compute_ms']:.2f} ms, comm hidden behind compute "
          f"{rep['hidden_ms']:.2f} ms (overlap efficiency {rep['overlap_efficiency']:.2f})")
    print("RESULT " + json.dumps(rep))


# -- launching -----------------------------------------------------------------------------------
async def run_simulated(world: int, opts: Options) -> dict[str, Any]:
    """`world` simulated ranks in this event loop; rank 0's report, after checking all ranks agree."""
    results = await sc.testing.run_ranks(world, decode, opts)
    for r, res in enumerate(results[1:], 1):
        if res["tokens"] != results[0]["tokens"]:
            raise AssertionError(f"rank {r} generated {res['tokens']}, rank 0 {results[0]['tokens']}")
    return check(results[0], opts, world)


async def run_env(opts: Options) -> dict[str, Any] | None:
    """One rank of a torchrun (or --world) launch: env:// rendezvous; rank 0's report, None elsewhere."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if opts.device == "cuda":
        torch.cuda.set_device(rank_device(opts, local_rank))
    async with sc.init_process_group("env://") as comm:
        res = await decode(comm, opts, local_rank)
        mine = torch.tensor(res["tokens"], dtype=torch.int64)
        every = await comm.all_gather(mine)  # every rank must have generated the same tokens
        if not all(torch.equal(every[r], mine) for r in range(comm.world_size)):
            raise AssertionError(f"ranks disagree: {every.tolist()}")
        return check(res, opts, comm.world_size) if comm.rank == 0 else None


def launch(world: int, argv: list[str], timeout: float) -> int:
    """Start `world` processes of this script with torchrun's environment; the worst exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:g} s", file=sys.stderr)
        codes.append(124)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(codes, key=abs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", type=int, default=0, metavar="N", help="run N simulated ranks in this process")
    ap.add_argument("--world", type=int, default=0, metavar="N", help="start N processes of this script (env://)")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--no-overlap", action="store_true", help="all_reduce, then compute: no task group")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    ap.add_argument("--timeout", type=float, default=300, help="--world: seconds before the processes are killed")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    for n in (args.simulate, args.world):
        c = model_config()
        if n and (c.num_heads % n or c.num_kv_heads % n or c.intermediate % n):
            ap.error(f"{n} ranks do not divide {c.num_heads} query heads, {c.num_kv_heads} KV heads and "
                     f"{c.intermediate} MLP columns: use 1, 2 or 4")
    if args.world:
        argv = sys.argv[1:]
        if "--world" in argv:
            i = argv.index("--world")
            argv = argv[:i] + argv[i + 2:]
        return launch(args.world, [a for a in argv if not a.startswith("--world=")], args.timeout)
    torch.set_num_threads(args.threads)
    opts = Options(device=args.device, dtype=args.dtype, steps=args.steps, overlap=not args.no_overlap)
    if args.simulate:
        rep = anyio.run(run_simulated, args.simulate, opts, backend=args.backend)
    else:
        rep = anyio.run(run_env, opts, backend=args.backend)
        if rep is None:
            return 0
    show(rep)
    return 0 if rep["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
