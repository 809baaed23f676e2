"""`open_lane` / `TorchLane` over torch's gloo backend on CPU, across real processes.

Each test starts one process per rank (tests/lane_worker.py): the ranks join with
`sc.init_process_group`, bootstrap a gloo process group from that communicator
with `open_lane`, and await every Work through `DeviceOps.await_work`, the same
path CUDA tensors take on an NCCL lane. Processes are killed at each test's
deadline, so a hang is a failure.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import procs
from sagellm_comm.transports.nccl import backend_available

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not backend_available("gloo"),
                       reason="torch.distributed with the gloo backend is not available"),
]

WORKER = str(Path(__file__).with_name("lane_worker.py"))
BACKENDS = ["asyncio", "trio"]


def Ranks(scenario: str, world: int, backend: str, arg: str = "") -> procs.Ranks:
    return procs.Ranks(WORKER, scenario, world, backend, extra=(arg,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_every_lane_op_gives_the_right_values(world: int, backend: str) -> None:
    with Ranks("ops", world, backend) as ranks:
        results = ranks.results(timeout=150, clean_exit=True)
    names = None
    failed: list[str] = []
    for r, res in results.items():
        assert res["backend"] == "gloo" and res["lane_rank"] == r and res["lane_size"] == world, res
        checks = res["checks"]
        assert isinstance(checks, dict)
        names = names or sorted(checks)
        assert sorted(checks) == names  # every rank ran every check
        # float32 and int64, every op of the lane, all_reduce with every op the dtype has
        assert {"all_reduce/float32/prod", "all_reduce/int64/bxor", "all_gather/float32", "all_gather_flat/int64",
                "reduce_scatter/int64/sum", "reduce_scatter/float32/max", "broadcast/float32/root0",
                f"broadcast/int64/root{world - 1}", "all_to_all/int64", "send_recv/float32"} <= set(checks)
        failed += [f"rank {r} {k}: {v}" for k, v in checks.items() if v]
    assert not failed, "lane ops failed:\n" + "\n".join(sorted(failed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("world", "bad_rank"), [(2, 0), (2, 1), (3, 0), (3, 2)])
def test_one_rank_without_the_backend_is_lane_unavailable_everywhere(world: int, bad_rank: int,
                                                                     backend: str) -> None:
    with Ranks("unavailable", world, backend, str(bad_rank)) as ranks:
        results = ranks.results(timeout=90, clean_exit=True)
    for r, res in results.items():
        assert res["error"] == "LaneUnavailable", (r, res)
        assert f"ranks [{bad_rank}]" in str(res["message"]) and "gloo" in str(res["message"]), (r, res)
        assert res["reduced"], (r, res)  # the communicator still works: a numpy all_reduce was right
        # and once the rank has the backend again, a lane opens and reduces
        assert res["after"] == "" and res["lane_sum"] == [world * (world + 1) // 2] * 4, (r, res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_sharing_a_device_are_lane_unavailable_everywhere(backend: str) -> None:
    with Ranks("shared_gpu", 3, backend) as ranks:
        results = ranks.results(timeout=90, clean_exit=True)
    for r, res in results.items():
        assert res["error"] == "LaneUnavailable" and "share a GPU" in str(res["message"]), (r, res)
        assert res["reduced"] and res["after"] == "" and res["lane_sum"] == [6] * 4, (r, res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_peer_during_lane_op_is_peer_lost(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_COMM_HEARTBEAT_TIMEOUT", "3")
    monkeypatch.setenv("SAGELLM_COMM_HEARTBEAT_INTERVAL", "0.5")
    with Ranks("frozen_peer", 3, backend) as ranks:
        for r in range(3):
            ranks.wait_line(r, "READY", timeout=60)
        ranks.procs[2].send_signal(signal.SIGSTOP)  # it never joins the survivors' next all_reduce
        results = ranks.results(timeout=30, ranks=[0, 1])
    for r, res in results.items():
        assert res["error"] == "PeerLost" and res["peer"] == 2, (r, res)
        assert res["aborted"], (r, res)  # the lane was aborted rather than left hanging inside gloo
        assert isinstance(res["seconds"], float) and res["seconds"] < 3 + 2.0, (r, res)
