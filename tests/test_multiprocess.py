"""Real processes over real TCP sockets and shared memory: correctness and failure semantics.

Each test starts one process per rank (tests/mp_worker.py) and bounds everything
in time: processes are killed at the deadline, so a hang is a failure. The
transport is set per test through SAGELLM_COMM_TRANSPORT (auto picks shm here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import procs
from procs import free_port

pytestmark = pytest.mark.multiprocess

WORKER = str(Path(__file__).with_name("mp_worker.py"))
BACKENDS = ["asyncio", "trio"]
TRANSPORTS = ["tcp", "shm"]


def _ucx_skip() -> str | None:
    try:
        from sagellm_comm.transports.ucx import ucx_available
    except ImportError as e:
        return str(e)
    ok, why = ucx_available()
    return None if ok else why


def per_transport(fault: str, expect: str) -> list[Any]:
    """TRANSPORTS, each its own row of the reliability report (`fault` names it as {transport})."""
    return [pytest.param(t, marks=pytest.mark.fault(fault.format(transport=t), expect)) for t in TRANSPORTS]


def Ranks(scenario: str, world: int, backend: str, only: list[int] | None = None,
          port: int | None = None, transport: str = "auto") -> procs.Ranks:
    """mp_worker.py ranks with the transport set through SAGELLM_COMM_TRANSPORT."""
    return procs.Ranks(WORKER, scenario, world, backend, only=only, port=port,
                       env={"SAGELLM_COMM_TRANSPORT": transport})


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_op_across_processes(world: int, backend: str, transport: str) -> None:
    with Ranks("all_ops", world, backend, transport=transport) as ranks:
        results = ranks.results(timeout=90)
    for r, res in results.items():
        assert res["ok"], (r, res["checks"])
        assert res["world"] == world and res["rank"] == r
        assert res["transport"] == transport, res


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_across_processes_over_ucx(backend: str) -> None:
    reason = _ucx_skip()
    if reason:
        pytest.skip(reason)
    with Ranks("all_ops", 3, backend, transport="ucx") as ranks:
        results = ranks.results(timeout=90)
    for r, res in results.items():
        assert res["ok"] and res["transport"] == "ucx", (r, res)


def test_auto_picks_shared_memory_between_local_processes() -> None:
    with Ranks("all_ops", 2, "asyncio", transport="auto") as ranks:
        results = ranks.results(timeout=90)
    assert all(res["ok"] and res["transport"] == "shm" for res in results.values()), results


@pytest.mark.parametrize("transport", per_transport(
    "rank process killed (SIGKILL) while the other two wait in an all_reduce, 3 ranks over {transport}",
    "PeerLost on both survivors within 10 s"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_process_is_peer_lost_on_every_survivor(backend: str, transport: str,
                                                       detected: Callable[[float], None]) -> None:
    with Ranks("killed_peer", 3, backend, transport=transport) as ranks:
        for r in range(3):
            ranks.wait_line(r, "READY", timeout=60)
        time.sleep(0.3)  # survivors are now blocked in the second all_reduce
        killed_at = time.time()  # wall clock: the survivors report theirs (caught_at) on the same host
        ranks.procs[2].kill()
        results = ranks.results(timeout=30, ranks=[0, 1])
    for r, res in results.items():
        assert res["error"] in ("PeerLost",), (r, res)
        assert float(res["seconds"]) < 10.0, (r, res)  # type: ignore[arg-type]
    detected(max(float(res["caught_at"]) for res in results.values()) - killed_at)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", per_transport(
    "rank process frozen (SIGSTOP) while the other two run an all_reduce, 3 ranks over {transport}, "
    "heartbeat timeout 3 s", "PeerLost or CommTimeout on both survivors within 5 s of their op's start"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_process_is_lost_within_heartbeat_bound(backend: str, transport: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       detected: Callable[[float], None]) -> None:
    monkeypatch.setenv("SAGELLM_COMM_HEARTBEAT_TIMEOUT", "3")
    monkeypatch.setenv("SAGELLM_COMM_HEARTBEAT_INTERVAL", "0.5")
    with Ranks("frozen_peer", 3, backend, transport=transport) as ranks:
        for r in range(3):
            ranks.wait_line(r, "READY", timeout=60)
        stopped_at = time.time()  # wall clock: the survivors report theirs (caught_at) on the same host
        ranks.procs[2].send_signal(signal.SIGSTOP)
        results = ranks.results(timeout=30, ranks=[0, 1])
    for r, res in results.items():
        assert res["error"] in ("PeerLost", "CommTimeout"), (r, res)
        assert float(res["seconds"]) < 3 + 2.0, (r, res)  # type: ignore[arg-type]
    detected(max(float(res["caught_at"]) for res in results.values()) - stopped_at)  # type: ignore[arg-type]


@pytest.mark.fault("one rank skips a barrier the other two call with timeout=2 s, 3 processes (auto: shm)",
                   "CommTimeout on the callers (a caller whose peer's timeout notice lands in the last moments "
                   "of its own wait gets CollectiveAborted saying that peer timed out), then CollectiveAborted on "
                   "every rank's next collective, the skipper's included")
@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_collective_times_out_and_breaks_the_group(backend: str, detected: Callable[[float], None]) -> None:
    with Ranks("skip", 3, backend) as ranks:
        results = ranks.results(timeout=60)
    firsts = []
    for r in (0, 2):
        errors, messages = results[r]["errors"], results[r]["messages"]  # type: ignore[index]
        firsts.append(errors[0])
        # both callers wait 2 s; the one whose deadline fires first tells the other, whose own deadline
        # is then microseconds away: either error is right, as long as it says the barrier timed out
        assert errors[0] == "CommTimeout" or (errors[0] == "CollectiveAborted" and "it timed out" in messages[0]
                                              and "did not complete within 2 s" in messages[0]), results[r]
        assert float(results[r]["first_error_s"]) >= 1.9, results[r]  # type: ignore[arg-type]
        assert errors[1] == "CollectiveAborted", results[r]
    assert "CommTimeout" in firsts, results
    # the rank that skipped learns the group broke as soon as it calls the next collective
    assert results[1]["errors"] == ["CollectiveAborted"], results[1]
    # the callers' time from entering the barrier to its CommTimeout (the skip is there from the start)
    detected(max(float(results[r]["first_error_s"]) for r in (0, 2)))  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [
    pytest.param("mismatch_shape", marks=pytest.mark.fault(
        "ranks call all_reduce with different shapes ((8,) on rank 0, (16,) on the others), 3 processes "
        "over tcp and shm", "CollectiveMismatch on every rank within 5 s, one naming both shapes")),
    pytest.param("mismatch_kind", marks=pytest.mark.fault(
        "rank 0 calls broadcast while the others call all_reduce, 3 processes over tcp and shm",
        "CollectiveMismatch on every rank within 5 s, one naming both ops")),
])
def test_mismatched_collective_is_an_error_on_every_rank(kind: str, backend: str, transport: str,
                                                         detected: Callable[[float], None]) -> None:
    with Ranks(kind, 3, backend, transport=transport) as ranks:
        results = ranks.results(timeout=60)
    for r, res in results.items():
        assert res["error"] == "CollectiveMismatch", (r, res)
        assert float(res["seconds"]) < 5.0, (r, res)  # type: ignore[arg-type]
    if kind == "mismatch_shape":
        assert any("(8,)" in str(res["message"]) and "(16,)" in str(res["message"]) for res in results.values())
    else:
        assert any("broadcast" in str(res["message"]) and "all_reduce" in str(res["message"])
                   for res in results.values())
    # each rank's time from its own call to the error (it includes waiting for slower ranks to call)
    detected(max(float(res["seconds"]) for res in results.values()))  # type: ignore[arg-type]


@pytest.mark.fault("a process joins a 2-rank world with the wrong token",
                   "AuthError on the impostor, naming neither token; the real rank 1 then joins and every op passes")
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_token_is_refused_and_the_world_still_forms(backend: str) -> None:
    with Ranks("wrong_token", 2, backend) as ranks:
        impostor = ranks.results(timeout=30, ranks=[1])[1]
        assert impostor["error"] == "AuthError", impostor
        assert "right-token" not in str(impostor["message"]) and "wrong-token" not in str(impostor["message"])
        ranks.start("all_ops", 1, 2, backend)  # the real rank 1, with the right token
        results = ranks.results(timeout=60)
    assert results[0]["ok"] and results[1]["ok"], results


@pytest.mark.fault("garbage bytes sent to rank 0's rendezvous listener in answer to its Challenge",
                   "that connection is closed; rank 1 then joins and every op passes on both ranks")
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_frame_is_refused_and_listener_keeps_serving(backend: str) -> None:
    with Ranks("garbage", 2, backend, only=[0]) as ranks:
        deadline = time.monotonic() + 20
        while True:  # wait for rank 0's rendezvous listener
            try:
                junk = socket.create_connection(("127.0.0.1", ranks.port), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "rank 0 never listened"
                time.sleep(0.05)
        with junk:
            junk.recv(4096)  # its Challenge
            junk.sendall(b"\x00\xffGARBAGE" * 100 + os.urandom(256))
            junk.settimeout(5)
            try:
                while junk.recv(4096):
                    pass  # the listener answers with a Reject and closes
            except (ConnectionResetError, TimeoutError):
                pass
        ranks.start("garbage", 1, 2, backend)
        results = ranks.results(timeout=60)
    assert results[0]["ok"] and results[1]["ok"], results


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun (torch) is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torchrun_env_init(backend: str, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun") or "torchrun"
    env = dict(os.environ, SAGELLM_TEST_BACKEND=backend, SAGELLM_TEST_OUT=str(tmp_path))
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), WORKER, "torchrun"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1], proc.stdout
    assert all(r["ok"] and r["world"] == 2 for r in results), results


def _shm_names() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.mark.fault("rank process killed (SIGKILL) holding shared-memory rings, 3 ranks over shm",
                   "PeerLost on both survivors; no file left in /dev/shm (the rings are memfds); every process exits")
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_rank_leaves_no_shared_memory_behind(backend: str) -> None:
    before = _shm_names()
    with Ranks("killed_peer", 3, backend, transport="shm") as ranks:
        for r in range(3):
            ranks.wait_line(r, "READY", timeout=60)
        maps = Path(f"/proc/{ranks.procs[2].pid}/maps").read_text()
        assert "memfd:sagellm-comm-shm" in maps  # the rings are anonymous memory, not /dev/shm files
        ranks.procs[2].kill()
        results = ranks.results(timeout=30, ranks=[0, 1])
        assert all(res["error"] == "PeerLost" for res in results.values()), results
    assert _shm_names() - before == set()
    for proc in ranks.procs.values():
        assert proc.poll() is not None
