"""KV transfers between real processes over tcp and shared memory, on asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import procs

pytestmark = pytest.mark.multiprocess

WORKER = str(Path(__file__).with_name("kv_worker.py"))
BACKENDS = ["asyncio", "trio"]
TRANSPORTS = ["tcp", "shm"]


def Ranks(scenario: str, backend: str, transport: str) -> procs.Ranks:
    return procs.Ranks(WORKER, scenario, 2, backend, env={"SAGELLM_COMM_TRANSPORT": transport})


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_arrives_exactly_and_codecs_stay_close(backend: str, transport: str) -> None:
    with Ranks("roundtrip", backend, transport) as ranks:
        results = ranks.results(timeout=90, clean_exit=True)
    assert results[1]["ok"], results[1]


@pytest.mark.parametrize("transport", [
    pytest.param(t, marks=pytest.mark.fault(
        f"KV sender (prefill) process killed (SIGKILL) mid-transfer, 2 processes over {t}",
        "PeerLost on the receiver within 10 s of its last layer")) for t in TRANSPORTS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_sender_is_peer_lost_on_the_receiver(backend: str, transport: str, detected: Callable[[float], None],
                                                    record_property: Callable[[str, object], None]) -> None:
    with Ranks("killed", backend, transport) as ranks:
        ranks.wait_line(1, "STARTED", timeout=60)
        killed_at = time.time()  # wall clock: the receiver reports its own (caught_at) on the same host
        ranks.procs[0].kill()
        res = ranks.results(timeout=30, ranks=[1])[1]
    assert res["error"] == "PeerLost", res
    assert float(res["seconds"]) < 10.0, res  # type: ignore[arg-type]
    # includes up to 0.3 s of the receiver's own slow consuming: it sees the error when it asks for a layer
    detected(float(res["caught_at"]) - killed_at)  # type: ignore[arg-type]
    record_property("note", "the receiver pauses 0.3 s after each layer and sees PeerLost when it asks for the "
                            "next one, so its time to detect includes up to that pause")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_high_priority_collective_is_not_queued_behind_a_bulk_transfer(backend: str, transport: str) -> None:
    with Ranks("priority", backend, transport) as ranks:
        results = ranks.results(timeout=120, clean_exit=True)
    for r, res in results.items():
        assert res["ok"], (r, res)
    assert results[1]["during"], results[1]  # the receiver still had layers to come
