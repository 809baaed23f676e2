"""One rank of a multi-process test: `python mp_worker.py SCENARIO RANK WORLD PORT BACKEND`.

Prints one line `RESULT <json>` with what the scenario observed, so the test
process (see test_multiprocess.py) can assert on every rank's outcome.
Under torchrun, RANK/WORLD_SIZE come from the environment (`env://`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio
import numpy as np

import sagellm_comm as sc


def report(**fields: object) -> None:
    line = json.dumps(fields)
    out_dir = os.environ.get("SAGELLM_TEST_OUT")
    if out_dir:  # under torchrun the ranks share one stdout; give each its own file
        with open(os.path.join(out_dir, f"rank{fields.get('rank', os.environ.get('RANK'))}.json"), "w") as f:
            f.write(line)
    print("RESULT " + line, flush=True)


async def all_ops(comm: sc.Communicator) -> dict[str, object]:
    r, n = comm.rank, comm.world_size
    checks: dict[str, bool] = {}
    for size in (3, 70_000):
        x = np.arange(size, dtype=np.float32) + r
        await comm.all_reduce(x)
        checks[f"all_reduce/{size}"] = bool(np.array_equal(x, n * np.arange(size, dtype=np.float32) + n * (n - 1) / 2))
        g = await comm.all_gather(np.full(size, r, dtype=np.int32))
        checks[f"all_gather/{size}"] = bool(all((g[i] == i).all() for i in range(n)))
        rs = await comm.reduce_scatter(np.ones(n * size, dtype=np.int64) * (r + 1))
        checks[f"reduce_scatter/{size}"] = bool((rs == n * (n + 1) // 2).all() and rs.shape == (size,))
        b = np.full(size, r, dtype=np.float64)
        await comm.broadcast(b, root=n - 1)
        checks[f"broadcast/{size}"] = bool((b == n - 1).all())
        a = await comm.all_to_all(np.repeat(np.arange(n, dtype=np.int16) + 100 * r, size))
        checks[f"all_to_all/{size}"] = bool(all((a[j * size:(j + 1) * size] == 100 * j + r).all() for j in range(n)))
    await comm.send(np.full(5, r, dtype=np.uint8), (r + 1) % n, tag=7)
    got = np.zeros(5, dtype=np.uint8)
    await comm.recv(got, (r - 1) % n, tag=7)
    checks["send_recv"] = bool((got == (r - 1) % n).all())
    await comm.barrier()
    return {"checks": checks, "ok": all(checks.values())}


async def scenario(name: str, rank: int | None, world: int | None, port: int) -> None:
    url = "env://" if name == "torchrun" else f"tcp://127.0.0.1:{port}"
    token = "right-token"
    if name == "wrong_token" and rank == 1:
        try:
            async with sc.init_process_group(url, rank=rank, world_size=world, token="wrong-token", timeout=10):
                report(error="")
        except sc.AuthError as e:
            report(error="AuthError", message=str(e))
        return
    kwargs: dict[str, object] = {"token": token} if name != "torchrun" else {}
    async with sc.init_process_group(url, rank=rank, world_size=world, timeout=60, **kwargs) as comm:
        r, n = comm.rank, comm.world_size
        if name in ("all_ops", "torchrun", "wrong_token", "garbage"):
            report(rank=r, world=n, transport=comm.transport, **await all_ops(comm))
        elif name == "killed_peer":
            x = np.ones(1 << 20, dtype=np.float32)
            await comm.all_reduce(x)
            print("READY", flush=True)
            if r == n - 1:
                await anyio.sleep(60)  # the test kills this process
                return
            t0 = time.monotonic()
            try:
                await comm.all_reduce(x)
                report(rank=r, error="")
            except sc.CommError as e:
                # caught_at: the host's wall clock, which the test compares with the time it sent SIGKILL
                report(rank=r, error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0,
                       caught_at=time.time())
        elif name == "frozen_peer":
            await comm.barrier()
            print("READY", flush=True)
            if r == n - 1:
                await anyio.sleep(60)  # the test freezes this process with SIGSTOP
                return
            t0 = time.monotonic()
            try:
                await comm.all_reduce(np.ones(10, dtype=np.float32))
                report(rank=r, error="")
            except sc.CommError as e:
                # caught_at: the host's wall clock, which the test compares with the time it sent SIGSTOP
                report(rank=r, error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0,
                       caught_at=time.time())
        elif name == "skip":
            errors = []
            messages = []
            first_error_s = None  # from entering the skipped barrier to its error (the callers' time to detect)
            t0 = time.monotonic()
            if r != 1:
                try:
                    await comm.barrier(timeout=2)
                except sc.CommError as e:
                    errors.append(type(e).__name__)
                    messages.append(str(e))
                    first_error_s = time.monotonic() - t0
            else:
                await anyio.sleep(6)  # well past the others' 2 s timeout, even on a loaded machine
            try:
                await comm.all_reduce(np.ones(4, dtype=np.float32), timeout=5)
            except sc.CommError as e:
                errors.append(type(e).__name__)
                messages.append(str(e))
            report(rank=r, errors=errors, messages=messages, seconds=time.monotonic() - t0,
                   first_error_s=first_error_s)
        elif name in ("mismatch_shape", "mismatch_kind"):
            t0 = time.monotonic()
            try:
                if name == "mismatch_shape":
                    await comm.all_reduce(np.ones(8 if r == 0 else 16, dtype=np.float32))
                elif r == 0:
                    await comm.broadcast(np.ones(8, dtype=np.float32))
                else:
                    await comm.all_reduce(np.ones(8, dtype=np.float32))
                report(rank=r, error="")
            except sc.CommError as e:
                report(rank=r, error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)


def main() -> None:
    name = sys.argv[1]
    if name == "torchrun":
        rank = world = None
        port, backend = 0, os.environ.get("SAGELLM_TEST_BACKEND", "asyncio")
    else:
        rank, world, port, backend = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    anyio.run(scenario, name, rank, world, port, backend=backend)


if __name__ == "__main__":
    main()
