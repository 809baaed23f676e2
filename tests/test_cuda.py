"""CUDA tensors end to end, on a GPU machine (skipped where torch sees no GPU).

Single-process tests use the world-1 communicator and the device waits; the
multi-process ones start one process per rank (tests/cuda_worker.py): two ranks on
one GPU are staged through pinned host memory, and with two GPUs each rank gets
its own and the group uses NCCL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]

import procs  # noqa: E402
import sagellm_comm as sc  # noqa: E402
from procs import free_port  # noqa: E402
from sagellm_comm.transports import nccl  # noqa: E402

WORKER = str(Path(__file__).with_name("cuda_worker.py"))


def cycles_for(ms: float) -> int:
    torch.cuda._sleep(1000)  # the first launch loads the kernel: keep it out of the calibration
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    return int(ms * 1_000_000 / start.elapsed_time(end))


@pytest.mark.anyio
async def test_wait_event_returns_after_the_gpu_passed_it() -> None:
    ev = torch.cuda.Event()
    torch.cuda._sleep(cycles_for(50))
    ev.record()
    assert not ev.query()
    t0 = time.perf_counter()
    with anyio.fail_after(10):
        await sc.device.wait_event(ev)
    assert ev.query() and time.perf_counter() - t0 > 0.02
    torch.cuda._sleep(cycles_for(30))
    with anyio.fail_after(10):
        await sc.device.wait_stream()
    assert torch.cuda.current_stream().query()


@pytest.mark.anyio
async def test_cancelled_wait_ends_at_once_while_the_gpu_goes_on() -> None:
    ev = torch.cuda.Event()
    torch.cuda._sleep(cycles_for(500))
    ev.record()
    t0 = time.perf_counter()
    with anyio.move_on_after(0.02) as scope:
        await sc.device.wait_event(ev)
    assert scope.cancelled_caught and time.perf_counter() - t0 < 0.2
    assert not ev.query()
    ev.synchronize()


@pytest.mark.anyio
async def test_other_tasks_run_while_a_wait_polls() -> None:
    ev = torch.cuda.Event()
    torch.cuda._sleep(cycles_for(100))
    ev.record()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not ev.query():
            ticks += 1
            await anyio.sleep(0.005)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await sc.device.wait_event(ev)
    assert ticks >= 5


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["auto", "nccl"])
async def test_world_of_one_runs_every_op_on_cuda(backend: str) -> None:
    with anyio.fail_after(60):
        async with sc.init_process_group(f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                         backend=backend) as comm:
            x = torch.arange(10, device="cuda", dtype=torch.float32)
            torch.cuda._sleep(cycles_for(20))  # queued work the op must come after
            x.mul_(2)
            await comm.all_reduce(x)
            assert torch.equal(x.cpu(), torch.arange(10, dtype=torch.float32) * 2)
            g = await comm.all_gather(x)
            assert g.shape == (1, 10) and g.is_cuda and torch.equal(g[0], x)
            rs = await comm.reduce_scatter(x)
            assert torch.equal(rs, x) and rs.data_ptr() != x.data_ptr()
            a = await comm.all_to_all(x)
            assert torch.equal(a, x)
            await comm.broadcast(x, root=0)
            assert comm.device_path == ("nccl" if backend == "nccl" else "host staging")
            with pytest.raises(sc.UnsupportedBuffer):
                await comm.all_reduce(torch.ones(4, 4, device="cuda").t())
            lanes = list(comm._device_ops().device_lanes.values())
    assert len(lanes) == (1 if backend == "nccl" else 0)
    # closing shut the NCCL process group down and let go of it, before interpreter exit
    assert all(lane.pg is None and lane.store is None and lane not in nccl._live_lanes for lane in lanes)


@pytest.mark.anyio
async def test_overlap_reports_what_it_hid() -> None:
    async with sc.init_process_group(f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1) as comm:
        side = torch.cuda.Stream()
        host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")

        async def offload() -> None:
            s = sc.device.comm_stream(dev.device)
            with torch.cuda.stream(s):
                host.copy_(dev, non_blocking=True)
            await sc.device.wait_stream(s)

        async def compute() -> None:
            with torch.cuda.stream(side):
                torch.cuda._sleep(cycles_for(5))
            await sc.device.wait_stream(side)

        with anyio.fail_after(30):
            async with comm.overlap() as ov:
                ov.start_comm(offload)
                ov.start_compute(compute)
        r = ov.report
        assert 0 < r.hidden_s <= min(r.comm_s, r.compute_s) + 1e-9 and 0.5 < r.efficiency <= 1.0
        assert r.wall_s < r.comm_s + r.compute_s


def run_ranks(scenario: str, world: int, backend: str, timeout: float, env: dict[str, str],
              report: list[int] | None = None) -> list[dict]:
    """The RESULTs of ranks `report` (default all) of a cuda_worker.py world."""
    with procs.Ranks(WORKER, scenario, world, backend, env=env) as ranks:
        return list(ranks.results(timeout=timeout, ranks=report).values())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_ranks_on_one_gpu_are_staged_through_the_host(backend: str) -> None:
    res = run_ranks("ops", 2, backend, 240, {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                                      "0").split(",")[0]})
    for r in res:
        assert r.get("ok"), r
        assert r["path"].startswith("host staging"), r
        if r["transport"] == "shm":  # CUDA p2p over shared memory goes by DMA through the rings
            assert "device copy into shm" in r["p2p"] and "device copy from shm" in r["p2p"], r


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_over_tcp_cuda_p2p_goes_through_pinned_bounce_buffers(backend: str) -> None:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    res = run_ranks("ops", 2, backend, 240, {"CUDA_VISIBLE_DEVICES": gpu, "SAGELLM_COMM_TRANSPORT": "tcp"})
    for r in res:
        assert r.get("ok"), r
        assert r["transport"] == "tcp" and "staged through pinned buffers" in r["p2p"], r
        assert not any(a.startswith("device copy") for a in r["p2p"]), r  # no shm here


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for an NCCL group")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_gpus_use_nccl_for_every_op(backend: str) -> None:
    res = run_ranks("ops", 2, backend, 240, {})
    for r in res:
        assert r.get("ok"), r
        assert r["path"] == "nccl", r


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs more than two GPUs (two are tested above)")
def test_every_gpu_of_the_host_uses_nccl_for_every_op() -> None:
    """One process per GPU on all of them (4 or 8 on the multi-GPU machines): every op, dtype and priority."""
    world = torch.cuda.device_count()
    res = run_ranks("ops", world, "asyncio", 480, {})
    assert len(res) == world
    for r in res:
        assert r.get("ok"), r
        assert r["path"] == "nccl", r


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for an NCCL group")
def test_a_rank_lost_inside_nccl_is_peer_lost_on_the_survivor() -> None:
    res = run_ranks("kill", 2, "asyncio", 120, {}, report=[0])  # rank 1 leaves without a word
    r0 = res[0]
    assert r0.get("error") == "PeerLost" and r0["seconds"] < 10, r0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cuda_receive_withdrawn_mid_transfer_keeps_the_message_whole(backend: str) -> None:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    res = run_ranks("cancel_recv", 2, backend, 180, {"CUDA_VISIBLE_DEVICES": gpu})
    r1 = res[1]
    assert r1["transport"] == "shm", r1
    assert r1["ok"], r1  # cancelled, then the next receive got every byte, in order


KV_WORKER = str(Path(__file__).with_name("kv_cuda_worker.py"))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_kv_transfers_between_cuda_caches_by_ipc_and_staged(backend: str) -> None:
    with procs.Ranks(KV_WORKER, "kv", 2, backend, env={"SAGELLM_COMM_TRANSPORT": "shm"}) as ranks:
        res = ranks.results(timeout=240, clean_exit=True)[1]
    want_path = {"ipc": "ipc", "ipc-fp8": "ipc", "cpu-to-cuda": "stream", "cuda-to-cpu": "stream"}
    for req, r in res.items():
        if req == "rank":
            continue
        assert r["layers"] and r["untouched"], (req, r)
        if req in want_path or (req.startswith("staged") and "8" not in req):
            assert r["exact"], (req, r)
        else:
            assert 0 < r["rel_error"] < 0.08, (req, r)
        assert r["path"] == want_path.get(req, "stream"), (req, r)
