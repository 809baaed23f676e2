"""Per-group order: sequence numbers, fingerprints, and the broken state.

Every collective of a group takes the next sequence number at call time, on every
rank, so ranks that call collectives in the same order name each one the same way.
Frames carry the collective's `Fingerprint`; a receiver compares it with its own
for that sequence number, and a difference is a `CollectiveMismatch` on every rank.
Once any collective of a group fails (mismatch, abort, lost peer, timeout,
cancellation), the group is broken: its later collectives raise at once with the
original reason instead of waiting on ranks that will never answer.
"""

from __future__ import annotations

from ..errors import CollectiveAborted, CollectiveMismatch, CommError, restate
from ..wire import Fingerprint


class GroupState:
    """What one rank knows about one group (the world, or a `split` of it)."""

    def __init__(self, group_id: str, members: list[int], my_rank: int) -> None:
        self.group_id = group_id
        self.members = members  # global ranks, in group-rank order
        self.rank = my_rank  # this process's rank inside the group
        self.next_seq = 0
        self.active: dict[int, Fingerprint] = {}
        self.broken: CommError | None = None

    @property
    def size(self) -> int:
        return len(self.members)

    def begin(self, kind: str, dtype: str, shape: tuple[int, ...], root: int = -1, op: str = "") -> Fingerprint:
        """Take the next sequence number for a collective and mark it in flight."""
        self.raise_if_broken()
        fp = Fingerprint(self.next_seq, kind, dtype, shape, root, op)
        self.next_seq += 1
        self.active[fp.seq] = fp
        return fp

    def end(self, fp: Fingerprint) -> None:
        self.active.pop(fp.seq, None)

    def is_stale(self, seq: int) -> bool:
        """A frame for `seq` can no longer be used: that collective ended here, or the group broke."""
        return self.broken is not None or (seq < self.next_seq and seq not in self.active)

    def raise_if_broken(self) -> None:
        if self.broken is not None:
            err = self.broken
            raise restate(err, f"{err} (group {self.group_id!r} is broken: "
                               f"rebuild it with comm.split(...) or a new init_process_group)")

    def mismatch_error(self, mine: Fingerprint, theirs: Fingerprint, their_rank: int) -> CollectiveMismatch:
        fields = ", ".join(mine.diff(theirs))
        return CollectiveMismatch(
            f"collective mismatch in group {self.group_id!r} ({fields} differ): "
            f"rank {self.rank} called {mine.describe()}, rank {their_rank} called {theirs.describe()}"
        )

    def break_(self, error: CommError) -> bool:
        """Mark the group broken; True if this call broke it (so the caller tells peers)."""
        if self.broken is not None:
            return False
        self.broken = error
        return True


def aborted(group_id: str, fp: Fingerprint, rank: int, why: str) -> CollectiveAborted:
    return CollectiveAborted(f"{fp.describe()} in group {group_id!r} was aborted by rank {rank}: {why}")

