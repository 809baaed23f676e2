"""Op records as a Chrome trace (the JSON "traceEvents" format ui.perfetto.dev and chrome://tracing open).

Why a trace: counters say how much time went to communication, a timeline says
when, on which rank and group, and what waited for what: a slow rank or a
collective that started late shows at a glance. Each op is one complete event
(pid = world rank, one track per group), with its wait before starting (a
device lane opening) as a "queued" slice right before it.

Records hold `perf_counter` times, which mean nothing outside their process.
Each document therefore stores event times as microseconds after
`otherData.origin_unix_us`, a wall-clock instant got from one reading of
`time.time()` against `perf_counter` in the writing process; `merge_traces`
shifts every file onto the earliest origin, so ranks of several processes (on
one host, or hosts whose clocks NTP keeps close) share one timeline.

`Stats` keeps only the last 1024 records of a communicator; `start`/`recording`
capture every op of every communicator of the process from then on, through
`Stats.tap` (None while nobody traces, so an untraced op pays one attribute
check). `SAGELLM_COMM_TRACE=PATH` does the same from the environment: each
world communicator's rank writes its file when it closes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from .stats import OpRecord, Stats

ENV = "SAGELLM_COMM_TRACE"

__all__ = ["ENV", "Recorder", "document", "env_path", "follow_env", "merge_traces", "recording", "start", "stop",
           "write_trace"]


class _HasStats(Protocol):
    @property
    def stats(self) -> Stats: ...


# a Stats, a Communicator, {world rank: records or Stats}, or several Stats/Communicators
Source: TypeAlias = "Stats | _HasStats | Mapping[int, Iterable[OpRecord] | Stats] | Iterable[Stats | _HasStats]"


def clock_anchor() -> tuple[float, float]:
    """(time.time(), perf_counter()) at one instant: the pair of readings closest together of a few."""
    best = (math.inf, 0.0, 0.0)
    for _ in range(5):
        a = time.perf_counter()
        wall = time.time()
        b = time.perf_counter()
        if b - a < best[0]:
            best = (b - a, wall, (a + b) / 2)
    return best[1], best[2]


def _by_rank(source: Source) -> dict[int, list[OpRecord]]:
    """Records per world rank from a Stats, a Communicator, {rank: records or Stats}, or a list of those."""
    if isinstance(source, Stats):
        return {source.rank: list(source.records)}
    if isinstance(source, Mapping):
        return {int(r): list(v.records if isinstance(v, Stats) else v) for r, v in source.items()}
    own = getattr(source, "stats", None)
    if isinstance(own, Stats):
        return _by_rank(own)
    out: dict[int, list[OpRecord]] = {}
    items: Iterable[Any] = source  # type: ignore[assignment]
    for item in items:
        st = item if isinstance(item, Stats) else getattr(item, "stats", None)
        if not isinstance(st, Stats):
            raise TypeError(f"cannot trace a {type(item).__name__}: give Stats, communicators or records by rank")
        out.setdefault(st.rank, []).extend(st.records)
    return out


def _lanes(records: list[OpRecord]) -> list[tuple[OpRecord, str]]:
    """Each record with the track it goes on: its group, or "group [k]" where ops of one group overlap.

    Ops of one group may run at once (concurrent collectives, a send beside a receive); one
    track per group would then hold slices that cross, which trace viewers cannot nest.
    """
    ends: dict[str, list[float]] = {}
    out = []
    for rec in sorted(records, key=lambda r: (r.queued or r.started, r.started)):
        begin = rec.queued or rec.started
        lanes = ends.setdefault(rec.group, [])
        k = next((i for i, end in enumerate(lanes) if end <= begin), len(lanes))
        if k == len(lanes):
            lanes.append(rec.finished)
        else:
            lanes[k] = rec.finished
        out.append((rec, rec.group if k == 0 else f"{rec.group} [{k + 1}]"))
    return out


def document(source: Source, *, anchor: tuple[float, float] | None = None) -> dict[str, Any]:
    """The trace document of `source`'s records (see `_by_rank` for what `source` may be).

    `anchor`: (time.time(), perf_counter()) at one instant in the process the records come
    from; default: now, in this one."""
    wall, perf = anchor or clock_anchor()
    by_rank = _by_rank(source)
    firsts = [r.queued or r.started for recs in by_rank.values() for r in recs]
    # Unix µs are ~1.7e15, where a float steps by 0.25: keep the big integer part apart from the small rest
    whole = math.floor(wall * 1e6)
    frac = wall * 1e6 - whole
    first = math.floor((min(firsts) - perf) * 1e6 + frac) if firsts else 0
    origin = whole + first

    def us(t: float) -> float:
        return round((t - perf) * 1e6 + frac - first, 3)

    events: list[dict[str, Any]] = []
    for rank in sorted(by_rank):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        tids: dict[str, int] = {}
        for rec, track in _lanes(by_rank[rank]):
            tid = tids.get(track)
            if tid is None:
                tid = tids[track] = len(tids) + 1
                events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": track}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid,
                               "args": {"sort_index": tid}})
            if rec.queued and rec.queued < rec.started:
                events.append({"ph": "X", "name": "queued", "cat": "queue", "pid": rank, "tid": tid,
                               "ts": us(rec.queued), "dur": round((rec.started - rec.queued) * 1e6, 3),
                               "args": {"op": rec.op, "seq": rec.seq}})
            events.append({"ph": "X", "name": rec.op, "cat": "op", "pid": rank, "tid": tid,
                           "ts": us(rec.started), "dur": round(max(0.0, rec.seconds) * 1e6, 3),
                           "args": {"bytes": rec.nbytes, "algorithm": rec.algorithm, "transport": rec.transport,
                                    "reason": rec.reason, "predicted_us": round(rec.predicted * 1e6, 3),
                                    "queued_us": round(rec.queued_seconds * 1e6, 3), "seq": rec.seq,
                                    "group": rec.group, "ok": rec.ok, "error": rec.error}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "sagellm_comm", "origin_unix_us": origin, "ranks": sorted(by_rank)}}


def _dump(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    tmp.replace(p)  # a reader (the merging parent) never sees half a file


def write_trace(path: str | os.PathLike[str], source: Source, *, anchor: tuple[float, float] | None = None
                ) -> dict[str, Any]:
    """Write `source`'s records to `path` as a trace (`document`); returns the document."""
    doc = document(source, anchor=anchor)
    _dump(path, doc)
    return doc


def merge_traces(paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None
                 ) -> dict[str, Any]:
    """One timeline from traces written by `write_trace` (one per rank or process); written to `out` if given.

    Times move onto the earliest origin; tracks are matched by (rank, track name), so two
    files of the same rank (process sets run one after the other) share its tracks."""
    names = [str(p) for p in paths]
    docs = [json.loads(Path(p).read_text()) for p in names]
    for p, d in zip(names, docs, strict=True):
        if not isinstance(d, dict) or "origin_unix_us" not in d.get("otherData", {}):
            raise ValueError(f"{p} was not written by sagellm_comm.trace (no otherData.origin_unix_us)")
    origins = [int(d["otherData"]["origin_unix_us"]) for d in docs]
    origin = min(origins, default=0)
    tids: dict[tuple[int, str], int] = {}
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    ranks: set[int] = set()
    for d, o in zip(docs, origins, strict=True):
        local: dict[tuple[int, int], int] = {}  # (pid, tid in this file) -> merged tid
        for e in d["traceEvents"]:
            if e.get("ph") == "M" and e.get("name") == "thread_name":
                key = (e["pid"], str(e["args"]["name"]))
                local[e["pid"], e["tid"]] = tids.setdefault(key, sum(1 for k in tids if k[0] == e["pid"]) + 1)
        for e in d["traceEvents"]:
            e = dict(e)
            ranks.add(e["pid"])
            if e.get("ph") != "M" or e.get("tid", 0):
                e["tid"] = local.get((e["pid"], e["tid"]), e["tid"])
            if e.get("ph") == "M":
                if e["name"] == "thread_sort_index":
                    e["args"] = {"sort_index": e["tid"]}
                dup = json.dumps(e, sort_keys=True)
                if dup in seen:
                    continue
                seen.add(dup)
            elif "ts" in e:
                e["ts"] = round(e["ts"] + (o - origin), 3)
            events.append(e)
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"producer": "sagellm_comm", "origin_unix_us": origin, "ranks": sorted(ranks)}}
    if out is not None:
        _dump(out, doc)
    return doc


class Recorder:
    """Every op record of the process while it is attached (records of every rank living here)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = path
        self.records: dict[int, list[OpRecord]] = {}
        self.anchor = clock_anchor()

    def add(self, stats: Stats, rec: OpRecord) -> None:
        self.records.setdefault(stats.rank, []).append(rec)

    def document(self, ranks: Iterable[int] | None = None) -> dict[str, Any]:
        """The trace of what was recorded (of `ranks` only, if given)."""
        keep = set(self.records) if ranks is None else set(ranks)
        return document({r: list(v) for r, v in self.records.items() if r in keep}, anchor=self.anchor)

    def write(self, path: str | os.PathLike[str] | None = None, ranks: Iterable[int] | None = None
              ) -> dict[str, Any]:
        doc = self.document(ranks)
        target = path if path is not None else self.path
        if target is not None:
            _dump(target, doc)
        return doc


_lock = threading.Lock()
_active: list[Recorder] = []  # attached recorders; Stats.tap feeds them while there are any
_started: list[Recorder] = []  # those of `start`, for `stop`
_env: tuple[str, Recorder] | None = None  # SAGELLM_COMM_TRACE's path and its recorder


def _tap(stats: Stats, rec: OpRecord) -> None:
    for r in _active:
        r.add(stats, rec)


def _attach(r: Recorder) -> None:
    with _lock:
        _active.append(r)
        Stats.tap = _tap


def _detach(r: Recorder) -> None:
    with _lock:
        if r in _active:
            _active.remove(r)
        if not _active:
            Stats.tap = None


def start(path: str | os.PathLike[str] | None = None) -> Recorder:
    """Record every op of every communicator in this process from now until `stop()`."""
    r = Recorder(path)
    _attach(r)
    _started.append(r)
    return r


def stop() -> dict[str, Any] | None:
    """End the latest `start`: write its file (if it was given a path) and return the trace; None if none runs."""
    if not _started:
        return None
    r = _started.pop()
    _detach(r)
    return r.write()


@contextlib.contextmanager
def recording(path: str | os.PathLike[str] | None = None) -> Iterator[Recorder]:
    """`with recording("trace.json"):` every op inside goes to the file when the block ends."""
    r = Recorder(path)
    _attach(r)
    try:
        yield r
    finally:
        _detach(r)
        r.write()


def env_path(path: str, rank: int) -> str:
    """Where rank `rank` writes SAGELLM_COMM_TRACE=`path`: "{rank}"/"{pid}" filled in, else ".rankN" before
    the suffix (trace.json -> trace.rank0.json)."""
    if "{rank}" in path or "{pid}" in path:
        return path.replace("{rank}", str(rank)).replace("{pid}", str(os.getpid()))
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.json'}"))


def follow_env() -> None:
    """Start, change or end the recorder of SAGELLM_COMM_TRACE to match the environment (at each world
    communicator's creation; a benchmark calls it once it has put the variable back)."""
    global _env
    path = os.environ.get(ENV, "")
    if _env is not None and _env[0] == path:
        return
    if _env is not None:
        _detach(_env[1])
        _env = None
    if path:
        r = Recorder(path)
        _attach(r)
        _env = (path, r)


def rank_closed(rank: int) -> None:
    """A world communicator closed: under SAGELLM_COMM_TRACE, write that rank's file (all its ops so far)."""
    if _env is not None and rank >= 0:
        path, r = _env
        r.write(env_path(path, rank), ranks=[rank])
