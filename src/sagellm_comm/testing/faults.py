"""Fault plans for simulated worlds: slow ranks, dead ranks, cut links.

Faults are keyed by a rank's op count (every collective, send and recv counts
one, starting at 0), so a test can say "rank 2 dies at its 3rd op" and get the
same failure every run. Faults act on the in-process links the way real faults
act on sockets: a killed rank's links reset (peers see it at once); a cut link
silently swallows bytes (only heartbeats can notice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CommError


class RankKilled(CommError):
    """Raised on a rank that a FaultPlan killed; its peers see it as a lost peer."""


@dataclass
class FaultPlan:
    """What goes wrong, and when. Build it with the chaining methods."""

    delays: dict[int, float] = field(default_factory=dict)
    kills: dict[int, int] = field(default_factory=dict)
    cuts: list[tuple[int, int, int]] = field(default_factory=list)

    def delay(self, rank: int, seconds: float) -> FaultPlan:
        """Every message `rank` sends arrives `seconds` late (a slow rank or link)."""
        self.delays[rank] = seconds
        return self

    def kill(self, rank: int, at_op: int = 0) -> FaultPlan:
        """`rank` dies (its connections reset) when it starts its op number `at_op`."""
        self.kills[rank] = at_op
        return self

    def drop_link(self, a: int, b: int, at_op: int = 0) -> FaultPlan:
        """The link between ranks `a` and `b` goes dead, silently, when `a` starts op `at_op`."""
        self.cuts.append((a, b, at_op))
        return self
