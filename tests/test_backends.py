"""Backend selection: the device-type table, the install messages, and vendor lanes through torch's
third-party backend registry.

No test here touches an NPU, an MLU or a ROCm GPU; this machine has none of them.
What stands in for them is said in each test: a patched `torch.version.hip`, the
real ImportError of packages that are not installed, and fake `torch_npu` /
`torch_mlu` packages whose import registers, with torch's real
`Backend.register_backend`, creators returning torch's gloo process group. Those
run only in worker processes, so torch's global backend registry of this process
is never changed.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch

import procs
import sagellm_comm as sc
from sagellm_comm.testing import run_ranks
from sagellm_comm.transports import vendor
from sagellm_comm.transports.nccl import backend_available

pytestmark = pytest.mark.anyio

WORKER = str(Path(__file__).with_name("vendor_worker.py"))
V = torch.__version__

HCCL_MISSING = (f"backend 'hccl' (Huawei Ascend NPUs) needs torch_npu, which is not installed: install the CANN "
                f"toolkit, then `pip install torch-npu==<the release matching your torch {V}>` (the version table "
                "is at https://github.com/Ascend/pytorch)")
CNCL_MISSING = (f"backend 'cncl' (Cambricon MLUs) needs torch_mlu, which is not installed: install Cambricon "
                f"Neuware (CNToolkit and CNCL), then the torch_mlu release matching your torch {V} "
                "(https://github.com/Cambricon/torch_mlu)")
RCCL_NOT_ROCM = (f"backend 'rccl' (AMD GPUs, ROCm) needs a ROCm build of torch; this torch {V} is not one "
                 "(torch.version.hip is None): install one, e.g. `pip install torch --index-url "
                 "https://download.pytorch.org/whl/rocm<your ROCm version>`")

# FAKE vendor packages, written to a temporary directory on the workers' PYTHONPATH. Each
# registers its backend the way the real package does (torch_npu: extended API, devices
# ["npu"]; torch_mlu: the plain four-argument creator), but creates torch's ProcessGroupGloo.
FAKE_TORCH_NPU = '''"""FAKE torch_npu (tests/test_backends.py): no NPU, no CANN, no HCCL; hccl is gloo here."""
import os
from datetime import timedelta
import torch.distributed as dist

created = []

def _create(opts, pg_options):
    created.append({"api": "extended", "rank": opts.group_rank, "size": opts.group_size,
                    "group_id": opts.group_id, "global_ranks": list(opts.global_ranks_in_group),
                    "pg_options": repr(pg_options)})
    if os.environ.get("FAKE_VENDOR_FAIL_RANK") == str(opts.group_rank):
        raise RuntimeError("fake hccl: this rank's device is busy")
    if os.environ.get("FAKE_VENDOR_FAIL_RANK"):  # gloo waits for every rank: do not wait for the failed one
        return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, timedelta(seconds=2))
    return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, opts.timeout)

dist.Backend.register_backend("hccl", _create, extended_api=True, devices=["npu"])
'''
FAKE_TORCH_MLU = '''"""FAKE torch_mlu (tests/test_backends.py): no MLU, no Neuware, no CNCL; cncl is gloo here."""
import os
import torch.distributed as dist

created = []

def _create(store, rank, size, timeout):
    created.append({"api": "plain", "rank": rank, "size": size, "timeout_s": timeout.total_seconds()})
    if os.environ.get("FAKE_VENDOR_FAIL_RANK") == str(rank):
        raise RuntimeError("fake cncl: this rank's device is busy")
    return dist.ProcessGroupGloo(store, rank, size, timeout)

dist.Backend.register_backend("cncl", _create, devices=["mlu"])
'''


# -- (1) the table -------------------------------------------------------------------------
def test_device_types_pick_their_backends() -> None:
    """The table, on this CUDA-less CPU build of torch: names only, nothing is created or imported."""
    assert vendor.DEVICE_BACKENDS == {"cuda": "nccl", "npu": "hccl", "mlu": "cncl", "cpu": "host"}
    assert sc.backend_for("cpu")[0] == "host" and "own transports" in sc.backend_for(torch.ones(2))[1]
    assert sc.backend_for("cuda")[0] == "nccl" and "staged" in sc.backend_for("cuda:1")[1]
    assert sc.backend_for(torch.device("cuda", 0), "host")[0] == "host"
    npu, why = sc.backend_for("npu:3")
    assert npu == "hccl" and "torch_npu" in why and "not installed here" in why  # find_spec, no import
    assert sc.backend_for("mlu")[0] == "cncl" and sc.backend_for("mlu", "cncl")[0] == "cncl"
    assert "torch_npu" not in sys.modules and "torch_mlu" not in sys.modules
    for backend in ("nccl", "rccl", "host", "cncl"):
        with pytest.raises(sc.UnsupportedBuffer, match=r"tensor on npu:0 cannot go through backend"):
            sc.backend_for("npu:0", backend)
    with pytest.raises(sc.UnsupportedBuffer, match=r"cuda:0 cannot go through backend 'hccl'.*use backend='auto'"):
        sc.backend_for("cuda:0", "hccl")
    with pytest.raises(sc.UnsupportedBuffer, match="no backend moves tensors on xpu"):
        sc.backend_for("xpu")
    with pytest.raises(sc.InvalidArgument, match="backend must be one of auto, nccl, rccl, hccl, cncl, host"):
        sc.backend_for("cuda", "gloo")


def test_rocm_labels_torchs_nccl_as_rccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE ROCm: `torch.version.hip` is patched; this torch is a CPU build (no HIP, no RCCL)."""
    assert vendor.label("nccl") == "nccl" and not vendor.is_rocm()
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert vendor.is_rocm() and vendor.label("nccl") == "rccl" and vendor.label("hccl") == "hccl"
    backend, why = sc.backend_for("cuda")
    assert backend == "rccl" and "rccl" in why
    assert sc.backend_for("cuda", "nccl")[0] == "rccl"  # torch's nccl is RCCL there, whatever it is called
    with pytest.raises(sc.UnsupportedBuffer, match=r"use backend='auto' \(or 'rccl'\) for cuda tensors"):
        sc.backend_for("cuda", "cncl")
    if torch.distributed.is_nccl_available():  # a CUDA build (the GPU machine): "ROCm" with its nccl inside
        assert vendor.resolve("rccl") == "rccl"
        return
    # a ROCm torch without RCCL in it (this CPU build): the message says so, rather than the install line
    with pytest.raises(sc.BackendUnavailable, match=r"this torch .* was built without it"):
        vendor.resolve("rccl")


def test_env_variable_picks_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGELLM_COMM_BACKEND applies where `backend` is "auto", as in init_process_group."""
    monkeypatch.setenv("SAGELLM_COMM_BACKEND", "host")
    assert sc.backend_for("cuda")[0] == "host"
    assert sc.backend_for("cuda", "nccl")[0] == "nccl"
    monkeypatch.setenv("SAGELLM_COMM_BACKEND", "bogus")
    with pytest.raises(sc.InvalidArgument, match="got 'bogus'"):
        vendor.normalize("auto")


# -- (2) missing vendor packages -----------------------------------------------------------
def test_missing_vendor_packages_say_what_to_install() -> None:
    """REAL ImportErrors: torch_npu and torch_mlu are not installed in this environment, and this
    torch is no ROCm build; the messages are compared verbatim."""
    for name, message in (("hccl", HCCL_MISSING), ("cncl", CNCL_MISSING), ("rccl", RCCL_NOT_ROCM)):
        with pytest.raises(sc.BackendUnavailable) as e:
            vendor.require(name)
        assert str(e.value) == message
        assert not backend_available(name)
    assert "torch_npu" not in sys.modules and "torch_mlu" not in sys.modules


async def test_init_process_group_refuses_a_missing_vendor_at_once() -> None:
    """REAL ImportError (torch_npu is not installed): init fails before any rendezvous."""
    with anyio.fail_after(5):
        with pytest.raises(sc.BackendUnavailable) as e:
            async with sc.init_process_group(f"tcp://127.0.0.1:{procs.free_port()}", rank=0, world_size=2,
                                             backend="hccl"):
                pass  # pragma: no cover
    assert str(e.value) == HCCL_MISSING
    with anyio.fail_after(5), pytest.raises(sc.InvalidArgument, match="backend must be one of"):
        async with sc.init_process_group("tcp://127.0.0.1:1", rank=0, world_size=2, backend="ncl"):
            pass  # pragma: no cover


def test_a_broken_or_silent_vendor_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKES in this process, undone by monkeypatch, never touching torch's registry: a torch_npu
    whose import fails inside (its CANN libraries missing), and an empty module object `torch_npu`
    in sys.modules that registers nothing."""
    real_import = vendor.importlib.import_module

    def failing(name: str, package: str | None = None) -> types.ModuleType:
        if name == "torch_npu":
            raise OSError("libhccl.so: cannot open shared object file")
        return real_import(name, package)

    monkeypatch.setattr(vendor.importlib, "import_module", failing)
    with pytest.raises(sc.BackendUnavailable, match=r"needs torch_npu, which failed to import \(OSError\("
                                                    r"'libhccl.so: cannot open shared object file'\)\): install"):
        vendor.require("hccl")
    monkeypatch.setattr(vendor.importlib, "import_module", real_import)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    with pytest.raises(sc.BackendUnavailable, match=r"torch_npu, which was imported but registered no 'hccl' "
                                                    r"backend with torch.distributed.Backend.register_backend"):
        vendor.require("hccl")


# -- (3) fake vendor packages, real collectives through the vendor lane ------------------------
def fake_packages(tmp_path: Path) -> dict[str, str]:
    for name, source in (("torch_npu", FAKE_TORCH_NPU), ("torch_mlu", FAKE_TORCH_MLU)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(source)
    here = str(Path(__file__).parent)
    inherited = os.environ.get("PYTHONPATH")  # where the package itself comes from, when not installed
    return {"PYTHONPATH": f"{tmp_path}:{here}" + (f":{inherited}" if inherited else "")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("name", ["hccl", "cncl"])
def test_fake_vendor_lane_runs_every_op(name: str, loop: str, tmp_path: Path) -> None:
    """FAKE torch_npu / torch_mlu (see FAKE_TORCH_NPU, FAKE_TORCH_MLU), 2 real processes.

    Proves: `init_process_group(backend=name)` imports the package, which registers the backend
    with torch's real registry; our lane finds the creator there and calls it with the extended
    (hccl) or the plain (cncl) signature, inside our bootstrap; every op gives the right values
    through it, on both event loops; op records name the backend. Does not prove anything about
    HCCL or CNCL themselves, NPU/MLU tensors, their streams or their `is_completed()`: the fake
    process groups are gloo, which is awaited through `wait()` in a thread, not polled.
    """
    env = fake_packages(tmp_path)
    with procs.Ranks(WORKER, "ops", 2, loop, env=env, extra=(name,)) as ranks:
        results = ranks.results(timeout=120, clean_exit=True)
    package = vendor.VENDORS[name].package
    for r, res in results.items():
        # closing the communicator released both lanes while the interpreter was whole
        assert res["lanes_open_after_close"] == 0 and res["lanes_released"] == [True, True], res
        checks = res["checks"]
        assert isinstance(checks, dict) and not any(checks.values()), (r, checks)
        assert {"all_reduce/sum", "all_reduce/prod/high", "all_gather", "reduce_scatter", "broadcast",
                "all_to_all", "numpy"} <= set(checks)
        assert res["path_before"] == "undecided" and res["path"] == name, res
        created = res["created"]
        assert isinstance(created, list) and len(created) == 2  # one process group per priority
        for c in created:
            assert c["rank"] == r and c["size"] == 2
            if name == "hccl":  # torch's extended API: DistributedBackendOptions, and no pg options
                assert c["api"] == "extended" and c["global_ranks"] == [0, 1] and c["pg_options"] == "None"
                assert c["group_id"] in ("sagellm/world/0", "sagellm/world/1"), c
            else:
                assert c["api"] == "plain" and c["timeout_s"] == 1800.0
        assert res["backend_for"][0] == name
        assert "'band'" in str(res["refused"]) and "cpu tensors have no host staging" in str(res["refused"])
        recs = res["records"]
        assert isinstance(recs, list)
        by_op: dict[str, list[list[object]]] = {}
        for rec in recs:
            by_op.setdefault(str(rec[0]), []).append(rec)
        # on the lane: algorithm and transport are the backend; the rest (the lanes' bootstrap
        # all_gather and all_reduce, the numpy all_reduce) went over our transports
        for op, count in (("all_reduce", 3), ("all_gather", 1), ("reduce_scatter", 1), ("broadcast", 1),
                          ("all_to_all", 1)):
            lane = [rec for rec in by_op[op] if rec[1] == name]
            assert len(lane) == count and all(rec[2] == name and rec[4] for rec in lane), (op, by_op[op])
            assert all(f"{name} lane ({package}'s process group" in str(rec[3]) for rec in lane), lane
        host = [rec for rec in recs if rec[1] != name and rec[0] not in ("send", "recv")]
        assert len(host) == 5 and all(rec[2] in ("tcp", "shm") for rec in host), host
        p2p = by_op["send" if r == 0 else "recv"]
        assert [rec[1] for rec in p2p] == ["staged through host memory", name], p2p


@pytest.mark.multiprocess
def test_fake_vendor_lane_that_cannot_open_names_device_and_backend(tmp_path: Path) -> None:
    """FAKE torch_npu whose creator raises on rank 1 (2 real processes; rank 0's gloo group gives up
    waiting for it after 2 s): every rank gets BackendUnavailable naming the tensor's device and
    the backend, and the group still works on our transports."""
    env = dict(fake_packages(tmp_path), FAKE_VENDOR_FAIL_RANK="1")
    with procs.Ranks(WORKER, "fail", 2, "asyncio", env=env, extra=("hccl",)) as ranks:
        results = ranks.results(timeout=90, clean_exit=True)
    for r, res in results.items():
        assert res["error"] == "BackendUnavailable", (r, res)
        message = str(res["message"])
        assert message.startswith("a tensor on cpu needs the hccl lane (Huawei Ascend NPUs), which group "
                                  "'world' cannot open: "), message
        assert f"rank {r} could not create its hccl process group" in message, message
        if r == 1:
            assert "device is busy" in message, message
        assert res["host_ok"] and res["created"] == 1, res
        assert res["lanes_open_after_close"] == 0 and res["lanes_released"] == [], res


@pytest.mark.multiprocess
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_closing_mid_op_on_a_vendor_lane_does_not_wait_for_the_backend(loop: str, tmp_path: Path) -> None:
    """FAKE torch_mlu (gloo underneath), 2 real processes: rank 0 closes its communicator while its
    all_reduce on the lane waits for rank 1, which never joins. The close aborts the lane instead of
    shutting it down (which would wait on the peer for the backend's 30-minute timeout), the op fails
    with a typed error, and rank 1 learns rank 0 is gone."""
    env = fake_packages(tmp_path)
    with procs.Ranks(WORKER, "close_mid_op", 2, loop, env=env, extra=("cncl",)) as ranks:
        results = ranks.results(timeout=90)
    r0, r1 = results[0], results[1]
    assert r0["waiting"] == 1 and r0["aborted"] and not r0["live"], r0
    assert r0["error"] in ("CommClosed", "CollectiveAborted"), r0
    assert 0 <= float(str(r0["closed_in"])) < 10, r0
    assert r1["error"] in ("PeerLost", "CommClosed"), r1


# -- (4) auto: CPU tensors on our transports -------------------------------------------------
async def test_auto_keeps_cpu_tensors_on_our_transports() -> None:
    """No fake needed: with backend="auto" (the default) CPU tensors and numpy arrays never take a
    lane, even with the testing hook set for a vendor; the op records show our transport."""
    vendor_hook = vendor.cpu_lane
    vendor.cpu_lane = "hccl"  # routes CPU tensors only in groups made with backend="hccl"
    try:
        async def body(comm: sc.Communicator) -> list[tuple[str, str, str]]:
            x = torch.ones(8) * (comm.rank + 1)
            await comm.all_reduce(x)
            assert torch.equal(x, torch.full((8,), 3.0))
            g = await comm.all_gather(np.arange(2, dtype=np.int64))
            assert g.shape == (2, 2)
            assert comm.device_path == "undecided"
            return [(r.op, r.algorithm, r.transport) for r in comm.stats.records]

        with anyio.fail_after(20):
            results = await run_ranks(2, body)
    finally:
        vendor.cpu_lane = vendor_hook
    for recs in results:
        assert [op for op, _, _ in recs] == ["all_reduce", "all_gather"]
        assert all(transport == "inproc" and algo not in vendor.VENDORS for _, algo, transport in recs), recs
