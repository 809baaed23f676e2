"""What one host looks like to the communication runtime: plain msgspec structs.

These are plain data so that a rank can encode its local view cheaply and the
group can gather every rank's view at `init_process_group` (and a cost model can
read it) without importing anything heavy. Unknown numbers are -1 and unknown
strings are "" rather than None: every field has one type, so the JSON stays
easy to consume from other languages and tools.
"""

from __future__ import annotations

import msgspec

UNKNOWN = -1

SCHEMA = 1  # bump when a field changes meaning, so a gathered view from another version is recognisable


class HostInfo(msgspec.Struct, kw_only=True):
    hostname: str
    host_key: str  # same value as transports.shm.host_key(): equal keys can share memory
    kernel: str = ""
    cpu_model: str = ""
    logical_cpus: int = UNKNOWN  # online CPUs of the machine
    physical_cores: int = UNKNOWN  # distinct SMT sibling sets among the online CPUs
    usable_cpus: str = ""  # this process's CPU affinity (cpulist), what a container or taskset leaves us
    memory_bytes: int = UNKNOWN


class NumaNode(msgspec.Struct, kw_only=True):
    id: int
    cpus: str = ""  # cpulist, e.g. "0-27,56-83"
    memory_bytes: int = UNKNOWN
    distances: list[int] = msgspec.field(default_factory=list)  # SLIT row: distance to node 0, 1, …


class NvLinkPeer(msgspec.Struct, kw_only=True):
    """The NVLinks of one GPU that end at the same remote device."""

    peer_bus_id: str = ""  # normalised like Gpu.bus_id; "" when only nvidia-smi topo -m was available
    peer_gpu: int = UNKNOWN  # index of the peer among this host's GPUs, -1 when the peer is no GPU here
    peer_kind: str = "unknown"  # "gpu", "nvswitch" or "unknown"
    links: list[int] = msgspec.field(default_factory=list)  # link numbers; empty when only a count is known
    count: int = 0


class Gpu(msgspec.Struct, kw_only=True):
    index: int  # NVML / physical index, not the CUDA_VISIBLE_DEVICES-relative ordinal
    name: str = ""
    uuid: str = ""
    memory_bytes: int = UNKNOWN
    bus_id: str = ""  # "0000:17:00.0": four-digit domain, lower case, the form /sys/bus/pci/devices uses
    pcie_gen: int = UNKNOWN
    pcie_width: int = UNKNOWN
    pcie_gen_max: int = UNKNOWN
    pcie_width_max: int = UNKNOWN
    numa_node: int = UNKNOWN
    cpu_affinity: str = ""  # cpulist of the CPUs close to this GPU
    nvlink_count: int = 0  # active NVLinks
    nvlink_peers: list[NvLinkPeer] = msgspec.field(default_factory=list)


class Nic(msgspec.Struct, kw_only=True):
    name: str
    speed_mbps: int = UNKNOWN  # the kernel reports none for virtual, down and many virtio devices
    mtu: int = UNKNOWN
    state: str = ""  # operstate: up, down, unknown, …
    mac: str = ""
    ipv4: list[str] = msgspec.field(default_factory=list)  # "10.0.0.2/24"
    ipv6: list[str] = msgspec.field(default_factory=list)
    virtual: bool = False  # no backing device (lo, bridges, veth, ifb, …)
    driver: str = ""
    numa_node: int = UNKNOWN


class RdmaPort(msgspec.Struct, kw_only=True):
    port: int
    state: str = ""  # "ACTIVE", "DOWN", …
    rate: str = ""  # as the kernel says it: "100 Gb/sec (4X EDR)"
    rate_gbps: float = UNKNOWN
    link_layer: str = ""  # "InfiniBand" or "Ethernet"
    transport: str = ""  # "IB" or "RoCE"
    netdev: str = ""  # the Ethernet interface of a RoCE port


class RdmaDevice(msgspec.Struct, kw_only=True):
    name: str  # "mlx5_0"
    fw_ver: str = ""
    numa_node: int = UNKNOWN
    ports: list[RdmaPort] = msgspec.field(default_factory=list)


class Accelerator(msgspec.Struct, kw_only=True):
    vendor: str  # "ascend" or "cambricon"
    index: int  # NPU id (npu-smi) or card (cnmon); the /dev node number when only that is known
    chip: int = 0  # chip within the NPU (multi-chip Ascend cards)
    name: str = ""
    memory_bytes: int = UNKNOWN
    bus_id: str = ""
    health: str = ""
    source: str = ""  # "npu-smi", "cnmon" or "/dev"


class Topology(msgspec.Struct, kw_only=True):
    host: HostInfo
    numa: list[NumaNode] = msgspec.field(default_factory=list)
    gpus: list[Gpu] = msgspec.field(default_factory=list)
    nics: list[Nic] = msgspec.field(default_factory=list)
    rdma: list[RdmaDevice] = msgspec.field(default_factory=list)
    accelerators: list[Accelerator] = msgspec.field(default_factory=list)
    # where each part came from ("sysfs", "nvml", "nvidia-smi", …), or "absent: why" / "error: why"
    sources: dict[str, str] = msgspec.field(default_factory=dict)
    seconds: float = 0.0  # how long discovery took
    schema: int = SCHEMA
