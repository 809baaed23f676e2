"""One rank of a CUDA KV test: `python kv_cuda_worker.py SCENARIO RANK WORLD PORT BACKEND`.

Rank 0 sends, rank 1 receives; with one GPU both share it (CUDA IPC works between
processes on one device), with two each takes its own. Both build the sender's
blocks from the same seed on the CPU, so the receiver checks what it got.
"""

from __future__ import annotations

import json
import sys

import anyio
import torch

import sagellm_comm as sc
from sagellm_comm import kv

LAYOUT = kv.KVLayout(num_layers=6, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
SRC_IDS = [*range(10, 30), 3, 1, 7]
DST_IDS = [0, 2, 4, *range(31, 51)]
REQUESTS = [  # (request, sender device, receiver device, codec, receiver may use IPC)
    ("ipc", "cuda", "cuda", None, True),
    ("ipc-fp8", "cuda", "cuda", "fp8", True),
    ("staged", "cuda", "cuda", None, False),
    ("staged-fp8", "cuda", "cuda", "fp8", False),
    ("staged-int8", "cuda", "cuda", "int8", False),
    ("cpu-to-cuda", "cpu", "cuda", None, True),
    ("cuda-to-cpu", "cuda", "cpu", None, True),
    ("cuda-to-cpu-fp8", "cuda", "cpu", "fp8", True),
]


def reference() -> kv.KVCache:
    g = torch.Generator().manual_seed(99)
    cache = kv.KVCache.allocate(LAYOUT, 64)
    for layer in range(LAYOUT.num_layers):
        cache.key(layer).copy_(torch.randn(cache.key(layer).shape, generator=g))
        cache.value(layer).copy_(torch.randn(cache.value(layer).shape, generator=g))
    return cache


def on(cache: kv.KVCache, device: str) -> kv.KVCache:
    return kv.KVCache(LAYOUT, [cache.key(i).to(device) for i in range(LAYOUT.num_layers)],
                      [cache.value(i).to(device) for i in range(LAYOUT.num_layers)])


async def main(rank: int, port: int) -> None:
    dev = f"cuda:{rank % torch.cuda.device_count()}"
    ref = reference()
    async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=120) as comm:
        out: dict[str, object] = {}
        for req, s_dev, r_dev, codec, use_ipc in REQUESTS:
            if rank == 0:
                cache = on(ref, dev if s_dev == "cuda" else "cpu")
                st = await kv.KVChannel(comm, cache, name=req).send(req, 1, SRC_IDS, codec=codec)
                out[req] = {"path": st.path}
                continue
            cache = kv.KVCache.allocate(LAYOUT, 64, device=dev if r_dev == "cuda" else "cpu")
            chan = kv.KVChannel(comm, cache, name=req, ipc=use_ipc)
            layers = [layer async for layer in chan.receive(req, 0, DST_IDS)]
            err = 0.0
            exact = True
            for i in range(LAYOUT.num_layers):
                for a, b in ((ref.key(i)[SRC_IDS], cache.key(i)[DST_IDS].cpu()),
                             (ref.value(i)[SRC_IDS], cache.value(i)[DST_IDS].cpu())):
                    exact = exact and bool(torch.equal(a, b))
                    err = max(err, ((a.float() - b.float()).norm() / a.float().norm()).item())
            others = [i for i in range(64) if i not in DST_IDS]
            untouched = all(not cache.key(i)[others].any() for i in range(LAYOUT.num_layers))
            out[req] = {"layers": layers == list(range(LAYOUT.num_layers)), "exact": exact, "rel_error": err,
                        "untouched": untouched}
        if rank == 1:  # which path each request took, as the sender saw it
            paths = torch.zeros(len(REQUESTS), dtype=torch.int64)
            await comm.recv(paths, 0, tag=5)
            for (req, *_), p in zip(REQUESTS, paths.tolist(), strict=True):
                out[req]["path"] = "ipc" if p else "stream"  # type: ignore[index]
        else:
            await comm.send(torch.tensor([out[r[0]]["path"] == "ipc" for r in REQUESTS],  # type: ignore[index]
                                         dtype=torch.int64), 1, tag=5)
        print("RESULT " + json.dumps({"rank": rank, **out}), flush=True)


if __name__ == "__main__":
    _scenario, rank_s, _world, port_s, backend = sys.argv[1:6]
    anyio.run(main, int(rank_s), int(port_s), backend=backend)
