"""One rank of a torch-lane test: `python lane_worker.py SCENARIO RANK WORLD PORT BACKEND [ARG]`.

Joins a world with `sc.init_process_group`, opens a gloo `TorchLane` on CPU from
it and prints one line `RESULT <json>` (see test_torch_lane.py). Scenarios:

- ops: every lane op on float32 and int64 tensors, awaited through `DeviceOps.await_work`;
- unavailable ARG: rank ARG says it cannot use the backend; every rank must get LaneUnavailable,
  then the communicator must still work and a lane opened afterwards must too;
- shared_gpu: every rank reports the same device identity; LaneUnavailable everywhere;
- frozen_peer: the last rank never posts its part of a lane op (the test freezes it);
  the others must get PeerLost from `await_work` within the heartbeat bound.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import torch

import sagellm_comm as sc
from sagellm_comm.device_ops import DeviceOps
from sagellm_comm.transports import nccl
from sagellm_comm.transports.nccl import LaneUnavailable, TorchLane, open_lane

CPU = torch.device("cpu")
HOST = "127.0.0.1"
OP_SECONDS = 3  # a lane op on a few elements takes milliseconds


def report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


async def lane_ops(comm: sc.Communicator, lane: TorchLane, ops: DeviceOps) -> dict[str, str]:
    """Every lane op; each check maps to "" (right values) or what went wrong.

    An op that raises when issued (before any data moves) raises alike on every
    rank, so the ranks stay in step and the remaining ops still run; so does one
    whose work never completes (every rank gives up on it after OP_SECONDS and
    opens a new lane for the rest).
    """
    r, n = comm.rank, comm.world_size
    checks: dict[str, str] = {}
    current = [lane]

    async def run(name: str, issue: Callable[[TorchLane], Any], out: Any, want: Any) -> None:
        """Issue an op (one Work, or a list of them), await it through `await_work`, check `out`."""
        try:
            issued = issue(current[0])
        except Exception as e:
            checks[name] = f"raised when issued: {fail_note(e)}"
            return
        works = issued if isinstance(issued, list) else [issued]
        try:
            with anyio.fail_after(OP_SECONDS):
                for work in works:
                    await ops.await_work(current[0], work, name.split("/")[0])
        except TimeoutError:
            checks[name] = (f"await_work did not return within {OP_SECONDS} s (work.is_completed(): "
                            f"{[w.is_completed() for w in works]}; output {out.tolist()})")
            assert current[0].aborted  # await_work aborts the lane it gave up on
            current[0] = await open_lane(comm, "gloo", CPU, 0, HOST)
            return
        except Exception as e:
            checks[name] = f"await_work raised: {fail_note(e)}"
            raise  # the ranks may be out of step now: stop
        ok = tuple(out.shape) == tuple(want.shape) and torch.equal(out.reshape(-1), want.reshape(-1))
        checks[name] = "" if ok else f"wrong values: {out.tolist()}, expected {want.tolist()}"

    fns = {"sum": torch.add, "prod": torch.mul, "min": torch.minimum, "max": torch.maximum,
           "band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}
    for dtype in (torch.float32, torch.int64):
        dname = str(dtype).removeprefix("torch.")

        def full(shape: tuple[int, ...], value: int, dtype: Any = dtype) -> Any:
            return torch.full(shape, value, dtype=dtype)

        def arange(k: int, dtype: Any = dtype) -> Any:
            return torch.arange(k, dtype=dtype)

        reduce_ops = ["sum", "prod", "min", "max"] + (["band", "bor", "bxor"] if dtype == torch.int64 else [])
        for op in reduce_ops:
            t = arange(6) + r + 1  # rank q holds k + q + 1 at index k
            want = arange(6) + 1
            for q in range(1, n):
                want = fns[op](want, arange(6) + q + 1)
            await run(f"all_reduce/{dname}/{op}", lambda ln, t=t, op=op: ln.all_reduce(t, op), t, want)

        # rank q contributes four times 10 q + 1; first into the output shape Communicator.all_gather
        # gives the lane, (world_size, *input.shape), then into a flat output
        gathered = (10 * arange(n) + 1).repeat_interleave(4)
        out = full((n, 4), -1)
        await run(f"all_gather/{dname}", lambda ln, out=out: ln.all_gather(out, full((4,), 10 * r + 1)),
                  out, gathered.reshape(n, 4))
        out = full((4 * n,), -1)
        await run(f"all_gather_flat/{dname}", lambda ln, out=out: ln.all_gather(out, full((4,), 10 * r + 1)),
                  out, gathered)

        # rank q holds k + 10 q at index k; this rank gets elements 3 r .. 3 r + 2 reduced
        mine = arange(3) + 3 * r
        for op, want in (("sum", n * mine + 10 * n * (n - 1) // 2), ("max", mine + 10 * (n - 1))):
            t = arange(3 * n) + 10 * r
            out = full((3,), -1)
            await run(f"reduce_scatter/{dname}/{op}", lambda ln, t=t, out=out, op=op: ln.reduce_scatter(out, t, op),
                      out, want)
            checks[f"reduce_scatter/{dname}/{op}/input_untouched"] = (
                "" if torch.equal(t, arange(3 * n) + 10 * r) else f"input changed: {t.tolist()}")

        for root in range(n):
            t = full((5,), 7 * r + 2)
            await run(f"broadcast/{dname}/root{root}", lambda ln, t=t, root=root: ln.broadcast(t, root),
                      t, full((5,), 7 * root + 2))

        # chunk j (two elements) of rank r holds 100 r + j and goes to rank j
        t = (arange(n) + 100 * r).repeat_interleave(2)
        out = full((2 * n,), -1)
        await run(f"all_to_all/{dname}", lambda ln, t=t, out=out: ln.all_to_all(out, t),
                  out, (100 * arange(n) + r).repeat_interleave(2))

        # a ring: send to the next rank and receive from the previous, two tags in flight at once
        got = full((2, 3), -1)

        def ring(ln: TorchLane, got: Any = got) -> list[Any]:
            works = []
            for i, tag in enumerate((7, 8)):
                works.append(ln.send(full((3,), 1000 * tag + r), (r + 1) % n, tag))
                works.append(ln.recv(got[i], (r - 1) % n, tag))
            return works

        prev = (r - 1) % n
        await run(f"send_recv/{dname}", ring, got, torch.stack([full((3,), 7000 + prev), full((3,), 8000 + prev)]))
    return checks


def fail_note(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


async def scenario(name: str, rank: int, world: int, port: int, arg: str) -> None:
    async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=60) as comm:
        r, n = comm.rank, comm.world_size
        ops = DeviceOps(comm, "auto", HOST)
        if name == "ops":
            lane = await open_lane(comm, "gloo", CPU, 0, HOST)
            waits = sc.device.stats.waits
            checks = await lane_ops(comm, lane, ops)
            report(rank=r, world=n, backend=lane.backend, lane_rank=lane.rank, lane_size=lane.size,
                   aborted=lane.aborted, waits=sc.device.stats.waits - waits, checks=checks,
                   ok=not any(checks.values()))
            await comm.barrier()
        elif name in ("unavailable", "shared_gpu"):
            if name == "unavailable" and r == int(arg):
                real = nccl.backend_available
                nccl.backend_available = lambda backend: False
            elif name == "shared_gpu":
                real_identity = nccl._gpu_identity
                nccl._gpu_identity = lambda device: "GPU-0000-same-for-everyone"
            error, message = "", ""
            try:
                await open_lane(comm, "gloo", CPU, 0, HOST)
            except LaneUnavailable as e:
                error, message = "LaneUnavailable", str(e)
            except Exception as e:
                error, message = type(e).__name__, str(e)
            # the communicator is still in step: a host all_reduce on numpy arrays
            x = np.arange(5, dtype=np.float32) + r
            await comm.all_reduce(x)
            reduced = bool(np.array_equal(x, n * np.arange(5, dtype=np.float32) + n * (n - 1) / 2))
            # and, the backend restored, a lane opens and works
            if name == "unavailable" and r == int(arg):
                nccl.backend_available = real
            elif name == "shared_gpu":
                nccl._gpu_identity = real_identity
            t = torch.full((4,), r + 1, dtype=torch.int64)
            after = ""
            try:
                lane = await open_lane(comm, "gloo", CPU, 0, HOST)
                await ops.await_work(lane, lane.all_reduce(t, "sum"), "all_reduce")
            except Exception as e:
                after = fail_note(e)
            report(rank=r, error=error, message=message, reduced=reduced, after=after,
                   lane_sum=t.tolist())
            await comm.barrier()
        elif name == "frozen_peer":
            lane = await open_lane(comm, "gloo", CPU, 0, HOST)
            t = torch.ones(4)
            await ops.await_work(lane, lane.all_reduce(t, "sum"), "all_reduce")
            print("READY", flush=True)
            if r == n - 1:
                await anyio.sleep(60)  # the test freezes this process with SIGSTOP, then kills it
                return
            await anyio.sleep(0.5)  # the test freezes the last rank meanwhile
            t0 = time.monotonic()
            try:
                await ops.await_work(lane, lane.all_reduce(t, "sum"), "all_reduce")
                report(rank=r, error="", seconds=time.monotonic() - t0)
            except sc.CommError as e:
                report(rank=r, error=type(e).__name__, message=str(e), peer=getattr(e, "peer", None),
                       aborted=lane.aborted, seconds=time.monotonic() - t0)
            await anyio.sleep(4)  # stay until the other survivor has seen the frozen rank itself
            os._exit(0)  # gloo's threads may still wait on the frozen peer: do not join them


def main() -> None:
    name, rank, world, port, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    arg = sys.argv[6] if len(sys.argv) > 6 else ""
    anyio.run(scenario, name, rank, world, port, arg, backend=backend)


if __name__ == "__main__":
    main()
