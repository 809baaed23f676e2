"""One rank on one namespace "host": `python host_worker.py '<json spec>'`.

The spec names the scenario, rank, world size, master address and port, token
and event loop. The rank prints `READY` once it is inside its fault loop and
`RESULT <json>` with what it saw: checks of every op, the error it got and the
wall-clock time (time.time(), one clock for every namespace on the machine) at
which it got it, so the test can measure the time from the fault to the error.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import numpy as np

import sagellm_comm as sc


def report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def _init(spec: dict[str, Any], port: int) -> Any:
    return sc.init_process_group(f"tcp://{spec['master']}:{port}", rank=spec["rank"], world_size=spec["world"],
                                 token=spec["token"], timeout=spec.get("init_timeout", 60),
                                 transport=spec.get("transport", "tcp"),
                                 heartbeat_interval=spec.get("hb_interval"), heartbeat_timeout=spec.get("hb_timeout"))


async def every_op(comm: sc.Communicator) -> dict[str, bool]:
    """Each collective and p2p once per dtype and size, checked against the closed form."""
    r, n = comm.rank, comm.world_size
    checks: dict[str, bool] = {}
    for dtype in (np.float32, np.float64, np.int32, np.int64, np.uint8):
        for size in (3, 70_000):
            tag = f"{np.dtype(dtype).name}/{size}"
            base = (np.arange(size) % 50).astype(dtype)
            x = base + dtype(r)
            await comm.all_reduce(x)
            checks[f"all_reduce/{tag}"] = bool(np.array_equal(x, base * n + dtype(n * (n - 1) // 2)))
            m = base + dtype(r)
            await comm.all_reduce(m, op="max")
            checks[f"all_reduce_max/{tag}"] = bool(np.array_equal(m, base + dtype(n - 1)))
            g = await comm.all_gather(np.full(size, r, dtype=dtype))
            checks[f"all_gather/{tag}"] = bool(all((np.asarray(g[i]) == i).all() for i in range(n)))
            rs = await comm.reduce_scatter(np.ones(n * size, dtype=dtype) * dtype(r + 1))
            checks[f"reduce_scatter/{tag}"] = bool((rs == n * (n + 1) // 2).all() and rs.shape == (size,))
            b = np.full(size, r, dtype=dtype)
            await comm.broadcast(b, root=n - 1)
            checks[f"broadcast/{tag}"] = bool((b == n - 1).all())
            a = await comm.all_to_all(np.repeat(np.arange(n) + 10 * r, size).astype(dtype))
            checks[f"all_to_all/{tag}"] = bool(all((a[j * size:(j + 1) * size] == 10 * j + r).all() for j in range(n)))
            await comm.send(np.full(size, r, dtype=dtype), (r + 1) % n, tag=7)
            got = np.zeros(size, dtype=dtype)
            await comm.recv(got, (r - 1) % n, tag=7)
            checks[f"send_recv/{tag}"] = bool((got == (r - 1) % n).all())
    await comm.barrier()
    return checks


async def small_all_reduce_ms(comm: sc.Communicator, times: int = 20) -> float:
    """Mean time of back-to-back 8-byte all_reduces from a barrier.

    Each needs every rank's contribution to the one before, so in a row they
    take at least one one-way network delay apiece (a lone call can be quicker:
    the others' data may already be there)."""
    x = np.ones(2, dtype=np.float32)
    await comm.barrier()
    t = time.perf_counter()
    for _ in range(times):
        await comm.all_reduce(x)
    return (time.perf_counter() - t) * 1000 / times


async def ops(spec: dict[str, Any], port: int) -> None:
    async with _init(spec, port) as comm:
        checks: dict[str, bool] = {}
        t = time.perf_counter()
        for _ in range(spec.get("rounds", 1)):
            for k, v in (await every_op(comm)).items():
                checks[k] = checks.get(k, True) and v
        seconds = time.perf_counter() - t
        model = comm.cost_model
        sweep = [(op, n) for op in ("all_reduce", "all_gather", "reduce_scatter") for n in (64, 1 << 20, 1 << 26)]
        choices = [] if model is None else [model.choose(op, n, comm.world_size)[0] for op, n in sweep]
        report(rank=comm.rank, ok=all(checks.values()), failed=[k for k, v in checks.items() if not v],
               checks=len(checks), seconds=seconds, small_all_reduce_ms=await small_all_reduce_ms(comm),
               links=sorted({str(v["transport"]) for v in comm.peer_transports().values()}),
               classes=comm.topology.link_classes() if comm.topology else [], choices=choices)


async def until_fault(spec: dict[str, Any], port: int) -> dict[str, Any]:
    """all_reduce 4 MiB over and over until the fault the test inflicts makes one fail."""
    async with _init(spec, port) as comm:
        x = np.ones(1 << 20, dtype=np.float32)
        await comm.all_reduce(x)
        print("READY", flush=True)
        done = 0
        try:
            with anyio.fail_after(60):
                while True:
                    x[:] = 1
                    await comm.all_reduce(x)
                    if not (x == comm.world_size).all():
                        return {"error": "wrong result", "done": done}
                    done += 1
        except sc.CommError as e:
            return {"error": type(e).__name__, "message": str(e), "at": time.time(), "done": done}
        except TimeoutError:
            return {"error": "none in 60 s", "done": done}


async def scenario(spec: dict[str, Any]) -> None:
    if spec["scenario"] == "ops":
        await ops(spec, spec["port"])
    elif spec["scenario"] == "until_fault":
        report(rank=spec["rank"], **await until_fault(spec, spec["port"]))
    elif spec["scenario"] == "rebuild":  # survive a fault, then form a new world with a restarted rank
        first = await until_fault(spec, spec["port"])
        print("FAULT " + json.dumps(first), flush=True)
        await ops(spec, spec["port2"])


def main() -> None:
    spec = json.loads(sys.argv[1])
    anyio.run(scenario, spec, backend=spec["backend"])


if __name__ == "__main__":
    main()
