"""Which backend moves a tensor's bytes, and vendor process groups from torch's backend registry.

| device type | backend | torch.distributed name | comes with | hardware |
| --- | --- | --- | --- | --- |
| cuda | nccl (rccl where `torch.version.hip` is set) | nccl | torch (CUDA or ROCm build) | NVIDIA / AMD GPUs |
| npu | hccl | hccl | torch_npu + CANN | Huawei Ascend |
| mlu | cncl | cncl | torch_mlu + Neuware | Cambricon |
| cpu | host | - | - | sagellm-comm's own transports (shm, tcp, ucx) |

torch's nccl backend is RCCL on a ROCm build of torch (its CUDA API is HIP there),
so "rccl" is a label: the same process group, named for what it runs.

Vendor packages register their process groups on import with
`torch.distributed.Backend.register_backend(name, creator, extended_api=..., devices=[...])`.
`create_process_group` looks the creator up in `torch.distributed.Backend._plugins`
and calls it as torch's own `_new_process_group_helper` does (plain:
`creator(store, rank, size, timeout)`; extended API: `creator(DistributedBackendOptions, None)`),
with our store, rank and size, so no torch default group is created.

Nothing here imports torch or a vendor package at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import BackendUnavailable, InvalidArgument, UnsupportedBuffer

NAMES = ("auto", "nccl", "rccl", "hccl", "cncl", "host")
ENV = "SAGELLM_COMM_BACKEND"


@dataclass(frozen=True)
class Vendor:
    """One device backend: our name for it, the tensors it moves, and what provides it."""

    name: str  # ours: nccl, rccl, hccl, cncl
    device_type: str  # the torch device type of the tensors it moves
    torch_name: str  # its name in torch.distributed's registry
    hardware: str
    package: str  # the module whose import provides it

    def install(self, detail: str) -> str:
        """The error text saying what is missing (`detail`) and what to install."""
        v = torch_version()
        if self.package == "torch_npu":
            return (f"backend 'hccl' (Huawei Ascend NPUs) needs torch_npu, which {detail}: install the CANN "
                    f"toolkit, then `pip install torch-npu==<the release matching your torch {v}>` (the version "
                    "table is at https://github.com/Ascend/pytorch)")
        if self.package == "torch_mlu":
            return (f"backend 'cncl' (Cambricon MLUs) needs torch_mlu, which {detail}: install Cambricon "
                    f"Neuware (CNToolkit and CNCL), then the torch_mlu release matching your torch {v} "
                    "(https://github.com/Cambricon/torch_mlu)")
        if self.name == "rccl":
            return (f"backend 'rccl' (AMD GPUs, ROCm) needs a ROCm build of torch; {detail}: install one, e.g. "
                    "`pip install torch --index-url https://download.pytorch.org/whl/rocm<your ROCm version>`")
        return (f"backend 'nccl' (NVIDIA GPUs) needs a CUDA build of torch with NCCL; {detail}: install one "
                "(https://pytorch.org/get-started/locally/)")


VENDORS: dict[str, Vendor] = {
    "nccl": Vendor("nccl", "cuda", "nccl", "NVIDIA GPUs", "torch"),
    "rccl": Vendor("rccl", "cuda", "nccl", "AMD GPUs, ROCm", "torch"),
    "hccl": Vendor("hccl", "npu", "hccl", "Huawei Ascend NPUs", "torch_npu"),
    "cncl": Vendor("cncl", "mlu", "cncl", "Cambricon MLUs", "torch_mlu"),
}
DEVICE_BACKENDS = {"cuda": "nccl", "npu": "hccl", "mlu": "cncl", "cpu": "host"}
VENDOR_DEVICES = frozenset(("npu", "mlu"))  # moved only by their vendor's lane: no host staging for them

# Testing only: with init_process_group(backend=cpu_lane), CPU tensors take that backend's
# lane instead of our transports. The vendor-lane tests set it in their worker processes,
# whose fake torch_npu / torch_mlu register gloo process groups under the vendor names.
cpu_lane: str | None = None


def _torch() -> Any:
    """torch, imported if it is not yet; None where it is not installed."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return None
    return torch


def torch_version() -> str:
    torch = _torch()
    return str(torch.__version__) if torch is not None else "(not installed)"


def is_rocm() -> bool:
    """True on a ROCm build of torch, whose nccl backend is RCCL."""
    torch = _torch()
    return torch is not None and getattr(torch.version, "hip", None) is not None


def label(name: str) -> str:
    """Our name for backend `name` here: torch's nccl is "rccl" on ROCm."""
    return "rccl" if name in ("nccl", "rccl") and is_rocm() else name


def normalize(backend: str) -> str:
    """`backend` checked, with SAGELLM_COMM_BACKEND applied where it is "auto" (as init does)."""
    if backend == "auto":
        backend = os.environ.get(ENV, backend) or "auto"
    if backend not in NAMES:
        raise InvalidArgument(f"backend must be one of {', '.join(NAMES)}, got {backend!r}")
    return backend


def problem(name: str) -> str | None:
    """Why vendor backend `name` cannot be used in this process (the install message), or None.

    Imports its package (torch_npu, torch_mlu), which is what registers the backend with torch.
    """
    vendor = VENDORS[name]
    torch = _torch()
    if torch is None:
        return vendor.install("torch is not installed either (pip install torch)")
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available():
        return f"backend {name!r} needs torch.distributed, which this torch {torch_version()} lacks"
    if vendor.torch_name == "nccl":
        if name == "rccl" and not is_rocm():
            return vendor.install(f"this torch {torch_version()} is not one (torch.version.hip is None)")
        if not dist.is_nccl_available():
            return vendor.install(f"this torch {torch_version()} was built without it")
        return None
    try:
        importlib.import_module(vendor.package)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == vendor.package:
            return vendor.install("is not installed")
        return vendor.install(f"failed to import ({e!r})")
    except Exception as e:  # installed, but its libraries (CANN, Neuware) do not load
        return vendor.install(f"failed to import ({e!r})")
    if vendor.torch_name.upper() not in _plugins(dist):
        return vendor.install(f"was imported but registered no {vendor.torch_name!r} backend with "
                              "torch.distributed.Backend.register_backend (is it the release for this torch?)")
    return None


def require(name: str) -> None:
    """Raise BackendUnavailable, saying what to install, unless vendor backend `name` is usable here."""
    why = problem(name)
    if why is not None:
        raise BackendUnavailable(why)


def resolve(backend: str) -> str:
    """init_process_group's `backend=`: normalized; a vendor asked for by name (rccl, hccl, cncl) must
    be installed (BackendUnavailable otherwise). "nccl" is checked when its lane opens, as before."""
    backend = normalize(backend)
    if backend in ("rccl", "hccl", "cncl"):
        require(backend)
    return backend


def _plugins(dist: Any) -> dict[str, Any]:
    plugins = getattr(dist.Backend, "_plugins", None)
    return plugins if isinstance(plugins, dict) else {}


def device_type_of(x: Any) -> str:
    """The device type of a tensor, a torch.device, or a string like "cuda" or "npu:1"."""
    if isinstance(x, str):
        return x.split(":")[0]
    dev = getattr(x, "device", x)
    kind = getattr(dev, "type", None)
    if not isinstance(kind, str):
        raise InvalidArgument(f"expected a tensor, a torch.device or a device type, got {type(x).__name__}")
    return kind


def lane_name(device_type: str, backend: str, device: object = None) -> str | None:
    """The vendor lane ("nccl", "hccl", "cncl") that tensors of `device_type` take under `backend`
    (normalized), or None: our transports (cpu) or host staging (cuda with backend "host").

    For cuda under "auto" the lane is preferred, not required (staging is the fallback).
    Raises UnsupportedBuffer where `backend` cannot move such tensors.
    """
    dev = device if device is not None else device_type
    if device_type == "cpu":
        return backend if cpu_lane is not None and backend == cpu_lane else None
    if device_type == "cuda":
        if backend in ("auto", "nccl", "rccl"):
            return "nccl"
        if backend == "host":
            return None
    elif device_type in VENDOR_DEVICES:
        want = DEVICE_BACKENDS[device_type]
        if backend in ("auto", want):
            return want
        if backend == "host":
            raise UnsupportedBuffer(f"a tensor on {dev} cannot go through backend 'host': it stages CUDA tensors "
                                    f"only, and {device_type} tensors need the {want} lane ({VENDORS[want].hardware}):"
                                    f" use backend='auto' or '{want}'")
    else:
        raise UnsupportedBuffer(f"no backend moves tensors on {dev}: sagellm-comm takes cpu, cuda, npu (hccl) "
                                "and mlu (cncl) tensors")
    want = DEVICE_BACKENDS[device_type]
    raise UnsupportedBuffer(f"a tensor on {dev} cannot go through backend {backend!r}, which moves "
                            f"{VENDORS[backend].device_type} tensors ({VENDORS[backend].hardware}): "
                            f"use backend='auto' (or '{label(want)}') for {device_type} tensors")


def backend_for(x: Any, backend: str = "auto") -> tuple[str, str]:
    """(backend, reason): how tensors like `x` (a tensor, a torch.device or a device type such as
    "cuda", "npu") travel in a group initialised with `backend`; creates nothing and imports no
    vendor package.

    The backend is "nccl" or "rccl" (cuda), "hccl" (npu), "cncl" (mlu), or "host": our own
    transports (cpu tensors; cuda tensors staged through pinned host memory). Raises the
    UnsupportedBuffer an op would raise where `backend` cannot move them.
    """
    backend = normalize(backend)
    kind = device_type_of(x)
    lane = lane_name(kind, backend, x if isinstance(x, str) else getattr(x, "device", x))
    if lane is None:
        if kind == "cpu":
            return "host", "cpu tensors travel on sagellm-comm's own transports (shared memory, TCP, UCX)"
        return "host", "backend='host': cuda tensors are staged through pinned host memory over our transports"
    name = label(lane)
    vendor = VENDORS[name]
    if kind == "cpu":
        return name, f"testing: cpu tensors take the {name} lane (sagellm_comm.transports.vendor.cpu_lane)"
    if kind == "cuda":
        torch = sys.modules.get("torch")
        note = ""
        if torch is None:
            note = "; torch is not imported yet, so this is what a CUDA build of torch would do"
        elif not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
            note = f"; this torch {torch_version()} has no {name}"
        if backend == "auto":
            return name, (f"cuda tensors: torch's {name} process group ({vendor.hardware}) where every rank of "
                          f"the group has its own GPU, else staged through pinned host memory{note}")
        return name, f"backend={backend!r}: cuda tensors go through {name} or raise LaneUnavailable{note}"
    note = "" if importlib.util.find_spec(vendor.package) is not None else (
        f"; {vendor.package} is not installed here, so that lane cannot open")
    return name, (f"{kind} tensors ({vendor.hardware}) go through {vendor.package}'s {name} process group "
                  f"(no host staging){note}")


def create_process_group(name: str, store: Any, rank: int, size: int, *, timeout: timedelta,
                         group_name: str, global_ranks: list[int]) -> Any:
    """A process group of vendor backend `name` (hccl, cncl) from the creator in torch's registry."""
    vendor = VENDORS[name]
    dist = sys.modules["torch"].distributed
    plugin = _plugins(dist).get(vendor.torch_name.upper())
    if plugin is None:
        raise BackendUnavailable(vendor.install(f"no {vendor.torch_name!r} backend is registered with "
                                                "torch.distributed"))
    creator, extended = plugin[0], bool(plugin[1])  # Backend._BackendPlugin(creator_fn, extended_api)
    if not extended:
        return creator(store, rank, size, timeout)
    c10d = sys.modules["torch.distributed.distributed_c10d"]
    opts = c10d._DistributedBackendOptions()
    opts.store = store
    opts.group_rank = rank
    opts.group_size = size
    opts.timeout = timeout
    opts.group_id = group_name
    opts.global_ranks_in_group = global_ranks
    return creator(opts, None)  # None: the backend's default options, as torch passes without pg_options
