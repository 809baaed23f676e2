"""Local topology discovery.

Most tests here run against FAKES: a fake /sys, /proc and /dev tree built under
tmp_path, a fake NVML module object, and a fake command runner that returns
canned `ip`, `nvidia-smi`, `npu-smi` and `cnmon` output. They check the parsers
and the plumbing, not any real hardware. The last tests run on the real machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sagellm_comm import topology
from sagellm_comm.topology import (
    Accelerator,
    Gpu,
    HostInfo,
    Nic,
    NumaNode,
    NvLinkPeer,
    RdmaDevice,
    RdmaPort,
    Topology,
    discover,
    format_tree,
    from_json,
    to_json,
)
from sagellm_comm.topology.discover import (
    cpulist_count,
    normalize_bus_id,
    parse_cnmon,
    parse_npu_smi,
    parse_nvidia_smi_topo,
)
from sagellm_comm.transports.shm import host_key

GiB = 2**30
MiB = 2**20

# ---------------------------------------------------------------- fake trees


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_sys(root: Path) -> Path:
    """A fake /sys: 8 CPUs (4 cores x 2 threads) on 2 NUMA nodes, 4 NICs, 2 RDMA devices, 2 GPU PCI functions."""
    _write(root, "devices/system/cpu/online", "0-7\n")
    for cpu in range(8):
        _write(root, f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", f"{cpu % 4},{cpu % 4 + 4}\n")
    for node, cpus, kib, dist in ((0, "0-1,4-5", 16 * 2**20, "10 21"), (1, "2-3,6-7", 8 * 2**20, "21 10")):
        _write(root, f"devices/system/node/node{node}/cpulist", cpus + "\n")
        _write(root, f"devices/system/node/node{node}/meminfo",
               f"Node {node} MemTotal:       {kib} kB\nNode {node} MemFree:        1000 kB\n")
        _write(root, f"devices/system/node/node{node}/distance", dist + "\n")
    _write(root, "devices/system/node/possible", "0-1\n")  # not a node folder: must be skipped
    # NICs: a 100G PCI NIC, a PCI NIC whose link is down (speed unreadable: junk here), lo and a bridge (virtual)
    net = root / "class/net"
    nics = {"eth0": ("100000", "9000", "up", "b8:ce:f6:00:00:01", "mlx5_core", "1"),
            "eth1": ("junk", "1500", "down", "b8:ce:f6:00:00:02", "ixgbe", "-1"),
            "lo": (None, "65536", "unknown", "00:00:00:00:00:00", None, None),
            "docker0": ("-1", "1500", "down", "02:42:00:00:00:01", None, None)}
    for name, (speed, mtu, state, mac, driver, numa) in nics.items():
        if speed is not None:
            _write(net, f"{name}/speed", speed + "\n")
        _write(net, f"{name}/mtu", mtu + "\n")
        _write(net, f"{name}/operstate", state + "\n")
        _write(net, f"{name}/address", mac + "\n")
        if driver is not None:
            _write(net, f"{name}/device/numa_node", f"{numa}\n")
            os.symlink(f"../../../bus/pci/drivers/{driver}", net / name / "device/driver")
    # RDMA: mlx5_0 is a RoCE port on eth0, mlx5_1 an InfiniBand port
    ib = root / "class/infiniband"
    _write(ib, "mlx5_0/fw_ver", "28.39.1002\n")
    _write(ib, "mlx5_0/device/numa_node", "1\n")
    (ib / "mlx5_0/device/net/eth0").mkdir(parents=True)
    _write(ib, "mlx5_0/ports/1/state", "4: ACTIVE\n")
    _write(ib, "mlx5_0/ports/1/rate", "100 Gb/sec (2X HDR)\n")
    _write(ib, "mlx5_0/ports/1/link_layer", "Ethernet\n")
    _write(ib, "mlx5_0/ports/1/gid_attrs/ndevs/0", "eth0\n")
    _write(ib, "mlx5_1/ports/1/state", "1: DOWN\n")
    _write(ib, "mlx5_1/ports/1/rate", "400 Gb/sec (4X NDR)\n")
    _write(ib, "mlx5_1/ports/1/link_layer", "InfiniBand\n")
    for bus, numa, cpus in (("0000:17:00.0", "0", "0-1,4-5"), ("0000:65:00.0", "1", "2-3,6-7")):
        _write(root, f"bus/pci/devices/{bus}/numa_node", numa + "\n")
        _write(root, f"bus/pci/devices/{bus}/local_cpulist", cpus + "\n")
    return root


CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n\n"


def fake_proc(root: Path) -> Path:
    """A fake /proc: hostname, kernel, boot id, a network namespace file, CPU model, memory, affinity, IPv6."""
    _write(root, "sys/kernel/hostname", "gpu-node-07\n")
    _write(root, "sys/kernel/osrelease", "5.15.0-105-generic\n")
    _write(root, "sys/kernel/random/boot_id", "0f8fad5b-d9cb-469f-a165-70867728950e\n")
    _write(root, "self/ns/net", "")
    _write(root, "self/status", "Name:\tpython\nCpus_allowed:\tff\nCpus_allowed_list:\t0-7\n")
    _write(root, "meminfo", "MemTotal:       32768000 kB\nMemFree:         100 kB\n")
    _write(root, "cpuinfo", CPUINFO)
    _write(root, "net/if_inet6", "fe80000000000000bacef6fffe000001 02 40 20 80     eth0\n"
           + "00000000000000000000000000000001 01 80 10 80       lo\n")
    return root


IP_ADDR = json.dumps([
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8},
                                   {"family": "inet6", "local": "::1", "prefixlen": 128}]},
    {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "10.1.2.3", "prefixlen": 16},
                                     {"family": "inet6", "local": "fe80::bace:f6ff:fe00:1", "prefixlen": 64}]},
    {"ifname": "eth1", "addr_info": []},
    {"ifname": "docker0", "addr_info": [{"family": "inet", "local": "172.17.0.1", "prefixlen": 16}]},
])

NVSMI_QUERY = ("0, NVIDIA H100 80GB HBM3, GPU-aaaa, 81559, 00000000:17:00.0, 5, 5, 16, 16\n"
               "1, NVIDIA H100 80GB HBM3, GPU-bbbb, 81559, 00000000:65:00.0, 4, 5, 8, 16\n")

# `nvidia-smi topo -m` as recent drivers print it: the header underlined with ANSI escapes, empty cells
NVSMI_TOPO = ("\x1b[4m\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
              "GPU0\t X \tNV18\tSYS\t0-1,4-5\t0\t\tN/A\n"
              "GPU1\tNV18\t X \tSYS\t2-3,6-7\t1\t\tN/A\n"
              "NIC0\tSYS\tSYS\t X \t\t\t\t\n\n"
              "Legend:\n\n  X    = Self\n  NV#  = Connection traversing a bonded set of # NVLinks\n\n"
              "NIC Legend:\n\n  NIC0: mlx5_0\n")

# `npu-smi info` as documented for Atlas 800 A2 (910B), npu-smi 24.1; the uneven "59356/ 65536" is real
NPU_SMI = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc1                 Version: 24.1.rc1                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B2C              | OK            | 86.8        35                0    / 0             |
| 0                         | 0000:66:00.0  | 0           0    / 0          59356/ 65536         |
+===========================+===============+====================================================+
| 1     910B2C              | Warning       | 103.1       37                0    / 0             |
| 0                         | 0000:19:00.0  | 0           0    / 0          3314 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 1712733       | python                   | 48954                   |
+===========================+===============+====================================================+
"""

# `npu-smi info` on an Atlas 300I (310P3): two chips per card, DDR memory and no HBM column
NPU_SMI_310P = """\
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 1       310P3                 | OK              | NA           53                0     / 0             |
| 0       0                     | 0000:3B:00.0    | 0            1436 / 21527                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 1       310P3                 | OK              | NA           51                0     / 0             |
| 1       1                     | 0000:3C:00.0    | 0            1204 / 21527                            |
+===============================+=================+======================================================+
"""

# `cnmon` as shown in Cambricon's MLU370 guides (CNMON v5.10)
CNMON = """\
Wed Jun 21 10:27:01 2023
+------------------------------------------------------------------------------+
| CNMON v5.10.10                                               Driver v5.10.10 |
+-------------------------------+----------------------+-----------------------+
| Card  VF  Name       Firmware |               Bus-Id | Util        Ecc-Error |
| Fan   Temp      Pwr:Usage/Cap |         Memory-Usage | SR-IOV   Compute-Mode |
|===============================+======================+=======================|
| 0     /   MLU370-X4    v1.1.6 |         0000:1B:00.0 | 0%                N/A |
|  0%   41C         27 W/ 150 W |     0 MiB/ 23308 MiB | N/A         Exclusive |
+-------------------------------+----------------------+-----------------------+
| 1     /   MLU370-X4    v1.1.6 |         0000:36:00.0 | 0%               N/A  |
|  0%   41C         27 W/ 150 W |     0 MiB/ 23308 MiB | N/A         Exclusive |
+-------------------------------+----------------------+-----------------------+

+------------------------------------------------------------------------------+
| Processes:                                                                   |
|  Card  VF  PID    Command Line             MLU Memory Usage                  |
|     0   /  1234   python                   1000 MiB                          |
+------------------------------------------------------------------------------+
"""


def fake_run(outputs: dict[tuple[str, ...], str]) -> Callable[[Sequence[str]], str]:
    """A fake runner: canned stdout per argv; any other tool is "not installed"."""

    def run(argv: Sequence[str]) -> str:
        key = tuple(argv)
        if key not in outputs:
            raise FileNotFoundError(f"{argv[0]} not on PATH")
        return outputs[key]

    return run


SMI_QUERY_ARGV = ("nvidia-smi", "--query-gpu=index,name,uuid,memory.total,pci.bus_id,pcie.link.gen.current,"
                  "pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max", "--format=csv,noheader,nounits")


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """A fake pynvml: two GPUs joined by NVLinks 0-3, PCIe gen 5 x16, 80 GiB each; other links off or unsupported."""

    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    BUSES = ("00000000:17:00.0", "00000000:65:00.0")

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H100 80GB HBM3"  # old bindings return bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{'ab'[h] * 4}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return _Obj(total=80 * GiB, used=0, free=80 * GiB)

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return _Obj(busId=self.BUSES[h])

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return 16

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return 5

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        raise FakeNVMLError("Not Supported")  # an unsupported query must leave -1, not fail the GPU

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= 12:
            raise FakeNVMLError("Invalid Argument")
        return 1 if link < 4 else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return _Obj(busId=self.BUSES[1 - h])


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "dev").mkdir()
    return {"sysfs": fake_sys(tmp_path / "sys"), "procfs": fake_proc(tmp_path / "proc"), "devfs": tmp_path / "dev"}


def _fake_host_key(procfs: Path) -> str:
    boot = (procfs / "sys/kernel/random/boot_id").read_text().strip()
    return hashlib.sha256(f"{boot}/{os.stat(procfs / 'self/ns/net').st_ino}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- fakes: the parts


def test_host_and_numa_from_fake_sys_and_proc(roots: dict[str, Path]) -> None:
    """Fake /sys + /proc: host facts and two NUMA nodes, read exactly."""
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({}))
    assert topo.host == HostInfo(hostname="gpu-node-07", host_key=_fake_host_key(roots["procfs"]),
                                 kernel="5.15.0-105-generic", cpu_model="Intel(R) Xeon(R) Platinum 8480+",
                                 logical_cpus=8, physical_cores=4, usable_cpus="0-7", memory_bytes=32768000 * 1024)
    assert topo.numa == [NumaNode(id=0, cpus="0-1,4-5", memory_bytes=16 * GiB, distances=[10, 21]),
                         NumaNode(id=1, cpus="2-3,6-7", memory_bytes=8 * GiB, distances=[21, 10])]
    assert topo.sources["host"] == "procfs + sysfs"
    assert topo.sources["numa"] == "sysfs"


def test_nics_with_speed_virtual_and_addresses(roots: dict[str, Path]) -> None:
    """Fake /sys/class/net plus fake `ip -j addr` output: speed, state, virtual, driver, NUMA, addresses."""
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({("ip", "-j", "addr"): IP_ADDR}))
    assert topo.nics == [
        Nic(name="docker0", speed_mbps=-1, mtu=1500, state="down", mac="02:42:00:00:00:01",
            ipv4=["172.17.0.1/16"], virtual=True),
        Nic(name="eth0", speed_mbps=100000, mtu=9000, state="up", mac="b8:ce:f6:00:00:01", ipv4=["10.1.2.3/16"],
            ipv6=["fe80::bace:f6ff:fe00:1/64"], driver="mlx5_core", numa_node=1),
        Nic(name="eth1", speed_mbps=-1, mtu=1500, state="down", mac="b8:ce:f6:00:00:02", driver="ixgbe"),
        Nic(name="lo", mtu=65536, state="unknown", mac="00:00:00:00:00:00", ipv4=["127.0.0.1/8"],
            ipv6=["::1/128"], virtual=True),
    ]
    assert topo.sources["nics"] == "sysfs"
    assert topo.sources["addresses"] == "ip -j addr"


def test_addresses_without_iproute2_come_from_proc(roots: dict[str, Path]) -> None:
    """Fake runner without `ip`: IPv6 from the fake /proc/net/if_inet6.

    IPv4 then comes from a real ioctl by interface name, which no fake tree can stand in for: not asserted.
    """
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({}))
    by_name = {n.name: n for n in topo.nics}
    assert by_name["eth0"].ipv6 == ["fe80::bace:f6ff:fe00:1/64"]
    assert by_name["lo"].ipv6 == ["::1/128"]
    assert topo.sources["addresses"] == "ioctl + procfs (ip not on PATH)"


def test_rdma_roce_and_infiniband_ports(roots: dict[str, Path]) -> None:
    """Fake /sys/class/infiniband: a RoCE port bound to eth0 and a down InfiniBand port."""
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({}))
    assert topo.rdma == [
        RdmaDevice(name="mlx5_0", fw_ver="28.39.1002", numa_node=1, ports=[
            RdmaPort(port=1, state="ACTIVE", rate="100 Gb/sec (2X HDR)", rate_gbps=100.0, link_layer="Ethernet",
                     transport="RoCE", netdev="eth0")]),
        RdmaDevice(name="mlx5_1", ports=[
            RdmaPort(port=1, state="DOWN", rate="400 Gb/sec (4X NDR)", rate_gbps=400.0, link_layer="InfiniBand",
                     transport="IB")]),
    ]
    assert topo.sources["rdma"] == "sysfs"


EXPECTED_NVML_GPUS = [
    Gpu(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_bytes=80 * GiB, bus_id="0000:17:00.0",
        pcie_gen=5, pcie_width=16, pcie_gen_max=5, pcie_width_max=-1, numa_node=0, cpu_affinity="0-1,4-5",
        nvlink_count=4, nvlink_peers=[NvLinkPeer(peer_bus_id="0000:65:00.0", peer_gpu=1, peer_kind="gpu",
                                                 links=[0, 1, 2, 3], count=4)]),
    Gpu(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb", memory_bytes=80 * GiB, bus_id="0000:65:00.0",
        pcie_gen=5, pcie_width=16, pcie_gen_max=5, pcie_width_max=-1, numa_node=1, cpu_affinity="2-3,6-7",
        nvlink_count=4, nvlink_peers=[NvLinkPeer(peer_bus_id="0000:17:00.0", peer_gpu=0, peer_kind="gpu",
                                                 links=[0, 1, 2, 3], count=4)]),
]


def test_gpus_from_fake_nvml(roots: dict[str, Path]) -> None:
    """Fake NVML module: two H100s, NVLink 0-3 between them, PCIe 5 x16; NUMA/CPUs from the fake sysfs."""
    nvml = FakeNVML()
    topo = discover(**roots, nvml=nvml, run=fake_run({}))
    assert topo.gpus == EXPECTED_NVML_GPUS
    assert topo.sources["gpus"] == "nvml"
    assert nvml.shutdown


def test_gpus_from_fake_nvidia_smi_when_nvml_fails(roots: dict[str, Path]) -> None:
    """Fake NVML that fails to initialise, fake `nvidia-smi` query and `topo -m` output: the fallback."""
    run = fake_run({SMI_QUERY_ARGV: NVSMI_QUERY, ("nvidia-smi", "topo", "-m"): NVSMI_TOPO})
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=run)
    assert topo.gpus == [
        Gpu(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_bytes=81559 * MiB, bus_id="0000:17:00.0",
            pcie_gen=5, pcie_width=16, pcie_gen_max=5, pcie_width_max=16, numa_node=0, cpu_affinity="0-1,4-5",
            nvlink_count=18, nvlink_peers=[NvLinkPeer(peer_bus_id="0000:65:00.0", peer_gpu=1, peer_kind="gpu",
                                                      count=18)]),
        Gpu(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb", memory_bytes=81559 * MiB, bus_id="0000:65:00.0",
            pcie_gen=4, pcie_width=8, pcie_gen_max=5, pcie_width_max=16, numa_node=1, cpu_affinity="2-3,6-7",
            nvlink_count=18, nvlink_peers=[NvLinkPeer(peer_bus_id="0000:17:00.0", peer_gpu=0, peer_kind="gpu",
                                                      count=18)]),
    ]
    assert topo.sources["gpus"] == "nvidia-smi (nvml: FakeNVMLError: Driver Not Loaded)"


def test_nvidia_smi_topo_parser_reads_affinity_columns() -> None:
    """The fake `topo -m` sample: NV18 both ways, CPU and NUMA affinity per GPU, NIC rows ignored."""
    assert parse_nvidia_smi_topo(NVSMI_TOPO) == {
        0: {"nvlink": {1: 18}, "cpus": "0-1,4-5", "numa": "0"},
        1: {"nvlink": {0: 18}, "cpus": "2-3,6-7", "numa": "1"},
    }


def test_no_gpu_says_why(roots: dict[str, Path]) -> None:
    """Fake NVML failing and no fake nvidia-smi: no GPUs, and the reason names both."""
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({}))
    assert topo.gpus == []
    assert topo.sources["gpus"] == "absent: nvml: FakeNVMLError: Driver Not Loaded; nvidia-smi not on PATH"


def test_ascend_and_cambricon_from_fake_tool_output(roots: dict[str, Path]) -> None:
    """Fake `npu-smi info` (910B sample) and `cnmon` (MLU370 sample) output; process tables ignored."""
    run = fake_run({("npu-smi", "info"): NPU_SMI, ("cnmon",): CNMON})
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=run)
    assert topo.accelerators == [
        Accelerator(vendor="ascend", index=0, name="910B2C", memory_bytes=65536 * MiB, bus_id="0000:66:00.0",
                    health="OK", source="npu-smi"),
        Accelerator(vendor="ascend", index=1, name="910B2C", memory_bytes=65536 * MiB, bus_id="0000:19:00.0",
                    health="Warning", source="npu-smi"),
        Accelerator(vendor="cambricon", index=0, name="MLU370-X4", memory_bytes=23308 * MiB, bus_id="0000:1b:00.0",
                    source="cnmon"),
        Accelerator(vendor="cambricon", index=1, name="MLU370-X4", memory_bytes=23308 * MiB, bus_id="0000:36:00.0",
                    source="cnmon"),
    ]
    assert (topo.sources["ascend"], topo.sources["cambricon"]) == ("npu-smi", "cnmon")


def test_npu_smi_310p_two_chips_and_ddr_memory() -> None:
    """A fake 310P3 sample: one NPU with two chips, memory from the only (DDR) column."""
    assert parse_npu_smi(NPU_SMI_310P) == [
        Accelerator(vendor="ascend", index=1, chip=0, name="310P3", memory_bytes=21527 * MiB,
                    bus_id="0000:3b:00.0", health="OK", source="npu-smi"),
        Accelerator(vendor="ascend", index=1, chip=1, name="310P3", memory_bytes=21527 * MiB,
                    bus_id="0000:3c:00.0", health="OK", source="npu-smi"),
    ]


def test_cnmon_v4_layout_without_bus_id() -> None:
    """A fake cnmon v4 sample, where "Inited Driver" stands in the Bus-Id column."""
    text = ("| Card  VF  Name       Firmware | Inited        Driver | Util        Ecc-Error |\n"
            "| 0     /   MLU370-X4    v1.1.6 | On          v4.20.11 | 0%          N/A       |\n"
            "|  0%   32C         30 W/ 150 W |     0 MiB/ 23308 MiB | 10240 MiB/1048576 MiB |\n")
    assert parse_cnmon(text) == [Accelerator(vendor="cambricon", index=0, name="MLU370-X4",
                                             memory_bytes=23308 * MiB, source="cnmon")]


def test_device_nodes_without_the_vendor_tool(roots: dict[str, Path]) -> None:
    """Fake /dev with davinci0, davinci1 (and the non-device davinci_manager), no fake npu-smi."""
    for name in ("davinci0", "davinci1", "davinci_manager", "cambricon_ctl"):
        (roots["devfs"] / name).touch()
    topo = discover(**roots, nvml=FakeNVML(fail_init=True), run=fake_run({}))
    assert topo.accelerators == [Accelerator(vendor="ascend", index=0, source="/dev"),
                                 Accelerator(vendor="ascend", index=1, source="/dev")]
    assert topo.sources["ascend"] == "/dev (npu-smi not on PATH)"
    assert topo.sources["cambricon"] == "absent: cnmon not on PATH, no /dev/cambricon_dev*"


def test_nothing_raises_from_broken_inputs(tmp_path: Path) -> None:
    """Empty fake roots, a runner that crashes, an NVML whose every call fails: empty parts, reasons recorded."""

    def crash(argv: Sequence[str]) -> str:
        raise RuntimeError(f"{argv[0]} segfaulted")

    class BrokenNVML:
        def __getattr__(self, name: str) -> Any:
            raise FakeNVMLError(f"{name} failed")

    topo = discover(sysfs=tmp_path / "nosys", procfs=tmp_path / "noproc", devfs=tmp_path / "nodev",
                    nvml=BrokenNVML(), run=crash)
    assert topo.host.hostname == socket.gethostname()
    assert (topo.numa, topo.gpus, topo.nics, topo.rdma, topo.accelerators) == ([], [], [], [], [])
    assert topo.sources["gpus"] == ("absent: nvml: FakeNVMLError: nvmlInit failed; "
                                    "nvidia-smi: RuntimeError: nvidia-smi segfaulted")
    assert topo.sources["ascend"] == "absent: npu-smi: RuntimeError: npu-smi segfaulted, no /dev/davinci*"
    assert topo.sources["numa"].startswith("absent:")
    assert topo.sources["nics"].startswith("absent:")


def test_small_helpers() -> None:
    assert [cpulist_count(s) for s in ("0-3,8,10-11", "", "0", "x-y")] == [7, 0, 1, 0]
    assert normalize_bus_id("00000000:1B:00.0") == "0000:1b:00.0"
    assert normalize_bus_id(b"0001:65:00.0") == "0001:65:00.0"


def test_tree_and_json_of_a_fake_topology(roots: dict[str, Path]) -> None:
    """The rendering of a fully fake host: every part appears, JSON round-trips exactly."""
    run = fake_run({("ip", "-j", "addr"): IP_ADDR, ("npu-smi", "info"): NPU_SMI})
    topo = discover(**roots, nvml=FakeNVML(), run=run)
    tree = format_tree(topo)
    assert tree.splitlines()[0].startswith("host gpu-node-07  key ")
    assert "8 CPUs / 4 cores (usable 0-7)  31.2 GiB" in tree
    assert "node1  cpus 2-3,6-7  8.0 GiB  distances 21 10" in tree
    assert ("GPU0  NVIDIA H100 80GB HBM3  80.0 GiB  PCIe 5 x16 (max 5 x?)  0000:17:00.0  numa 0  cpus 0-1,4-5"
            in tree)
    assert "NVLink 4: GPU1 x4" in tree
    assert "eth0     up       100 Gb/s  mtu 9000   mlx5_core  numa 1  10.1.2.3/16 fe80::bace:f6ff:fe00:1/64" in tree
    assert "port 1 ACTIVE 100 Gb/sec (2X HDR) RoCE via eth0" in tree
    assert "ascend 1  910B2C  64.0 GiB  0000:19:00.0  Warning  (npu-smi)" in tree
    assert "Accelerators (2 devices, from ascend: npu-smi; cambricon: absent: cnmon not on PATH" in tree
    assert tree.splitlines()[-1].startswith("discovered in ")
    assert "gpus=nvml" in tree.splitlines()[-1]
    assert from_json(to_json(topo)) == topo


# ---------------------------------------------------------------- the real machine


def test_discover_on_this_machine() -> None:
    """No fakes: whatever this machine has; only facts every Linux box shares are asserted."""
    topo = discover()
    assert topo.host.logical_cpus >= 1
    assert topo.host.host_key == host_key()
    assert topo.host.hostname in format_tree(topo)
    assert any(n.name == "lo" for n in topo.nics)
    decoded = msgspec.json.decode(to_json(topo).encode(), type=Topology)
    assert decoded == topo
    assert set(topo.sources) >= {"host", "numa", "gpus", "nics", "rdma", "ascend", "cambricon"}


def test_package_exports() -> None:
    assert topology.discover is discover and topology.format_tree is format_tree
