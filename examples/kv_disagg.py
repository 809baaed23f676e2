"""Disaggregated prefill/decode: one process prefills, another decodes from the KV it was sent.

    python examples/kv_disagg.py                                   # both ranks, from one command
    python examples/kv_disagg.py --codec none,fp8,int8 --dtype bfloat16 --transport tcp --backend trio
    python examples/kv_disagg.py --json out.json                   # also write both ranks' results
    python examples/kv_disagg.py --rank 0 --port 29555 &           # or each rank by hand
    python examples/kv_disagg.py --rank 1 --port 29555

Rank 0 (prefill) runs the prompt through `tiny_model.TinyLlama`, writing its KV
into shuffled blocks of its cache, sends the first generated token with
`comm.send`, and the KV with `KVChannel.send`, once per codec asked for. Rank 1
(decode) receives each transfer into different shuffled blocks of its own cache
with `async for layer in chan.receive(...)`, running layer l of the first decode
step as soon as layer l has landed, then decodes greedily.

Why it proves something: rank 1 then generates the same sequence in one process
(prefill and decode on a fresh cache, same seeded weights) and compares. With no
codec the transfer is byte-exact, so the tokens must be exactly equal. With fp8
or int8 the KV is quantized on the wire; the report says how much that moved the
first decode step's logits and how long the greedy tokens stayed the same.

With CUDA caches (`--device cuda`) both ranks on one host use the channel's CUDA
IPC path by default: the receiver copies the sender's blocks straight out of its
GPU memory, raw, so a codec has nothing to do and the stats say "none".
`--no-ipc` makes the chunks stream (and go through the codec) as between hosts.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import torch

import sagellm_comm as sc
from sagellm_comm import kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TinyConfig, TinyLlama, blocks_needed, greedy, random_prompt

FIRST_TOKEN_TAG = 11


class _Timed:
    """Passes a layer stream through, noting when each layer arrived and was computed (seconds since `t0`)."""

    def __init__(self, layers: Any, t0: float) -> None:
        self._layers = layers
        self._t0 = t0
        self.arrivals: list[tuple[int, float]] = []
        self.computed: list[tuple[int, float]] = []

    def __aiter__(self) -> _Timed:
        return self

    async def __anext__(self) -> int:
        layer = int(await self._layers.__anext__())
        self.arrivals.append((layer, time.perf_counter() - self._t0))
        return layer

    def layer_computed(self, layer: int) -> None:
        self.computed.append((layer, time.perf_counter() - self._t0))


def _stats(st: Any) -> dict[str, Any]:
    return {"nbytes": st.nbytes, "raw_bytes": st.raw_bytes, "seconds": st.seconds,
            "first_layer_seconds": st.first_layer_seconds, "codec": st.codec, "path": st.path,
            "chunks": getattr(st, "chunks", None)}


def _prompt_kv(model: TinyLlama, cache: kv.KVCache, block_ids: Sequence[int], n: int) -> list[torch.Tensor]:
    """K then V of positions 0..n-1 of every layer, gathered from the paged cache, as float32."""
    c = model.config
    bs = c.block_size
    pos = torch.arange(n)
    slots = (torch.as_tensor(list(block_ids), dtype=torch.long)[pos // bs] * bs + pos % bs).to(cache.device)
    out = []
    for li in range(c.num_layers):
        for t in (cache.key(li), cache.value(li)):
            out.append(t.view(-1, c.num_kv_heads, c.head_dim)[slots].float().cpu())
    return out


def _agreement(got: list[int], ref: list[int]) -> tuple[int, float]:
    same = [a == b for a, b in zip(got, ref, strict=True)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return prefix, sum(same) / len(same)


def _setup(args: argparse.Namespace, rank: int) -> tuple[TinyLlama, list[int], kv.KVCache, list[int]]:
    """The model, the prompt, this rank's cache and its shuffled block ids (prompt blocks first)."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # both ranks alike: the same arithmetic in both processes
    cfg = TinyConfig(dtype=args.dtype, seed=args.seed)
    model = TinyLlama(cfg, device=args.device)
    prompt = random_prompt(cfg, args.prompt_len, seed=args.seed + 1)
    total = blocks_needed(cfg, args.prompt_len + args.steps)
    num_blocks = 3 * total + 5
    block_ids = random.Random(1000 + rank).sample(range(num_blocks), total)
    return model, prompt, model.allocate_cache(num_blocks), block_ids


async def prefill_worker(args: argparse.Namespace, comm: sc.Communicator, chan: kv.KVChannel, model: TinyLlama,
                         prompt: list[int], cache: kv.KVCache, block_ids: list[int]) -> dict[str, Any]:
    ids = block_ids[: blocks_needed(model.config, len(prompt))]
    t = time.perf_counter()
    logits = model.prefill(prompt, cache, ids)
    prefill_s = time.perf_counter() - t
    first = int(logits.argmax())
    await comm.send(torch.tensor([first], dtype=torch.int64), 1, tag=FIRST_TOKEN_TAG, timeout=args.timeout)
    transfers = []
    for codec in args.codecs:
        st = await chan.send(f"req-{codec}", 1, ids, codec=codec, timeout=args.timeout)
        transfers.append(_stats(st))
    return {"role": "prefill", "block_ids": ids, "first_token": first, "prefill_seconds": prefill_s,
            "transfers": transfers}


async def decode_worker(args: argparse.Namespace, comm: sc.Communicator, chan: kv.KVChannel, model: TinyLlama,
                        prompt: list[int], cache: kv.KVCache, block_ids: list[int]) -> dict[str, Any]:
    cfg = model.config
    n_prompt = blocks_needed(cfg, len(prompt))
    buf = torch.zeros(1, dtype=torch.int64)
    await comm.recv(buf, 0, tag=FIRST_TOKEN_TAG, timeout=args.timeout)
    first = int(buf[0])
    runs = []
    for codec in args.codecs:
        for li in range(cfg.num_layers):  # start each transfer from an empty cache
            cache.key(li).zero_()
            cache.value(li).zero_()
        async with chan.receive(f"req-{codec}", 0, block_ids[:n_prompt], timeout=args.timeout) as stream:
            timed = _Timed(stream, time.perf_counter())
            logits = await model.decode_step_streaming(first, len(prompt), cache, block_ids, timed,
                                                       on_layer=timed.layer_computed)
        step_logits = [logits]
        tokens = [first, int(logits.argmax())]
        for s in range(1, args.steps):
            logits = model.decode_step(tokens[-1], len(prompt) + s, cache, block_ids)
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
        runs.append({"codec": codec, "tokens": tokens, "step_logits": step_logits,
                     "kv": _prompt_kv(model, cache, block_ids, len(prompt)),
                     "layers_arrived": timed.arrivals, "layers_computed": timed.computed,
                     "stats": _stats(stream.stats) if stream.stats is not None else None})

    # the same generation in this one process, on a fresh cache with contiguous blocks
    ref_cache = model.allocate_cache(blocks_needed(cfg, len(prompt) + args.steps))
    ref_ids = list(range(ref_cache.num_blocks))
    ref_logits: list[torch.Tensor] = []
    ref = greedy(model, prompt, args.steps, ref_cache, ref_ids, ref_logits)
    ref_kv = _prompt_kv(model, ref_cache, ref_ids, len(prompt))

    results = []
    for run in runs:
        got, want = run["tokens"], ref
        prefix, frac = _agreement(got[1:], want[1:])  # tokens[0] came from the prefill, not through the KV
        d = (run["step_logits"][0] - ref_logits[1]).abs()
        # how close the one-process model itself was to a tie where the tokens first part: a small gap means any
        # perturbation of the KV (or of the arithmetic) flips that choice, not that the codec is poor
        gap = None
        if prefix < len(got) - 1:
            top = ref_logits[1 + prefix].topk(2).values
            gap = float(top[0] - top[1])
        kv_err = max(float((a - b).abs().max()) for a, b in zip(run["kv"], ref_kv, strict=True))
        kv_scale = max(float(b.abs().max()) for b in ref_kv)
        arrived = [li for li, _ in run["layers_arrived"]]
        results.append({
            "codec": run["codec"], "tokens": got, "reference": want, "tokens_equal": got == want,
            "agree_prefix": prefix, "agree_fraction": frac, "decode_tokens": len(got) - 1,
            "reference_top2_gap_at_divergence": gap,
            "logits_max_abs_diff": float(d.max()),
            "logits_max_rel_diff": float(d.max()) / float(ref_logits[1].abs().max()),
            "logits_rel_l2": float(d.norm()) / float(ref_logits[1].norm()),
            "sent_codec": run["stats"]["codec"] if run["stats"] else None,
            "first_step_argmax_equal": int(run["step_logits"][0].argmax()) == int(ref_logits[1].argmax()),
            "kv_max_abs_err": kv_err, "kv_max_rel_err": kv_err / kv_scale,
            "layers_in_order": arrived == list(range(cfg.num_layers)),
            "layers_arrived": run["layers_arrived"], "layers_computed": run["layers_computed"],
            "stats": run["stats"]})
    return {"role": "decode", "block_ids": block_ids, "first_token": first,
            "first_token_matches": first == ref[0], "runs": results}


async def run_rank(args: argparse.Namespace) -> dict[str, Any]:
    rank = args.rank
    model, prompt, cache, block_ids = _setup(args, rank)
    with anyio.fail_after(args.timeout):
        async with sc.init_process_group(f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=2,
                                         transport=None if args.transport == "auto" else args.transport,
                                         timeout=args.timeout) as comm:
            # ipc=False: CUDA caches on one host stream their chunks (and so go through the codec) instead of
            # being copied straight out of the sender's GPU memory, which moves raw bytes whatever the codec
            chan = kv.KVChannel(comm, cache, name="disagg", ipc=not args.no_ipc)
            worker = prefill_worker if rank == 0 else decode_worker
            out = await worker(args, comm, chan, model, prompt, cache, block_ids)
            transport = comm.transport
    return {"rank": rank, "transport": transport, "backend": args.backend, "device": args.device,
            "dtype": args.dtype, "prompt_len": args.prompt_len, "steps": args.steps,
            "layout": model.layout().describe(), **out}


# -- report -----------------------------------------------------------------------------------------
def describe(result: dict[str, Any]) -> str:
    """A readable report of one rank's result."""
    r = result
    head = (f"rank {r['rank']} ({r['role']}): {r['layout']}, prompt {r['prompt_len']} tokens, {r['steps']} decode "
            f"steps, {r['device']}, {r['backend']} over {r['transport']}")
    lines = [head]
    if r["role"] == "prefill":
        lines.append(f"  prefill {r['prefill_seconds'] * 1e3:.1f} ms into blocks {r['block_ids']}; "
                     f"first token {r['first_token']}")
        for t in r["transfers"]:
            lines.append(f"  sent {t['codec']:>4}: {t['raw_bytes']} B of KV as {t['nbytes']} B on the wire "
                         f"({t['path']}) in {t['seconds'] * 1e3:.1f} ms")
        return "\n".join(lines)
    lines.append(f"  received into blocks {r['block_ids']}; first token {r['first_token']} "
                 f"({'same as' if r['first_token_matches'] else 'DIFFERENT FROM'} one-process prefill)")
    for x in r["runs"]:
        st = x["stats"] or {}
        n = x["decode_tokens"]
        order = "in order" if x["layers_in_order"] else "OUT OF ORDER"
        sent_as = "" if x["sent_codec"] == x["codec"] else f" (moved as {x['sent_codec']})"
        lines.append(f"  codec {x['codec']}{sent_as}: {st.get('nbytes', '?')} B on the wire ({st.get('path', '?')}), "
                     f"layer 0 after {st.get('first_layer_seconds', 0) * 1e3:.1f} ms, all after "
                     f"{st.get('seconds', 0) * 1e3:.1f} ms; layers {order} {[li for li, _ in x['layers_arrived']]}")
        lines.append(f"    tokens    {x['tokens']}")
        lines.append(f"    reference {x['reference']}")
        verdict = "tokens EXACTLY EQUAL" if x["tokens_equal"] else "tokens differ"
        lines.append(f"    {verdict}: {x['agree_prefix']}/{n} decode tokens "
                     f"equal before the first divergence, {x['agree_fraction']:.0%} equal position by position"
                     + ("" if x["reference_top2_gap_at_divergence"] is None else
                        f" (one-process top-2 logit gap there: {x['reference_top2_gap_at_divergence']:.3g})"))
        lines.append(f"    first decode step logits vs one process: max |diff| {x['logits_max_abs_diff']:.3g} "
                     f"({x['logits_max_rel_diff']:.3g} of max |logit|; relative L2 {x['logits_rel_l2']:.3g}); "
                     f"KV max |err| {x['kv_max_abs_err']:.3g} ({x['kv_max_rel_err']:.3g} of max |KV|)")
    return "\n".join(lines)


# -- launching both ranks -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_command(args: argparse.Namespace, rank: int, port: int) -> list[str]:
    return [sys.executable, __file__, "--rank", str(rank), "--port", str(port), "--codec", ",".join(args.codecs),
            "--transport", args.transport, "--backend", args.backend, "--prompt-len", str(args.prompt_len),
            "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed),
            "--threads", str(args.threads), "--timeout", str(args.timeout), *(["--no-ipc"] if args.no_ipc else [])]


def run_both(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start both ranks as subprocesses; every one is killed at the deadline or when the other fails."""
    port = free_port()
    deadline = time.monotonic() + args.timeout + 30
    with tempfile.TemporaryDirectory(prefix="kv-disagg-") as tmp:
        logs = [Path(tmp) / f"rank{r}.log" for r in (0, 1)]
        outs = [open(p, "w+") for p in logs]  # noqa: SIM115 - closed below
        procs = [subprocess.Popen(rank_command(args, r, port), stdin=subprocess.DEVNULL, stdout=outs[r],
                                  stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        try:
            failed_at = None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = now  # give the other rank a moment to report what it saw
                if now > deadline or (failed_at is not None and now > failed_at + 5):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            for f in outs:
                f.close()
        texts = [p.read_text() for p in logs]
    results = []
    for r, (p, text) in enumerate(zip(procs, texts, strict=True)):
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"rank {r} exited {p.returncode}:\n{text[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codec", default="none,fp8", help="comma-separated: none, fp8, int8 (one transfer each)")
    ap.add_argument("--transport", default="auto", choices=["auto", "tcp", "shm"])
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8, help="decode steps after the prefill's token")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-ipc", action="store_true",
                    help="CUDA caches: stream the chunks (through the codec) rather than copy over CUDA IPC")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a rank may take in all")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write both ranks' results as JSON to PATH (no PATH: JSON alone on stdout)")
    ap.add_argument("--rank", type=int, choices=[0, 1], default=None, help="run just this rank")
    ap.add_argument("--port", type=int, default=29555, help="rendezvous port (with --rank)")
    args = ap.parse_args(argv)
    args.codecs = [c.strip() for c in args.codec.split(",") if c.strip()]
    for c in args.codecs:
        kv.get_codec(c)  # an unknown name fails here, before any process starts
    if args.rank is not None:
        result = anyio.run(run_rank, args, backend=args.backend)
        print(describe(result), flush=True)
        print("RESULT " + json.dumps(result), flush=True)
        return 0  # the verdict is the launcher's (or the reader's): this rank did its part
    results = run_both(args)
    text = "\n".join(describe(r) for r in results)
    doc = json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "rank", "port")},
                      "ranks": results}, indent=1)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(doc)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(doc + "\n")
    decode = results[1]
    bad = [x["codec"] for x in decode["runs"] if x["codec"] == "none" and not x["tokens_equal"]]
    if bad:
        print("FAILED: tokens differ with no codec", file=sys.stderr)
    return 1 if bad or not decode["first_token_matches"] else 0


if __name__ == "__main__":
    sys.exit(main())
