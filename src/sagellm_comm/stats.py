"""Per-op records and counters: what ran, with which algorithm and why, and how long.

A collective's record holds the algorithm, the reason the selector gave (the
cost model's constants and every candidate's prediction, or the size rule),
the predicted seconds and, once it ends, the measured ones (`seconds`): so a
choice can be explained, and checked against what it cost.

Records keep `time.perf_counter()` times (monotonic, sub-microsecond) so durations
are exact; `to_dict` gives plain data for JSON, logs or a metrics scraper.
`queued` is when the caller asked for the op, `started` when it began to run:
the gap is time spent waiting (for a device lane to open, say), which a trace
(`sagellm_comm.trace`) shows apart from the op itself.

Every finished op passes through `Stats.add`, so that is where a process-wide
trace taps in (`Stats.tap`, None unless tracing: one attribute check per op) and
where the per-op DEBUG line of the "sagellm_comm.ops" logger is written.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

_ops_log = logging.getLogger("sagellm_comm.ops")


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
    queued: float = 0.0  # when the op was called, before waiting for anything (0: not known; as `started`)

    @property
    def seconds(self) -> float:
        """The measured time of the op on this rank."""
        return self.finished - self.started

    @property
    def queued_seconds(self) -> float:
        """How long the op waited between being called and starting to run."""
        return max(0.0, self.started - self.queued) if self.queued else 0.0


@dataclass
class OpCounter:
    calls: int = 0
    errors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    algorithms: dict[str, int] = field(default_factory=dict)


class Stats:
    """Counters per op kind and the most recent `keep` op records of one communicator.

    `rank` is the world rank of the communicator's process (-1: not known) and
    `group` its group id: the labels a trace or a metrics scrape needs.
    """

    tap: ClassVar[Callable[[Stats, OpRecord], None] | None] = None  # set by sagellm_comm.trace while tracing
    live: ClassVar[weakref.WeakSet[Stats]] = weakref.WeakSet()  # every Stats in the process, for a scrape

    def __init__(self, keep: int = 1024, *, rank: int = -1, group: str = "") -> None:
        self.rank = rank
        self.group = group
        self.records: deque[OpRecord] = deque(maxlen=keep)
        self.counters: dict[str, OpCounter] = {}
        self.by_algorithm: dict[tuple[str, str], OpCounter] = {}  # (op, algorithm) -> its own counts
        self.links: dict[int, dict[str, str | int]] = {}  # group rank -> transport to it, and why
        Stats.live.add(self)

    def add(self, rec: OpRecord) -> None:
        self.records.append(rec)
        c = self.counters.setdefault(rec.op, OpCounter())
        c.calls += 1
        c.bytes += rec.nbytes
        c.seconds += rec.seconds
        c.algorithms[rec.algorithm] = c.algorithms.get(rec.algorithm, 0) + 1
        a = self.by_algorithm.get((rec.op, rec.algorithm))
        if a is None:
            a = self.by_algorithm[rec.op, rec.algorithm] = OpCounter()
        a.calls += 1
        a.bytes += rec.nbytes
        a.seconds += rec.seconds
        if not rec.ok:
            c.errors += 1
            a.errors += 1
        if Stats.tap is not None:
            Stats.tap(self, rec)
        if _ops_log.isEnabledFor(logging.DEBUG):
            _ops_log.debug("rank %d %s group=%s seq=%d bytes=%d algorithm=%s transport=%s %.1f us%s",
                           self.rank, rec.op, rec.group, rec.seq, rec.nbytes, rec.algorithm, rec.transport,
                           rec.seconds * 1e6, "" if rec.ok else f" error={rec.error}")

    def last(self, op: str | None = None) -> OpRecord | None:
        """The most recent record (of kind `op`, if given)."""
        for rec in reversed(self.records):
            if op is None or rec.op == op:
                return rec
        return None

    def prometheus(self, labels: dict[str, str] | None = None) -> str:
        """These counters in Prometheus text format (`sagellm_comm.metrics`); `labels` go on every sample."""
        from .metrics import prometheus_text

        return prometheus_text([self], labels=labels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "links": {str(k): v for k, v in self.links.items()},
            "counters": {k: asdict(v) for k, v in self.counters.items()},
            "records": [asdict(r) for r in self.records],
        }
