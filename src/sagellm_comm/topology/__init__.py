"""Local topology: what this host offers to communication (CPUs, NUMA, GPUs and their links, NICs, RDMA).

    import sagellm_comm.topology as topology
    print(topology.format_tree(topology.discover()))

Only the standard library and msgspec are imported here; NVML (nvidia-ml-py) is
imported inside GPU discovery, and vendor tools run only when installed.
"""

from .discover import discover, normalize_bus_id, run_tool
from .model import (
    UNKNOWN,
    Accelerator,
    Gpu,
    HostInfo,
    Nic,
    NumaNode,
    NvLinkPeer,
    RdmaDevice,
    RdmaPort,
    Topology,
)
from .render import format_tree, from_json, to_json

__all__ = [
    "UNKNOWN",
    "Accelerator",
    "Gpu",
    "HostInfo",
    "Nic",
    "NumaNode",
    "NvLinkPeer",
    "RdmaDevice",
    "RdmaPort",
    "Topology",
    "discover",
    "format_tree",
    "from_json",
    "normalize_bus_id",
    "run_tool",
    "to_json",
]
