"""examples/tp_decode.py: tensor-parallel greedy decoding generates the unsplit model's tokens.

The simulated worlds run in this process (on asyncio and trio, through the
`anyio_backend` fixture of conftest.py), with the overlapped decode loop and the
sequential one; real processes run the script itself, once launched by its own
`--world` and once by torchrun. The CUDA variants skip where torch sees no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import sagellm_comm as sc
from procs import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = str(EXAMPLES / "tp_decode.py")
sys.path.insert(0, str(EXAMPLES))
import tp_decode  # noqa: E402
from tiny_model import TinyLlama, greedy_full  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


def check_report(rep: dict[str, Any], world: int, overlap: bool) -> None:
    opts = tp_decode.Options()
    assert rep["world"] == world and rep["overlap"] == overlap
    assert rep["match"] and rep["tokens"] == rep["reference"]
    # every sequence: the prefill's token and one per decode step
    assert [len(t) for t in rep["tokens"]] == [opts.steps + 1] * len(opts.prompt_lens)
    # the greedy choice was never a near tie that rounding could have decided
    assert rep["max_logit_diff"] < rep["min_margin"] / 2
    if overlap:
        assert rep["hidden_ms"] > 0  # comm.overlap() saw all_reduces run while compute ran
        shorter = min(rep["comm_ms"], rep["compute_ms"])
        assert 0 < rep["overlap_efficiency"] <= 1 + 1e-9
        assert rep["overlap_efficiency"] == pytest.approx(rep["hidden_ms"] / shorter)
    else:
        assert rep["hidden_ms"] == 0 and rep["comm_ms"] > 0 and rep["overlap_efficiency"] == 0


def test_the_reference_is_the_plain_model() -> None:
    """The paged-cache reference the example compares with agrees with full recomputation, and it is not a
    degenerate sequence (so matching it means something)."""
    opts = tp_decode.Options(steps=4)
    ref, _ = tp_decode.reference(opts, torch.device("cpu"))
    model = TinyLlama(tp_decode.model_config())
    seqs, _ = tp_decode.make_sequences(model.config, opts)
    assert ref == [greedy_full(model, s.prompt, opts.steps) for s in seqs]
    assert len({t for toks in ref for t in toks}) > 10


@pytest.mark.anyio
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
@pytest.mark.parametrize("world", [2, 4])
async def test_simulated_ranks_generate_the_unsplit_tokens(world: int, overlap: bool) -> None:
    with anyio.fail_after(120):
        rep = await tp_decode.run_simulated(world, tp_decode.Options(overlap=overlap))
    check_report(rep, world, overlap)


@pytest.mark.anyio
async def test_a_missing_all_reduce_is_caught() -> None:
    """The check has teeth: where micro-batch 0's all_reduces are skipped (each rank adds only its own part),
    its sequences (0 and 2) generate other tokens, micro-batch 1's still the right ones, and the report says
    the tokens do not match."""
    opts = tp_decode.Options(steps=4)

    async def broken(comm: sc.Communicator, o: tp_decode.Options) -> dict[str, Any]:
        real = comm.all_reduce
        calls = 0

        async def skip_micro_batch_0(t: Any, *a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1  # the stages' all_reduces alternate: micro-batch 0, 1, 0, 1, ...
            return t if calls % 2 else await real(t, *a, **k)

        comm.all_reduce = skip_micro_batch_0  # type: ignore[method-assign]
        return await tp_decode.decode(comm, o)

    with anyio.fail_after(120):
        results = await sc.testing.run_ranks(2, broken, opts)
    rep = tp_decode.check(results[0], opts, 2)
    got, want = rep["tokens"], rep["reference"]
    assert not rep["match"]
    assert got[0] != want[0] and got[2] != want[2]
    assert got[1] == want[1] and got[3] == want[3]


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_processes_generate_the_unsplit_tokens(backend: str) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--world", "2", "--backend", backend, "--timeout", "150"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_report(result(proc.stdout), 2, True)


@pytest.mark.multiprocess
def test_under_torchrun() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), SCRIPT, "--no-overlap"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_report(result(proc.stdout), 2, False)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
async def test_simulated_ranks_on_cuda(overlap: bool) -> None:
    with anyio.fail_after(180):
        rep = await tp_decode.run_simulated(2, tp_decode.Options(device="cuda", overlap=overlap))
    check_report(rep, 2, overlap)
    assert rep["device"] == "cuda:0" and rep["device_path"].startswith("host staging")  # they share one GPU


@pytest.mark.cuda
@needs_cuda
@pytest.mark.multiprocess
def test_two_processes_on_cuda() -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--world", "2", "--device", "cuda", "--timeout", "240"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = result(proc.stdout)
    check_report(rep, 2, True)
    if torch.cuda.device_count() >= 2:
        assert rep["device_path"] == "nccl"  # a GPU each
    else:
        assert rep["device_path"].startswith("host staging")  # both on GPU 0


def result(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, stdout  # rank 0 reports, the other rank does not
    rep: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    return rep
