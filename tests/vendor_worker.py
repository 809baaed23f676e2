"""One rank of a vendor-lane test: `python vendor_worker.py SCENARIO RANK WORLD PORT LOOP VENDOR`.

FAKES: the test puts fake `torch_npu` / `torch_mlu` packages on PYTHONPATH (see
test_backends.py). Importing one registers "hccl" / "cncl" with torch's real
`torch.distributed.Backend.register_backend`, and the registered creator returns
torch's `ProcessGroupGloo`, which moves CPU tensors. This worker sets the testing
hook `vendor.cpu_lane = VENDOR`, so in a group made with `backend=VENDOR` CPU tensors
take the vendor lane: the lookup in torch's registry, the creator call, the
bootstrap, the awaiting and the op records run for real; no vendor library does.

Scenarios (each rank prints one line `RESULT <json>`):
- ops: p2p before the lane exists, every collective on the lane (two priorities),
  p2p on the lane, a bitwise reduction (refused), numpy arrays (our transports);
- fail: the fake creator raises on rank 1; every rank must get BackendUnavailable
  naming the device and the backend, and the group must still work on the host.
- close_mid_op: rank 0 closes its communicator while its all_reduce on the lane waits
  for rank 1, which never joins it; the close must not wait for the backend's timeout.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import numpy as np
import torch

import sagellm_comm as sc
from sagellm_comm.transports import nccl, vendor

OP_SECONDS = 20


def report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def records(comm: sc.Communicator) -> list[list[object]]:
    return [[r.op, r.algorithm, r.transport, r.reason, r.ok] for r in comm.stats.records]


async def ops(comm: sc.Communicator, name: str) -> dict[str, Any]:
    r, n = comm.rank, comm.world_size
    checks: dict[str, str] = {}

    def check(what: str, got: Any, want: Any) -> None:
        ok = tuple(got.shape) == tuple(want.shape) and torch.equal(got, want)
        checks[what] = "" if ok else f"got {got.tolist()}, expected {want.tolist()}"

    path_before = comm.device_path
    # p2p before any collective opened the lane: through a host copy, over our transports
    if r == 0:
        await comm.send(torch.arange(4, dtype=torch.float32), 1, tag=3)
    elif r == 1:
        got = torch.zeros(4)
        await comm.recv(got, 0, tag=3)
        check("p2p_before_lane", got, torch.arange(4, dtype=torch.float32))

    x = torch.arange(6, dtype=torch.float32) + r
    await comm.all_reduce(x)
    check("all_reduce/sum", x, n * torch.arange(6, dtype=torch.float32) + n * (n - 1) / 2)
    x = torch.full((3,), float(r))
    await comm.all_reduce(x, op="max")
    check("all_reduce/max", x, torch.full((3,), float(n - 1)))
    x = torch.full((5,), r + 1, dtype=torch.int64)
    await comm.all_reduce(x, op="prod", priority="high")  # a second lane, for priority "high"
    check("all_reduce/prod/high", x, torch.full((5,), float(np.prod(range(1, n + 1))), dtype=torch.int64))
    g = await comm.all_gather(torch.full((2,), 10 * r + 1, dtype=torch.int64))
    check("all_gather", g, (10 * torch.arange(n) + 1).repeat_interleave(2).reshape(n, 2))
    rs = await comm.reduce_scatter(torch.arange(2 * n, dtype=torch.float32) + r)
    check("reduce_scatter", rs, n * torch.arange(2 * r, 2 * r + 2, dtype=torch.float32) + n * (n - 1) / 2)
    b = torch.full((4,), float(r))
    await comm.broadcast(b, root=n - 1)
    check("broadcast", b, torch.full((4,), float(n - 1)))
    a = await comm.all_to_all((torch.arange(n) + 100 * r).repeat_interleave(2))
    check("all_to_all", a, (100 * torch.arange(n) + r).repeat_interleave(2))
    # p2p once the lane is open: on the lane
    if r == 0:
        await comm.send(torch.full((3,), 7.0), 1, tag=4)
    elif r == 1:
        got = torch.zeros(3)
        await comm.recv(got, 0, tag=4)
        check("p2p_on_lane", got, torch.full((3,), 7.0))

    refused = ""
    try:
        await comm.all_reduce(torch.ones(2, dtype=torch.int64), op="band")
    except sc.UnsupportedBuffer as e:
        refused = str(e)
    arr = np.arange(4, dtype=np.float32) + r
    await comm.all_reduce(arr)  # numpy: our transports, whatever the backend
    checks["numpy"] = "" if np.array_equal(arr, n * np.arange(4) + n * (n - 1) / 2) else f"got {arr}"
    fake = sys.modules[vendor.VENDORS[name].package]
    return dict(checks=checks, path_before=path_before, path=comm.device_path, refused=refused,
                records=records(comm), created=fake.created,
                backend_for=list(sc.backend_for(torch.ones(1), name)))


async def close_mid_op(comm: sc.Communicator) -> dict[str, Any]:
    await comm.all_reduce(torch.ones(4))  # opens the lane on both ranks
    lane = comm._device_ops().device_lanes[("cpu", 0)]
    if comm.rank == 1:  # never joins rank 0's second all_reduce; waits for rank 0 to go away
        error = ""
        try:
            await comm.recv(np.zeros(1), 0, tag=1)
        except sc.CommError as e:
            error = type(e).__name__
        return {"rank": 1, "error": error}
    error = ""
    closed_in = -1.0

    async def op() -> None:
        nonlocal error
        try:
            await comm.all_reduce(torch.ones(1 << 20))
        except sc.CommError as e:
            error = type(e).__name__

    async with anyio.create_task_group() as tg:
        tg.start_soon(op)
        await anyio.sleep(0.5)
        waiting = lane.waiting
        t0 = time.monotonic()
        await comm.aclose()
        closed_in = time.monotonic() - t0
    return {"rank": 0, "error": error, "waiting": waiting, "closed_in": closed_in, "aborted": lane.aborted,
            "live": lane in nccl._live_lanes}


async def scenario(name: str, rank: int, world: int, port: int, backend: str) -> None:
    vendor.cpu_lane = backend  # testing hook: CPU tensors take the (fake) vendor lane
    if name == "close_mid_op":
        async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=60,
                                         backend=backend) as comm:
            with anyio.fail_after(OP_SECONDS * 2):
                report(**await close_mid_op(comm))
        return
    result: dict[str, Any] = {}
    async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=60,
                                     backend=backend) as comm:
        with anyio.fail_after(OP_SECONDS * 4):
            if name == "ops":
                result = dict(rank=comm.rank, **await ops(comm, backend))
            elif name == "fail":
                error, message = "", ""
                try:
                    await comm.all_reduce(torch.ones(3))
                except sc.CommError as e:
                    error, message = type(e).__name__, str(e)
                arr = np.ones(3, np.float32)
                await comm.all_reduce(arr)
                result = dict(rank=comm.rank, error=error, message=message, host_ok=bool((arr == world).all()),
                              created=len(sys.modules[vendor.VENDORS[backend].package].created))
            lanes = list(comm._device_ops().device_lanes.values())
            await comm.barrier()
    # closing the communicator shut its process groups down and let go of them (a process
    # group left to interpreter finalization can abort the process as it exits)
    result["lanes_open_after_close"] = len(nccl._live_lanes)
    result["lanes_released"] = [lane.pg is None and lane.store is None for lane in lanes]
    report(**result)


def main() -> None:
    name, rank, world, port, loop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    anyio.run(scenario, name, rank, world, port, sys.argv[6], backend=loop)


if __name__ == "__main__":
    main()
