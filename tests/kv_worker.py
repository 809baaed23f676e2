"""One rank of a multi-process KV test: `python kv_worker.py SCENARIO RANK WORLD PORT BACKEND`.

Rank 0 is the prefill side (sender), rank 1 the decode side (receiver). Both build
the sender's cache from the same seed, so the receiver checks every byte it got
against its own copy of what was sent. Prints `RESULT <json>`.
"""

from __future__ import annotations

import json
import sys
import time

import anyio
import torch

import sagellm_comm as sc
from sagellm_comm import kv

LAYOUT = kv.KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
BIG = kv.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")  # 128 KiB/token


def report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def sender_cache(layout: kv.KVLayout, num_blocks: int) -> kv.KVCache:
    g = torch.Generator().manual_seed(1234)
    cache = kv.KVCache.allocate(layout, num_blocks)
    for layer in range(layout.num_layers):
        cache.key(layer).copy_(torch.randn(cache.key(layer).shape, generator=g))
        cache.value(layer).copy_(torch.randn(cache.value(layer).shape, generator=g))
    return cache


async def roundtrip(comm: sc.Communicator) -> dict[str, object]:
    src = sender_cache(LAYOUT, 64)
    src_ids = [*range(40, 64), 3, 1, 7]  # a long run and scattered blocks
    dst_ids = [5, 6, 7, *range(20, 44)]
    if comm.rank == 0:
        chan = kv.KVChannel(comm, src, chunk_bytes=64 * 1024)
        for req, codec in (("exact", None), ("fp8", "fp8"), ("int8", "int8")):
            await chan.send(req, 1, src_ids, codec=codec)
        return {"ok": True}
    dst = kv.KVCache.allocate(LAYOUT, 64)
    chan = kv.KVChannel(comm, dst, chunk_bytes=64 * 1024)
    checks: dict[str, object] = {}
    order = [layer async for layer in chan.receive("exact", 0, dst_ids)]
    checks["order"] = order == list(range(LAYOUT.num_layers))
    checks["exact"] = all(torch.equal(src.key(i)[src_ids], dst.key(i)[dst_ids])
                          and torch.equal(src.value(i)[src_ids], dst.value(i)[dst_ids])
                          for i in range(LAYOUT.num_layers))
    for req in ("fp8", "int8"):
        st = await chan.recv(req, 0, dst_ids)
        a = torch.stack([src.key(i)[src_ids] for i in range(LAYOUT.num_layers)]).float()
        b = torch.stack([dst.key(i)[dst_ids] for i in range(LAYOUT.num_layers)]).float()
        rel = ((a - b).norm() / a.norm()).item()
        checks[req] = 0 < rel < 0.08 and st.raw_bytes / st.nbytes > 1.9
    return {"ok": all(bool(v) for v in checks.values()), "checks": checks}


async def killed(comm: sc.Communicator) -> dict[str, object]:
    src_ids = list(range(64))
    if comm.rank == 0:
        chan = kv.KVChannel(comm, sender_cache(LAYOUT, 64), window=1, chunk_bytes=16 * 1024)
        await chan.send("dies", 1, src_ids)  # the test kills this process meanwhile
        return {"error": ""}
    chan = kv.KVChannel(comm, kv.KVCache.allocate(LAYOUT, 64), window=1, chunk_bytes=16 * 1024)
    t0 = 0.0
    try:
        async for layer in chan.receive("dies", 0, src_ids):
            if layer == 0:
                print("STARTED", flush=True)
            t0 = time.monotonic()
            await anyio.sleep(0.3)  # slow consumer: the kill lands mid-transfer
        return {"error": ""}
    except sc.CommError as e:
        # caught_at: the host's wall clock, which the test compares with the time it sent SIGKILL
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0,
                "caught_at": time.time()}


async def priority(comm: sc.Communicator) -> dict[str, object]:
    """A high-priority all_reduce issued during a bulk transfer finishes while it is still running."""
    tokens = 2048  # 256 MiB of KV at 128 KiB per token
    n = tokens // BIG.block_size
    ids = list(range(n))
    cache = kv.KVCache.allocate(BIG, n) if comm.rank == 1 else sender_cache(BIG, n)
    chan = kv.KVChannel(comm, cache)
    state = {"transfer_done": False}
    x = torch.ones(16)

    async def transfer() -> None:
        if comm.rank == 0:
            await chan.send("bulk", 1, ids)
        else:
            await chan.recv("bulk", 0, ids)
        state["transfer_done"] = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(transfer)
        await comm.barrier()
        if comm.rank == 1:
            while chan.counters["chunks_received"] < 2:  # the bulk transfer is well under way
                await anyio.sleep(0.001)
        await comm.all_reduce(x, priority="high")
        during = not state["transfer_done"]
    return {"ok": bool(x[0] == 2), "during": during, "chunks": chan.counters["chunks_received"]}


async def main(name: str, rank: int, port: int) -> None:
    async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=60,
                                     heartbeat_timeout=5.0) as comm:
        result = await {"roundtrip": roundtrip, "killed": killed, "priority": priority}[name](comm)
        report(rank=rank, **result)


if __name__ == "__main__":
    scenario, rank_s, _world, port_s, backend = sys.argv[1:6]
    anyio.run(main, scenario, int(rank_s), int(port_s), backend=backend)
