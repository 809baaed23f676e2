"""Rendering a Topology: a tree for people (`sagellm-comm topo`) and JSON for tools (`--json`).

The tree puts every part on screen even when it is empty, with the reason it is
empty: "GPUs: none" alone does not tell a missing driver from a missing package.
"""

from __future__ import annotations

import msgspec

from .model import UNKNOWN, Accelerator, Gpu, Nic, NvLinkPeer, RdmaDevice, Topology

Node = tuple[str, list["Node"]]


def to_json(topo: Topology) -> str:
    return msgspec.json.format(msgspec.json.encode(topo), indent=2).decode()


def from_json(text: str | bytes) -> Topology:
    """The inverse of `to_json` (also what a gathered peer view decodes with)."""
    return msgspec.json.decode(text, type=Topology)


def format_tree(topo: Topology) -> str:
    h = topo.host
    cores = f" / {h.physical_cores} cores" if h.physical_cores != UNKNOWN else ""
    usable = f" (usable {h.usable_cpus})" if h.usable_cpus else ""
    head = "  ".join(filter(None, [
        f"host {h.hostname}", f"key {h.host_key}" if h.host_key else "", f"Linux {h.kernel}" if h.kernel else "",
        h.cpu_model, f"{_n(h.logical_cpus)} CPUs{cores}{usable}", _size(h.memory_bytes)]))
    sections: list[Node] = [
        _section("NUMA", "node", [_numa_node(n.id, n.cpus, n.memory_bytes, n.distances) for n in topo.numa],
                 topo.sources.get("numa")),
        _section("GPUs", "GPU", [_gpu(g, topo.gpus) for g in topo.gpus], topo.sources.get("gpus"),
                 topo.sources.get("nvlink")),
        _section("NICs", "NIC", _table([_nic(n) for n in topo.nics]), topo.sources.get("nics"),
                 topo.sources.get("addresses")),
        _section("RDMA", "device", [_rdma(d) for d in topo.rdma], topo.sources.get("rdma")),
        _section("Accelerators", "device", _table([_accel(a) for a in topo.accelerators]),
                 *[f"{v}: {topo.sources[v]}" for v in ("ascend", "cambricon") if v in topo.sources]),
    ]
    # the reasons for absent parts are printed in their sections above; here only the word
    sources = ", ".join(f"{k}={v.split(':')[0] if v.startswith(('absent', 'error')) else v}"
                        for k, v in topo.sources.items())
    lines = [head, *_render(sections)]
    lines.append(f"discovered in {topo.seconds * 1e3:.1f} ms; sources: {sources}")
    return "\n".join(lines)


def _section(title: str, noun: str, items: list[Node], *notes: str | None) -> Node:
    said = [n for n in notes if n]
    if not items:
        absent = [n for n in said if "absent" in n or "error" in n]
        return f"{title}: none" + (f" ({'; '.join(absent)})" if absent else ""), []
    count = f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"
    return f"{title} ({count}" + (f", from {'; '.join(said)}" if said else "") + ")", items


def _render(nodes: list[Node], prefix: str = "") -> list[str]:
    out = []
    for i, (text, children) in enumerate(nodes):
        last = i == len(nodes) - 1
        out.append(f"{prefix}{'└── ' if last else '├── '}{text}")
        out += _render(children, prefix + ("    " if last else "│   "))
    return out


def _table(rows: list[list[str]]) -> list[Node]:
    """Rows of cells, padded to common column widths, so that a long list reads as a table."""
    widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(max(map(len, rows), default=0))]
    return [("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip(), []) for r in rows]


def _numa_node(id: int, cpus: str, memory: int, distances: list[int]) -> Node:
    parts = [f"node{id}", f"cpus {cpus or '?'}", _size(memory)]
    if distances:
        parts.append("distances " + " ".join(map(str, distances)))
    return "  ".join(parts), []


def _gpu(g: Gpu, gpus: list[Gpu]) -> Node:
    pcie = f"PCIe {_n(g.pcie_gen)} x{_n(g.pcie_width)}"
    if (g.pcie_gen_max, g.pcie_width_max) != (g.pcie_gen, g.pcie_width) and g.pcie_gen_max != UNKNOWN:
        pcie += f" (max {_n(g.pcie_gen_max)} x{_n(g.pcie_width_max)})"
    place = f"numa {g.numa_node}" if g.numa_node != UNKNOWN else ""
    cpus = f"cpus {g.cpu_affinity}" if g.cpu_affinity else ""
    text = "  ".join(filter(None, [f"GPU{g.index}", g.name, _size(g.memory_bytes), pcie, g.bus_id, place, cpus]))
    links = [f"{_peer(p)} x{p.count}" for p in g.nvlink_peers]
    children: list[Node] = [(f"NVLink {g.nvlink_count}: " + ", ".join(links), [])] if links else []
    return text, children


def _peer(p: NvLinkPeer) -> str:
    if p.peer_gpu != UNKNOWN:
        return f"GPU{p.peer_gpu}"
    return " ".join(filter(None, ["NVSwitch" if p.peer_kind == "nvswitch" else "device", p.peer_bus_id]))


def _nic(n: Nic) -> list[str]:
    kind = "virtual" if n.virtual else (n.driver or "device")
    numa = f"numa {n.numa_node}" if n.numa_node != UNKNOWN else ""
    return [n.name, n.state or "?", _speed(n.speed_mbps), f"mtu {_n(n.mtu)}", kind, numa,
            " ".join(n.ipv4 + n.ipv6)]


def _rdma(d: RdmaDevice) -> Node:
    numa = f"  numa {d.numa_node}" if d.numa_node != UNKNOWN else ""
    fw = f"  fw {d.fw_ver}" if d.fw_ver else ""
    ports: list[Node] = [(" ".join(filter(None, [
        f"port {p.port}", p.state, p.rate or "rate ?", p.transport or p.link_layer,
        f"via {p.netdev}" if p.netdev else ""])), []) for p in d.ports]
    return f"{d.name}{fw}{numa}", ports


def _accel(a: Accelerator) -> list[str]:
    chip = f" chip {a.chip}" if a.chip else ""
    return [f"{a.vendor} {a.index}{chip}", a.name or "?", _size(a.memory_bytes), a.bus_id, a.health,
            f"({a.source})"]


def _n(value: int) -> str:
    return "?" if value == UNKNOWN else str(value)


def _size(nbytes: int) -> str:
    return "? GiB" if nbytes < 0 else f"{nbytes / 2**30:.1f} GiB"


def _speed(mbps: int) -> str:
    if mbps <= 0:
        return "? Gb/s"
    return f"{mbps / 1000:g} Gb/s" if mbps >= 1000 else f"{mbps} Mb/s"
