"""Every rank's view of its host, gathered once when the world forms.

Algorithm choice and placement need to know which ranks share a host, a GPU
board or a NIC, and a rank can only see its own machine. So each rank discovers
its host (in a worker thread, while the mesh is still connecting) and the world
all-gathers the encoded views once at `init_process_group`: two small
collectives, after which `comm.topology` answers without further messages.
Each rank's link classes and host calibration travel with it, so the cost
model that picks algorithms is built from the same inputs on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from .cost import CostModel, cost_model_for, link_class
from .model import Topology

if TYPE_CHECKING:
    from ..group import Communicator


class ClusterView:
    """The gathered topology: `ranks[i]` is what group rank i saw on its host.

    `links[i][j]` is the cost class of the link from rank i to rank j (as rank i's
    transport to j: shm, tcp_loopback, tcp_remote, ...), and `calibrations[i]` rank
    i's host calibration (or None). Being gathered, they are the same on every rank,
    so the cost model built from them is too: every rank picks the same algorithm.
    """

    def __init__(self, ranks: list[Topology], links: list[dict[int, str]] | None = None,
                 calibrations: list[dict[str, Any] | None] | None = None) -> None:
        self.ranks = ranks
        self.links = links if links is not None else [{} for _ in ranks]
        self.calibrations = calibrations if calibrations is not None else [None for _ in ranks]

    def hosts(self) -> dict[str, list[int]]:
        """Host key -> the ranks on that host (equal keys can share memory), in rank order."""
        out: dict[str, list[int]] = {}
        for r, topo in enumerate(self.ranks):
            out.setdefault(topo.host.host_key, []).append(r)
        return out

    def same_host(self, a: int, b: int) -> bool:
        return self.ranks[a].host.host_key == self.ranks[b].host.host_key

    def subset(self, ranks: list[int]) -> ClusterView:
        """The view of a sub-group (`comm.split(ranks)`), renumbered like the group."""
        where = {old: new for new, old in enumerate(ranks)}
        links = [{where[j]: c for j, c in self.links[i].items() if j in where} for i in ranks]
        return ClusterView([self.ranks[r] for r in ranks], links, [self.calibrations[r] for r in ranks])

    def link_classes(self) -> list[str]:
        """Every link class used between members, seen from either end (sorted, once each)."""
        return sorted({c for row in self.links for c in row.values()})

    def cost_model(self, chunk_bytes: int) -> CostModel:
        """The group's cost model: its link classes, every member's calibration; identical on every rank."""
        return cost_model_for(self.link_classes(), self.calibrations, chunk_bytes=chunk_bytes)

    def summary(self) -> str:
        lines = []
        for key, ranks in self.hosts().items():
            t = self.ranks[ranks[0]]
            gpus = f", {len(t.gpus)} GPUs" if t.gpus else ""
            lines.append(f"{t.host.hostname} ({key}): ranks {ranks}, {t.host.logical_cpus} CPUs{gpus}, "
                         f"{sum(1 for n in t.nics if n.state == 'up')} NICs up, {len(t.rdma)} RDMA devices")
        return "\n".join(lines)

    def to_json(self) -> bytes:
        return msgspec.json.encode({"ranks": self.ranks, "links": self.links, "calibrations": self.calibrations})


class _RankView(msgspec.Struct):
    topology: Topology
    links: dict[int, str]
    calibration: dict[str, Any] | None


async def gather(comm: Communicator, local: Topology, calibration: dict[str, Any] | None = None) -> ClusterView:
    """All-gather every rank's host view, link classes and calibration (a collective on `comm`)."""
    links = {g: link_class(str(v["transport"]), str(v.get("link", ""))) for g, v in comm.peer_transports().items()}
    mine = msgspec.json.encode(_RankView(local, links, calibration))
    if comm.world_size == 1:
        return ClusterView([local], [links], [calibration])
    sizes = await comm.all_gather(np.array([len(mine)], dtype=np.int64))
    row = np.zeros(int(sizes.max()), dtype=np.uint8)
    row[: len(mine)] = np.frombuffer(mine, dtype=np.uint8)
    table = await comm.all_gather(row)
    decode = msgspec.json.Decoder(_RankView).decode
    views = [decode(bytes(table[r, : int(sizes[r, 0])])) for r in range(comm.world_size)]
    return ClusterView([v.topology for v in views], [v.links for v in views], [v.calibration for v in views])
