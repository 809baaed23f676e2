"""Local topology discovery: what this host has, read from /sys, /proc, NVML and vendor tools.

Discovery runs at every `init_process_group` (each rank describes its host, the
group gathers the views), so it has to be fast (well under 100 ms without NVML
on a GPU host) and it must never fail a job: every part tolerates missing files,
odd values, absent tools and broken drivers, and records in `Topology.sources`
where its data came from or why there is none.

The roots, the NVML module and the command runner are parameters so tests can
point discovery at a fake tree, a fake NVML and canned tool output.
"""

from __future__ import annotations

import csv
import fcntl
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

TOOL_TIMEOUT = 2.0  # seconds; a wedged driver tool must not hold up init_process_group

Runner = Callable[[Sequence[str]], str]
"""Runs argv, returns stdout. Raises FileNotFoundError when the tool is not installed, another error when it fails."""

_NVIDIA_QUERY = ("index,name,uuid,memory.total,pci.bus_id,pcie.link.gen.current,pcie.link.gen.max,"
                 "pcie.link.width.current,pcie.link.width.max")
_BUS_ID = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> str:
    """The default runner: only tools on PATH, a short timeout, a non-zero exit is an error."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise FileNotFoundError(f"{argv[0]} not on PATH")
    done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False,
                          errors="replace")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(f"{argv[0]} exited {done.returncode}" + (f": {tail[-1]}" if tail else ""))
    return done.stdout


def discover(*, sysfs: Path = Path("/sys"), procfs: Path = Path("/proc"), devfs: Path = Path("/dev"),
             nvml: Any | None = None, run: Runner | None = None) -> Topology:
    """This host's topology; never raises (a failed part is empty and says why in `sources`).

    `nvml` is a pynvml-like module (default: import pynvml from nvidia-ml-py, if installed);
    `run` runs vendor tools (default: `run_tool`). Nothing is cached between calls: links go
    up and down, and a container's CPU set can change.
    """
    t0 = time.perf_counter()
    runner = run or run_tool
    sources: dict[str, str] = {}
    host = _guard(sources, "host", lambda: _host(sysfs, procfs), None)
    if host is None:
        host = HostInfo(hostname=socket.gethostname(), host_key="")
    else:
        sources["host"] = "procfs + sysfs"
    topo = Topology(
        host=host,
        numa=_guard(sources, "numa", lambda: _numa(sysfs, sources), []),
        gpus=_guard(sources, "gpus", lambda: _gpus(sysfs, nvml, runner, sources), []),
        nics=_guard(sources, "nics", lambda: _nics(sysfs, procfs, runner, sources), []),
        rdma=_guard(sources, "rdma", lambda: _rdma(sysfs, sources), []),
        accelerators=_accelerators(devfs, runner, sources),
        sources=sources,
    )
    topo.seconds = time.perf_counter() - t0
    return topo


T = TypeVar("T")


def _guard(sources: dict[str, str], part: str, fn: Callable[[], T], empty: T) -> T:
    """One part's unexpected failure must cost that part only, never the job."""
    try:
        return fn()
    except Exception as e:
        sources[part] = f"error: {_why(e)}"
        return empty


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------- small readers


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (OSError, ValueError):  # ValueError: e.g. a path with a NUL byte
        return None


def _int(text: str | None, default: int = UNKNOWN, base: int = 10) -> int:
    try:
        return int(text.strip(), base) if text is not None else default
    except ValueError:
        return default


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _numbered(names: Iterable[str], prefix: str) -> list[tuple[int, str]]:
    """(n, name) for names like node0, node12 — sorted numerically, not as strings."""
    out = []
    for name in names:
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest.isdigit():
            out.append((int(rest), name))
    return sorted(out)


def cpulist_count(cpulist: str) -> int:
    """How many CPUs a kernel cpulist ("0-3,8,10-11") names; 0 for junk."""
    total = 0
    for part in filter(None, (p.strip() for p in cpulist.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            total += int(hi) - int(lo) + 1 if sep else (1 if int(lo) >= 0 else 0)
        except ValueError:
            return 0
    return total


def normalize_bus_id(bus_id: str | bytes) -> str:
    """NVML and nvidia-smi say 00000000:17:00.0, sysfs says 0000:17:00.0: one spelling to compare and look up."""
    text = _str(bus_id).strip()
    domain, sep, rest = text.partition(":")
    if not sep or not rest:
        return text.lower()
    try:
        return f"{int(domain, 16):04x}:{rest.lower()}"
    except ValueError:
        return text.lower()


def _str(value: str | bytes) -> str:
    """Old nvidia-ml-py releases return bytes, new ones str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- host and NUMA


def _host(sysfs: Path, procfs: Path) -> HostInfo:
    cpu_online = _read(sysfs / "devices/system/cpu/online")
    logical = cpulist_count(cpu_online) if cpu_online else (os.cpu_count() or UNKNOWN)
    return HostInfo(
        hostname=_read(procfs / "sys/kernel/hostname") or socket.gethostname(),
        host_key=_host_key(procfs),
        kernel=_read(procfs / "sys/kernel/osrelease") or "",
        cpu_model=_cpu_model(procfs),
        logical_cpus=logical or UNKNOWN,
        physical_cores=_physical_cores(sysfs, cpu_online or ""),
        usable_cpus=_status_field(procfs / "self/status", "Cpus_allowed_list"),
        memory_bytes=_meminfo_kib(_read(procfs / "meminfo") or "", "MemTotal"),
    )


def _host_key(procfs: Path) -> str:
    """The transport's host key, so that a topology tells which ranks can share memory."""
    if procfs == Path("/proc"):
        from ..transports.shm import host_key

        return host_key()
    # a fake tree (tests): the same recipe as transports.shm.host_key, over this root
    import hashlib

    boot = _read(procfs / "sys/kernel/random/boot_id") or socket.gethostname()
    try:
        netns = str(os.stat(procfs / "self/ns/net").st_ino)
    except OSError:
        netns = "?"
    return hashlib.sha256(f"{boot}/{netns}".encode()).hexdigest()[:16]


def _cpu_model(procfs: Path) -> str:
    """The first "model name" in /proc/cpuinfo. Only the head is read: the kernel builds it per CPU."""
    try:
        with open(procfs / "cpuinfo", "rb") as f:
            head = f.read(16384).decode(errors="replace")
    except OSError:
        return ""
    for key in ("model name", "Model", "Hardware", "cpu model"):  # x86; some ARM and MIPS kernels
        m = re.search(rf"^{key}\s*:\s*(.+)$", head, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return ""


def _physical_cores(sysfs: Path, cpu_online: str) -> int:
    """Distinct SMT sibling sets among the online CPUs (one small read per CPU)."""
    cpus = _expand_cpulist(cpu_online)
    if not cpus:
        return UNKNOWN
    base = sysfs / "devices/system/cpu"
    sets = {_read(base / f"cpu{c}/topology/thread_siblings_list") for c in cpus}
    sets.discard(None)
    return len(sets) or UNKNOWN


def _expand_cpulist(cpulist: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in cpulist.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            return []
    return out


def _status_field(path: Path, key: str) -> str:
    for line in (_read(path) or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def _meminfo_kib(text: str, key: str) -> int:
    """Bytes from a meminfo line ("MemTotal:  123 kB" or "Node 0 MemTotal:  123 kB")."""
    m = re.search(rf"\b{key}:\s*(\d+)\s*kB", text)
    return int(m.group(1)) * 1024 if m else UNKNOWN


def _numa(sysfs: Path, sources: dict[str, str]) -> list[NumaNode]:
    base = sysfs / "devices/system/node"
    nodes = _numbered(_listdir(base), "node")
    if not nodes:
        sources["numa"] = "absent: no /sys/devices/system/node (kernel without NUMA)"
        return []
    sources["numa"] = "sysfs"
    return [NumaNode(id=n, cpus=_read(base / name / "cpulist") or "",
                     memory_bytes=_meminfo_kib(_read(base / name / "meminfo") or "", "MemTotal"),
                     distances=[_int(d) for d in (_read(base / name / "distance") or "").split()])
            for n, name in nodes]


# ---------------------------------------------------------------- GPUs


def _gpus(sysfs: Path, nvml: Any | None, run: Runner, sources: dict[str, str]) -> list[Gpu]:
    """NVML first (PCIe and per-link NVLink detail); `nvidia-smi` when NVML is unusable."""
    module, why = (nvml, "") if nvml is not None else _import_pynvml()
    if module is not None:
        try:
            gpus = _gpus_nvml(module, sysfs)
        except Exception as e:
            why = f"nvml: {_why(e)}"
        else:
            sources["gpus"] = "nvml"
            return gpus
    try:
        gpus = _gpus_smi(run, sysfs, sources)
    except FileNotFoundError:
        sources["gpus"] = f"absent: {why}; nvidia-smi not on PATH"
        return []
    except Exception as e:
        sources["gpus"] = f"absent: {why}; nvidia-smi: {_why(e)}"
        return []
    sources["gpus"] = f"nvidia-smi ({why})"
    return gpus


def _import_pynvml() -> tuple[Any | None, str]:
    """Imported here, not at module level: most hosts and every CPU-only test have no NVIDIA driver."""
    try:
        import pynvml  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ModuleNotFoundError:
        return None, "nvml: pynvml (nvidia-ml-py) not installed"
    except Exception as e:  # a broken install
        return None, f"nvml: import pynvml: {_why(e)}"
    return pynvml, ""


def _call(fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
    """One NVML query: older drivers and GPUs answer NotSupported to many of them."""
    try:
        return fn(*args)
    except Exception:
        return default


def _gpus_nvml(nvml: Any, sysfs: Path) -> list[Gpu]:
    nvml.nvmlInit()
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        buses = [normalize_bus_id(_call(lambda h: nvml.nvmlDeviceGetPciInfo(h).busId, h, default="")) for h in handles]
        return [_gpu_nvml(nvml, i, h, buses, sysfs) for i, h in enumerate(handles)]
    finally:
        _call(nvml.nvmlShutdown)


def _gpu_nvml(nvml: Any, index: int, h: Any, buses: list[str], sysfs: Path) -> Gpu:
    mem = _call(nvml.nvmlDeviceGetMemoryInfo, h)
    numa, affinity = _pci_locality(sysfs, buses[index])
    peers = _nvlink_peers(nvml, h, buses)
    return Gpu(
        index=index,
        name=_str(_call(nvml.nvmlDeviceGetName, h, default="")),
        uuid=_str(_call(nvml.nvmlDeviceGetUUID, h, default="")),
        memory_bytes=int(mem.total) if mem is not None else UNKNOWN,
        bus_id=buses[index],
        pcie_gen=int(_call(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h, default=UNKNOWN)),
        pcie_width=int(_call(nvml.nvmlDeviceGetCurrPcieLinkWidth, h, default=UNKNOWN)),
        pcie_gen_max=int(_call(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h, default=UNKNOWN)),
        pcie_width_max=int(_call(nvml.nvmlDeviceGetMaxPcieLinkWidth, h, default=UNKNOWN)),
        numa_node=numa,
        cpu_affinity=affinity,
        nvlink_count=sum(p.count for p in peers),
        nvlink_peers=peers,
    )


def _nvlink_peers(nvml: Any, h: Any, buses: list[str]) -> list[NvLinkPeer]:
    """Active links grouped by the device at their far end (another GPU here, or an NVSwitch)."""
    enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    by_peer: dict[str, NvLinkPeer] = {}
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        if _call(nvml.nvmlDeviceGetNvLinkState, h, link) != enabled:
            continue
        remote = _call(nvml.nvmlDeviceGetNvLinkRemotePciInfo, h, link)
        bus = normalize_bus_id(remote.busId) if remote is not None else ""
        peer = by_peer.get(bus)
        if peer is None:
            gpu = buses.index(bus) if bus in buses else UNKNOWN
            kind = "gpu" if gpu != UNKNOWN else "unknown"
            get_type = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
            if gpu == UNKNOWN and get_type is not None and _call(get_type, h, link) == switch_type:
                kind = "nvswitch"
            peer = by_peer[bus] = NvLinkPeer(peer_bus_id=bus, peer_gpu=gpu, peer_kind=kind)
        peer.links.append(link)
        peer.count += 1
    return list(by_peer.values())


def _pci_locality(sysfs: Path, bus_id: str) -> tuple[int, str]:
    """(NUMA node, local CPU list) of a PCI device, from sysfs: the same answer for every vendor."""
    if not bus_id:
        return UNKNOWN, ""
    dev = sysfs / "bus/pci/devices" / bus_id
    return _int(_read(dev / "numa_node")), _read(dev / "local_cpulist") or ""


def _gpus_smi(run: Runner, sysfs: Path, sources: dict[str, str]) -> list[Gpu]:
    out = run(["nvidia-smi", f"--query-gpu={_NVIDIA_QUERY}", "--format=csv,noheader,nounits"])
    gpus = parse_nvidia_smi_query(out)
    for g in gpus:
        g.numa_node, g.cpu_affinity = _pci_locality(sysfs, g.bus_id)
    try:
        topo = parse_nvidia_smi_topo(run(["nvidia-smi", "topo", "-m"]))
    except Exception as e:
        sources["nvlink"] = f"absent: nvidia-smi topo -m: {_why(e)}"
        return gpus
    for g in gpus:
        row = topo.get(g.index)
        if row is None:
            continue
        g.nvlink_peers = [NvLinkPeer(peer_gpu=j, peer_kind="gpu", count=n,
                                     peer_bus_id=next((o.bus_id for o in gpus if o.index == j), ""))
                          for j, n in row["nvlink"].items()]
        g.nvlink_count = sum(row["nvlink"].values())
        if g.numa_node == UNKNOWN:
            g.numa_node = _int(row["numa"])
        g.cpu_affinity = g.cpu_affinity or ("" if row["cpus"] in ("", "N/A") else row["cpus"])
    return gpus


def _smi_int(text: str) -> int:
    """nvidia-smi writes "[N/A]" or "[Not Supported]" for fields a GPU lacks."""
    return _int(text.strip(), UNKNOWN)


def parse_nvidia_smi_query(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=<_NVIDIA_QUERY> --format=csv,noheader,nounits` (memory in MiB)."""
    gpus = []
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        cells = [c.strip() for c in row]
        if len(cells) < 9 or not cells[0].isdigit():
            continue
        mib = _smi_int(cells[3])
        gpus.append(Gpu(index=int(cells[0]), name=cells[1], uuid=cells[2],
                        memory_bytes=mib * 1024 * 1024 if mib >= 0 else UNKNOWN,
                        bus_id=normalize_bus_id(cells[4]), pcie_gen=_smi_int(cells[5]),
                        pcie_gen_max=_smi_int(cells[6]), pcie_width=_smi_int(cells[7]),
                        pcie_width_max=_smi_int(cells[8])))
    return gpus


def parse_nvidia_smi_topo(text: str) -> dict[int, dict[str, Any]]:
    """`nvidia-smi topo -m` → {gpu: {"nvlink": {peer gpu: links}, "cpus": str, "numa": str}}.

    The matrix is tab-separated: a header of column names (GPU0 … NIC0 … "CPU
    Affinity", "NUMA Affinity", …), then one row per device; a cell "NV12" means
    twelve bonded NVLinks, other cells (X, PIX, PXB, PHB, NODE, SYS) are PCIe paths.
    Newer drivers underline the header with ANSI escapes and leave empty cells, so
    both are dropped before the columns are matched up.
    """
    header: list[str] | None = None
    out: dict[int, dict[str, Any]] = {}
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        cells = [c.strip() for c in line.split("\t") if c.strip()]
        if not cells:
            continue
        if header is None:
            if cells[0].startswith("GPU") and "\t" in line and line.startswith(("\t", " ")):
                header = cells
            continue
        m = re.fullmatch(r"GPU(\d+)", cells[0])
        if not m:
            if cells[0].startswith("Legend"):
                break
            continue
        values = dict(zip(header, cells[1:], strict=False))
        nvlink = {int(col[3:]): int(v[2:]) for col, v in values.items()
                  if re.fullmatch(r"GPU\d+", col) and re.fullmatch(r"NV\d+", v)}
        out[int(m.group(1))] = {"nvlink": nvlink, "cpus": values.get("CPU Affinity", ""),
                                "numa": values.get("NUMA Affinity", "")}
    return out


# ---------------------------------------------------------------- network


def _nics(sysfs: Path, procfs: Path, run: Runner, sources: dict[str, str]) -> list[Nic]:
    base = sysfs / "class/net"
    names = _listdir(base)
    if not names:
        sources["nics"] = "absent: no /sys/class/net"
        return []
    sources["nics"] = "sysfs"
    nics = [_nic(base / name, name) for name in names]
    addrs = _addresses(names, procfs, run, sources)
    for nic in nics:
        nic.ipv4, nic.ipv6 = addrs.get(nic.name, ([], []))
    return nics


def _nic(path: Path, name: str) -> Nic:
    device = path / "device"
    virtual = not device.exists()
    speed = _int(_read(path / "speed"))  # reading it fails (EINVAL) when the link is down
    driver = "" if virtual else os.path.basename(_readlink(device / "driver"))
    return Nic(name=name, speed_mbps=speed if speed > 0 else UNKNOWN, mtu=_int(_read(path / "mtu")),
               state=_read(path / "operstate") or "", mac=_read(path / "address") or "", virtual=virtual,
               driver=driver, numa_node=UNKNOWN if virtual else _int(_read(device / "numa_node")))


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


Addresses = dict[str, tuple[list[str], list[str]]]


def _addresses(names: list[str], procfs: Path, run: Runner, sources: dict[str, str]) -> Addresses:
    """`ip -j addr` when iproute2 is installed; else ioctl for IPv4 and /proc/net/if_inet6 for IPv6."""
    try:
        out = parse_ip_addr_json(run(["ip", "-j", "addr"]))
    except Exception as e:
        why = "ip not on PATH" if isinstance(e, FileNotFoundError) else f"ip -j addr: {_why(e)}"
    else:
        sources["addresses"] = "ip -j addr"
        return out
    v6 = parse_if_inet6(_read(procfs / "net/if_inet6") or "")
    sources["addresses"] = f"ioctl + procfs ({why})"
    return {name: (_ipv4_ioctl(name), v6.get(name, [])) for name in names}


def parse_ip_addr_json(text: str) -> Addresses:
    """{ifname: (["10.0.0.2/24"], ["fe80::1/64"])} from `ip -j addr`."""
    out: Addresses = {}
    for link in json.loads(text):
        v4: list[str] = []
        v6: list[str] = []
        for a in link.get("addr_info", []):
            if "local" not in a:
                continue
            cidr = f"{a['local']}/{a.get('prefixlen', '')}".rstrip("/")
            {"inet": v4, "inet6": v6}.get(a.get("family", ""), []).append(cidr)
        out[str(link.get("ifname", ""))] = (v4, v6)
    return out


def parse_if_inet6(text: str) -> dict[str, list[str]]:
    """/proc/net/if_inet6: "<32 hex digits> <ifindex> <prefix len, hex> <scope> <flags> <name>" per line."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) != 6 or len(f[0]) != 32:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(f[0]))
            out.setdefault(f[5], []).append(f"{addr}/{int(f[2], 16)}")
        except ValueError:
            continue
    return out


def _ipv4_ioctl(name: str) -> list[str]:
    """The primary IPv4 address of an interface (SIOCGIFADDR/SIOCGIFNETMASK); [] when it has none."""
    SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B
    req = struct.pack("256s", name.encode()[:15])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
            mask = fcntl.ioctl(s.fileno(), SIOCGIFNETMASK, req)[20:24]
    except OSError:
        return []
    return [f"{addr}/{bin(int.from_bytes(mask, 'big')).count('1')}"]


# ---------------------------------------------------------------- RDMA


def _rdma(sysfs: Path, sources: dict[str, str]) -> list[RdmaDevice]:
    base = sysfs / "class/infiniband"
    names = _listdir(base)
    if not names:
        sources["rdma"] = "absent: no /sys/class/infiniband"
        return []
    sources["rdma"] = "sysfs"
    return [_rdma_device(base / name, name) for name in names]


def _rdma_device(path: Path, name: str) -> RdmaDevice:
    netdevs = _listdir(path / "device/net")
    ports = [_rdma_port(path / "ports" / p, int(p), netdevs) for p in _listdir(path / "ports") if p.isdigit()]
    return RdmaDevice(name=name, fw_ver=_read(path / "fw_ver") or "",
                      numa_node=_int(_read(path / "device/numa_node")), ports=sorted(ports, key=lambda p: p.port))


def _rdma_port(path: Path, port: int, netdevs: list[str]) -> RdmaPort:
    state = _read(path / "state") or ""  # "4: ACTIVE"
    rate = _read(path / "rate") or ""  # "100 Gb/sec (4X EDR)"
    layer = _read(path / "link_layer") or ""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", rate)
    # a RoCE port names its Ethernet device in its GID table; the PCI function's net/ folder is the fallback
    netdev = _read(path / "gid_attrs/ndevs/0") or (netdevs[0] if len(netdevs) == 1 else "")
    return RdmaPort(port=port, state=state.partition(":")[2].strip() or state, rate=rate,
                    rate_gbps=float(m.group(1)) if m else UNKNOWN, link_layer=layer,
                    transport={"InfiniBand": "IB", "Ethernet": "RoCE"}.get(layer, ""),
                    netdev=netdev if layer == "Ethernet" else "")


# ---------------------------------------------------------------- Ascend and Cambricon


def _accelerators(devfs: Path, run: Runner, sources: dict[str, str]) -> list[Accelerator]:
    def ascend() -> list[Accelerator]:
        return _vendor("ascend", ["npu-smi", "info"], parse_npu_smi, devfs, "davinci", run, sources)

    def cambricon() -> list[Accelerator]:
        return _vendor("cambricon", ["cnmon"], parse_cnmon, devfs, "cambricon_dev", run, sources)

    none: list[Accelerator] = []
    return _guard(sources, "ascend", ascend, none) + _guard(sources, "cambricon", cambricon, none)


def _vendor(vendor: str, argv: list[str], parse: Callable[[str], list[Accelerator]], devfs: Path,
            pattern: str, run: Runner, sources: dict[str, str]) -> list[Accelerator]:
    """The vendor tool's table when it runs; else one entry per /dev node (the driver is loaded, the tool not)."""
    nodes = _numbered(_listdir(devfs), pattern)
    try:
        found = parse(run(argv))
    except FileNotFoundError:
        why = f"{argv[0]} not on PATH"
    except Exception as e:
        why = f"{argv[0]}: {_why(e)}"
    else:
        if found or not nodes:
            sources[vendor] = argv[0] if found else f"absent: {argv[0]} lists no device"
            return found
        why = f"{argv[0]} lists no device"
    if not nodes:
        sources[vendor] = f"absent: {why}, no /dev/{pattern}*"
        return []
    sources[vendor] = f"/dev ({why})"
    return [Accelerator(vendor=vendor, index=n, source="/dev") for n, _ in nodes]


def _mb_pairs(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)\s*(?:MiB|MB)?\s*/\s*(\d+)", text)]


def parse_npu_smi(text: str) -> list[Accelerator]:
    """Devices from `npu-smi info` (Huawei Ascend).

    Written without Ascend hardware, against the output documented by Huawei and
    quoted in public Ascend guides (npu-smi 23.x–25.x, Atlas 800 A2 / 910B):

        | NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
        | Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
        +===========================+===============+====================================================+
        | 0     910B3               | OK            | 101.8       43                0    / 0             |
        | 0                         | 0000:C1:00.0  | 0           0    / 0          3318 / 65536         |

    Each device is a row pair: "NPU-id Name | Health | …" then "Chip [Device] | Bus-Id |
    AICore used / total [used / total]". The memory is the last non-zero total
    (HBM on 910 parts, DDR on 310 parts). The process table after it is ignored.
    """
    out: list[Accelerator] = []
    pending: tuple[int, str, str] | None = None  # (npu id, name, health) of a first row
    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        head = cells[0].split()
        if len(head) >= 2 and head[0].isdigit() and not _BUS_ID.match(cells[1]):
            pending = (int(head[0]), head[1], cells[1])
        elif pending is not None and head and head[0].isdigit() and _BUS_ID.match(cells[1]):
            totals = [b for _, b in _mb_pairs(cells[2]) if b > 0]
            out.append(Accelerator(vendor="ascend", index=pending[0], chip=int(head[0]), name=pending[1],
                                   memory_bytes=totals[-1] * 1024 * 1024 if totals else UNKNOWN,
                                   bus_id=normalize_bus_id(cells[1]), health=pending[2], source="npu-smi"))
            pending = None
    return out


def parse_cnmon(text: str) -> list[Accelerator]:
    """Devices from `cnmon` (Cambricon MLU).

    Written without Cambricon hardware, against the output shown in Cambricon's
    and PaddlePaddle's MLU guides (CNMON v5.10):

        | Card  VF  Name       Firmware |               Bus-Id | Util        Ecc-Error |
        | Fan   Temp      Pwr:Usage/Cap |         Memory-Usage | Mode     Compute-Mode |
        |===============================+======================+=======================|
        | 0     /   MLU370-X8    v1.1.6 |         0000:39:00.0 | 0%                N/A |
        |  0%   32C        106 W/ 250 W |     0 MiB/ 23374 MiB | N/A           Default |

    Each card is a row pair; older cnmon (v4) has "Inited Driver" where the Bus-Id
    is, so the bus id is optional. The "Processes:" table after it is ignored.
    """
    out: list[Accelerator] = []
    for line in text.splitlines():
        if "Processes" in line:
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        head = cells[0].split()
        if len(head) >= 3 and head[0].isdigit():
            name = head[2] if head[1] == "/" or head[1].isdigit() else head[1]
            bus = cells[1] if _BUS_ID.match(cells[1]) else ""
            out.append(Accelerator(vendor="cambricon", index=int(head[0]), name=name,
                                   bus_id=normalize_bus_id(bus) if bus else "", source="cnmon"))
        elif out and "MiB" in cells[1] and out[-1].memory_bytes == UNKNOWN:
            pairs = _mb_pairs(cells[1])
            if pairs:
                out[-1].memory_bytes = pairs[0][1] * 1024 * 1024
    return out


__all__ = [
    "Runner",
    "cpulist_count",
    "discover",
    "normalize_bus_id",
    "parse_cnmon",
    "parse_if_inet6",
    "parse_ip_addr_json",
    "parse_npu_smi",
    "parse_nvidia_smi_query",
    "parse_nvidia_smi_topo",
    "run_tool",
]
