"""Per-op records and counters: what ran, with which algorithm and why, and how long.

A collective's record holds the algorithm, the reason the selector gave (the
cost model's constants and every candidate's prediction, or the size rule),
the predicted seconds and, once it ends, the measured ones (`seconds`): so a
choice can be explained, and checked against what it cost.

Records keep `time.perf_counter()` times (monotonic, sub-microsecond) so durations
are exact; `to_dict` gives plain data for JSON, logs or a metrics scraper.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class OpRecord:
    op: str
    group: str
    seq: int
    nbytes: int
    algorithm: str
    reason: str
    transport: str
    started: float
    finished: float = 0.0
    ok: bool = False
    error: str = ""
    predicted: float = 0.0  # seconds the cost model predicted for `algorithm` (0: no prediction)

    @property
    def seconds(self) -> float:
        """The measured time of the op on this rank."""
        return self.finished - self.started


@dataclass
class OpCounter:
    calls: int = 0
    errors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    algorithms: dict[str, int] = field(default_factory=dict)


class Stats:
    """Counters per op kind and the most recent `keep` op records of one communicator."""

    def __init__(self, keep: int = 1024) -> None:
        self.records: deque[OpRecord] = deque(maxlen=keep)
        self.counters: dict[str, OpCounter] = {}
        self.links: dict[int, dict[str, str | int]] = {}  # group rank -> transport to it, and why

    def add(self, rec: OpRecord) -> None:
        self.records.append(rec)
        c = self.counters.setdefault(rec.op, OpCounter())
        c.calls += 1
        c.bytes += rec.nbytes
        c.seconds += rec.seconds
        c.algorithms[rec.algorithm] = c.algorithms.get(rec.algorithm, 0) + 1
        if not rec.ok:
            c.errors += 1

    def last(self, op: str | None = None) -> OpRecord | None:
        """The most recent record (of kind `op`, if given)."""
        for rec in reversed(self.records):
            if op is None or rec.op == op:
                return rec
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "links": {str(k): v for k, v in self.links.items()},
            "counters": {k: asdict(v) for k, v in self.counters.items()},
            "records": [asdict(r) for r in self.records],
        }
