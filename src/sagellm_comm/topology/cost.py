"""The cost model: predicted seconds of each collective algorithm, from measured link and compute costs.

Pieces (all in seconds, sizes in bytes), measured by `topology.calibrate`:

- per link class, the **one-way** time S(m) of an m-byte message (ping-pong / 2),
  and the **exchange** time X(m): both ends send m bytes to each other at once,
  as every step of recursive doubling, of the ring and of the direct algorithms
  does, back to back as a loop of collectives runs. With one core per rank an
  exchange costs each rank the copy out and the copy in, so X is not S: about
  2x S from 1 MiB up on this box, and less than S below 4 KiB, where the two
  sides' latencies overlap;
- per link class and algorithm, a **base** F: what the algorithm costs beyond its
  messages and reductions (Python per call: fingerprint, stats record, context,
  deadline, the ring's and the tree's background sender, the wake-ups between
  dependent steps). It is measured by running the algorithm at its smallest
  size and subtracting what the curves give its messages, like NCCL's
  per-algorithm base latencies. It can come out a little negative: back-to-back
  calls overlap one call's latency with the next call's work more than the
  p2p probe's loop does;
- per host, the in-place **reduction** R(m) (`reduce_into`, float32 sum) and a
  **copy** K(m); and, where no base was measured, a generic fixed cost per call
  (a barrier minus an empty exchange) plus the background sender's.

Each curve is `alpha + beta * m`, **piecewise**: a few size bands, each with its
own alpha (latency) and beta (inverse bandwidth), joined so that the curve is
continuous in m and never decreases. One line cannot fit the measured
point-to-point curves from 4 B to 64 MiB: below 64 KiB the time is flat (Python
per message), from 64 KiB to 1 MiB the per-step hand-overs amortize, and above
the shared-memory ring (4 MiB) and the last-level cache (16-32 MiB) the cost
per byte grows again (DRAM); the best single alpha/beta pair misses the middle
sizes by 20-40 %. `fit_curve` starts from one line and adds a bend at a
measured size only where that brings the points within a few percent.

The group's links: the **slowest link class governs** every step. A ring step
or a tree level ends when its slowest transfer ends, and in a ring every rank
waits on its left neighbour, so one slow link paces the whole ring; recursive
doubling's rounds cross every pair distance, and across hosts its later rounds
all cross the slow links. "Slowest" is a fixed order (inproc < shm < ucx <
tcp_loopback < tcp_remote, `group_class`), not a comparison of curves, so that
every rank names the same class from its own links alone. Where several
calibrations of that class were gathered (one per host), S and X are their
pointwise maximum and F the largest base.

What each algorithm costs, p ranks, n bytes as the selector sees them, b = n/p,
k = ceil(b / chunk_bytes) chunks per ring step (`collectives.context.chunk_count`);
a span of W bytes moved in k chunks costs X(W) + (k-1) X(0) (chunks of a big
buffer run at that buffer's speed, plus one more message latency per chunk):

    all_reduce  recursive_doubling  F + log2(q) (X(n) + R(n)) [+ 2 S(n) + R(n) if p != q], q = 2^floor(log2 p)
    all_reduce  ring                F + 2(p-1) Xk(b) + (p-1) Rk(b)
    all_gather  direct              F + K(b) + (p-1) X(b)
    all_gather  ring                F + K(b) + (p-1) Xk(b)
    reduce_scatter direct           F + K(b) + (p-1) (X(b) + R(b))
    reduce_scatter ring             F + K(n) + (p-1) (Xk(b) + Rk(b)) + K(b)
    broadcast   binomial_tree       F + d Sk(n) + (d-1) S(n/kn) + S(0) + (d-1) X(0), d = ceil(log2 p)
    all_to_all  pairwise            F + K(b) + (p-1) X(b)
    barrier     dissemination       F + ceil(log2 p) X(0)

Everything a rank does runs on its one event-loop thread, so its sends,
receives, copies and reductions add up: the model sums them (what overlaps
across ranks is inside X). Validated on 2 ranks only (this box has 2 cores);
for more ranks on more cores the formulas are the algorithms' step counts, not
measurements. `sagellm-comm bench cost-model` reports the error.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, NamedTuple

LINK_CLASSES = ("inproc", "shm", "ucx", "tcp_loopback", "tcp_remote")  # fastest to slowest: see group_class
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # = group.DEFAULT_CHUNK_BYTES (not imported: group imports us)

ALGORITHMS: dict[str, tuple[str, ...]] = {  # the candidates per op, in tie-break order
    "all_reduce": ("recursive_doubling", "ring"),
    "all_gather": ("direct", "ring"),
    "reduce_scatter": ("direct", "ring"),
    "broadcast": ("binomial_tree",),
    "all_to_all": ("pairwise",),
    "barrier": ("dissemination",),
}

Band = tuple[int, float, float]  # (from this many bytes, alpha seconds, beta seconds per byte)


# -- curves ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    """t(m) = alpha_i + beta_i * m for m in band i; bands ascend from 0 and join continuously."""

    bands: tuple[Band, ...]

    def __post_init__(self) -> None:
        if not self.bands or self.bands[0][0] != 0:
            raise ValueError(f"a curve's first band starts at 0 bytes, got {self.bands!r}")
        if any(b[0] >= a[0] for b, a in zip(self.bands, self.bands[1:], strict=False)):
            raise ValueError(f"a curve's bands must ascend, got {self.bands!r}")

    @classmethod
    def line(cls, alpha: float, beta: float) -> Curve:
        return cls(((0, float(alpha), float(beta)),))

    def band(self, m: float) -> Band:
        found = self.bands[0]
        for b in self.bands[1:]:
            if m < b[0]:
                break
            found = b
        return found

    def __call__(self, m: float) -> float:
        _, alpha, beta = self.band(m)
        return alpha + beta * m

    @property
    def alpha(self) -> float:
        """The latency: the first band's intercept (the time of an empty message)."""
        return self.bands[0][1]

    @property
    def beta(self) -> float:
        """The last band's inverse bandwidth (seconds per byte of large messages)."""
        return self.bands[-1][2]

    def to_json(self) -> list[list[float]]:
        return [[lo, a, b] for lo, a, b in self.bands]

    @classmethod
    def from_json(cls, data: Sequence[Sequence[float]]) -> Curve:
        return cls(tuple((int(lo), float(a), float(b)) for lo, a, b in data))


def _nnls(a: Any, y: Any) -> Any:
    """min |a x - y| subject to x >= 0, for a handful of columns: the best feasible solution over
    every set of columns held at zero (exact for the few parameters a curve has)."""
    import numpy as np

    cols = a.shape[1]
    best, best_sse = np.zeros(cols), float(np.dot(y, y))
    for mask in range(1, 1 << cols):
        free = [j for j in range(cols) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(a[:, free], y, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(cols)
        x[free] = sol
        r = a @ x - y
        sse = float(np.dot(r, r))
        if sse < best_sse * (1 - 1e-12):
            best, best_sse = x, sse
    return best


def _fit_knots(points: Sequence[tuple[float, float]], knots: Sequence[int]) -> tuple[Curve, list[float]]:
    """Least squares in relative error of a continuous piecewise-linear curve with bends at `knots`.

    Parameters: the time at 0 bytes and each band's slope, all >= 0, so the curve
    never decreases (non-negative least squares).
    """
    import numpy as np

    ns = np.array([p[0] for p in points], dtype=np.float64)
    ts = np.array([p[1] for p in points], dtype=np.float64)
    edges = [0.0, *map(float, knots)]
    cols = [np.ones_like(ns)]
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else np.inf
        cols.append(np.clip(ns - lo, 0.0, hi - lo))  # the part of [0, n] inside band i
    a = np.stack(cols, axis=1) / ts[:, None]  # rows scaled by 1/t: residuals are relative errors
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef = _nnls(a / scale, np.ones_like(ts)) / scale
    value = float(coef[0])
    bands: list[Band] = []
    for i, lo in enumerate(edges):
        slope = float(coef[i + 1])
        bands.append((int(lo), value - slope * lo, slope))
        if i + 1 < len(edges):
            value += slope * (edges[i + 1] - lo)
    curve = Curve(tuple(bands))
    return curve, [curve(n) / t - 1.0 for n, t in points]


def fit_curve(points: Iterable[tuple[float, float]], *, max_bands: int = 4, tolerance: float = 0.05,
              min_knot: int = 64 * 1024) -> tuple[Curve, list[float]]:
    """Fit (bytes, seconds) points with the fewest bands that bring every point within `tolerance`.

    Start with one line (alpha, beta); while some point is off by more than
    `tolerance` and bands are left, add the bend (at a measured size from
    `min_knot` up, inside the range) that lowers the squared relative error
    most, if it lowers it by a tenth at least. Every band's beta is >= 0.
    Returns the curve and each point's relative error (predicted / measured - 1).
    Points on one line give back that line, one band.
    """
    raw = sorted((float(n), float(t)) for n, t in points)
    if not raw:
        raise ValueError("no points to fit")
    if any(t <= 0 for _, t in raw):
        raise ValueError("times must be positive")
    # a running median of 3 over the sizes first: one outlying size (a burst of load, a lucky
    # phase of the two processes) must not bend the bands of its neighbours; points on a
    # non-decreasing curve pass through unchanged
    pts = [raw[0], *((raw[i][0], sorted(t for _, t in raw[i - 1 : i + 2])[1]) for i in range(1, len(raw) - 1)),
           raw[-1]] if len(raw) > 2 else raw
    best = _fit_knots(pts, [])
    knots: list[int] = []
    candidates = sorted({int(n) for n, _ in pts[1:-1] if n >= min_knot})
    while len(knots) + 1 < max_bands and max(abs(e) for e in best[1]) > tolerance:
        trial: tuple[float, int, tuple[Curve, list[float]]] | None = None
        for k in candidates:
            if k in knots:
                continue
            fit = _fit_knots(pts, sorted([*knots, k]))
            sse = sum(e * e for e in fit[1])
            if trial is None or sse < trial[0]:
                trial = (sse, k, fit)
        if trial is None or trial[0] >= 0.9 * sum(e * e for e in best[1]):
            break
        knots = sorted([*knots, trial[1]])
        best = trial[2]
    curve = best[0]
    return curve, [curve(n) / t - 1.0 for n, t in raw]  # errors against the measured points


# -- links and the model ---------------------------------------------------------------------
@dataclass(frozen=True)
class LinkCost:
    """One link class: one-way S(m) and exchange X(m) curves, and each algorithm's fixed cost over it.

    `base` maps "op/algorithm" to the seconds that algorithm costs beyond its
    messages and reductions (Python per call: fingerprint, record, context,
    the background sender, the wake-ups between dependent steps), measured by
    running it at the smallest size over this class (like NCCL's per-algorithm
    base latencies). Missing: the model's generic call (+ sender) cost.
    """

    name: str
    oneway: Curve
    exchange: Curve
    base: tuple[tuple[str, float], ...] = ()

    @property
    def alpha(self) -> float:
        return self.oneway.alpha

    @property
    def beta(self) -> float:
        return self.oneway.beta

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"oneway": self.oneway.to_json(), "exchange": self.exchange.to_json()}
        if self.base:
            out["base"] = dict(self.base)
        return out

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> LinkCost:
        base = tuple(sorted((str(k), float(v)) for k, v in data.get("base", {}).items()))
        return cls(name, Curve.from_json(data["oneway"]), Curve.from_json(data["exchange"]), base)


class Choice(NamedTuple):
    """What the selector returns: the algorithm, why, and its predicted seconds (0: no prediction)."""

    algorithm: str
    reason: str
    predicted: float = 0.0


def _fmt_s(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _ceil_log2(p: int) -> int:
    return max(0, (p - 1).bit_length())


def _chunks(m: float, chunk: int) -> int:
    return max(1, math.ceil(m / max(1, chunk)))


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds per (op, algorithm, bytes, world size), and the argmin choice.

    Frozen and hashable (its hash is computed once), so it can key caches;
    `choose` also memoizes in the instance. Identical models give identical
    choices on every rank: predictions are plain float arithmetic in a fixed
    order, and ties go to the first candidate of `ALGORITHMS`.
    """

    links: tuple[LinkCost, ...]
    reduce: Curve
    copy: Curve
    call: float  # fixed seconds of one collective call, beyond its messages
    sender: float  # fixed seconds of the background sender that ring and tree pipeline through
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    source: str = "defaults"
    force: tuple[tuple[str, str], ...] = ()  # (op, algorithm): choose that, whatever the prediction
    # the fit sections it was built from (canonical JSON), so that a sub-group's model can be rebuilt
    calibrations: tuple[str, ...] = field(default=(), compare=False, hash=False, repr=False)
    _memo: dict[tuple[str, int, int], Choice] = field(default_factory=dict, compare=False, hash=False,
                                                      repr=False)

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.links, self.reduce, self.copy, self.call, self.sender, self.chunk_bytes, self.source,
                      self.force))
            object.__setattr__(self, "_hash", h)
        return int(h)

    # -- derived ----------------------------------------------------------------------------
    @property
    def link_names(self) -> tuple[str, ...]:
        return tuple(sorted({link.name for link in self.links}))

    def with_chunk_bytes(self, chunk_bytes: int) -> CostModel:
        return self if chunk_bytes == self.chunk_bytes else replace(self, chunk_bytes=chunk_bytes, _memo={})

    def for_links(self, link_classes: Iterable[str]) -> CostModel:
        """The same calibrations (or defaults) and forcing, for a group whose links are of `link_classes`."""
        fits = [json.loads(c) for c in self.calibrations]
        model = cost_model_for(list(link_classes), fits, chunk_bytes=self.chunk_bytes)
        return replace(model, force=self.force, _memo={}) if self.force else model

    def forcing(self, op: str, algorithm: str) -> CostModel:
        """This model, except that `op` always runs `algorithm` (benchmarks measure the alternative so)."""
        if algorithm not in ALGORITHMS.get(op, ()):
            raise ValueError(f"{op} has no algorithm {algorithm!r}; it has {ALGORITHMS.get(op)}")
        force = tuple(sorted({*((o, a) for o, a in self.force if o != op), (op, algorithm)}))
        return replace(self, force=force, _memo={})

    def governing(self, m: float, *, exchange: bool = True) -> LinkCost | None:
        """The link class whose transfer of `m` bytes takes longest (None: no links)."""
        best: LinkCost | None = None
        worst = -1.0
        for link in self.links:
            t = (link.exchange if exchange else link.oneway)(m)
            if t > worst:
                best, worst = link, t
        return best

    def S(self, m: float) -> float:
        """One-way seconds of an m-byte message over the group's slowest link."""
        return max((link.oneway(m) for link in self.links), default=0.0)

    def X(self, m: float) -> float:
        """Seconds of an m-byte exchange (send m, receive m at once) over the slowest link."""
        return max((link.exchange(m) for link in self.links), default=0.0)

    def fixed(self, op: str, algorithm: str) -> float:
        """Seconds of `algorithm` beyond its messages: the slowest link class's measured base, else
        the generic call cost (plus the background sender for the ring and the tree)."""
        key = f"{op}/{algorithm}"
        found = [dict(link.base)[key] for link in self.links if any(k == key for k, _ in link.base)]
        if found:
            return max(found)
        return self.call + (self.sender if algorithm in ("ring", "binomial_tree") else 0.0)

    # -- predictions ------------------------------------------------------------------------
    def predict(self, op: str, algorithm: str, nbytes: int, world_size: int) -> float:
        """Predicted seconds of one call as rank 0 sees it.

        nbytes is what the selector gets: all_reduce and broadcast the buffer,
        all_gather the gathered output (p blocks), reduce_scatter and all_to_all
        the input (p blocks).

        A span of W bytes moved in k chunks (ring steps, tree) costs X(W) + (k-1) X(0):
        the bandwidth of a W-byte transfer (chunks of a large buffer run at the speed of
        that buffer's working set, not at the speed of one cache-warm chunk measured
        alone) plus one more message latency per extra chunk. Reductions alike.
        """
        p, n = int(world_size), float(nbytes)
        if p <= 1:
            return 0.0
        X, S, R, K = self.X, self.S, self.reduce, self.copy
        c, F = self.chunk_bytes, self.fixed(op, algorithm)
        b = n / p  # one rank's block or segment
        k = _chunks(b, c)  # chunks per block (ring)

        def xs(w: float, chunks: int) -> float:  # w bytes exchanged in `chunks` messages
            return X(w) + (chunks - 1) * X(0)

        def rs(w: float, chunks: int) -> float:  # w bytes reduced in `chunks` calls
            return R(w) + (chunks - 1) * R(0)

        if op == "all_reduce" and algorithm == "recursive_doubling":
            # log2(pof2) exchange rounds of the whole buffer, each followed by a reduction;
            # ranks beyond the power of two fold into a partner first and get the result back
            pof2 = 1 << (p.bit_length() - 1)
            rounds = pof2.bit_length() - 1
            t = F + rounds * (X(n) + R(n))
            if p > pof2:
                t += 2 * S(n) + R(n)
            return t
        if op == "all_reduce" and algorithm == "ring":
            # reduce-scatter then all-gather: 2(p-1) steps of one segment, each an exchange
            # (send right, receive left) in k pipelined chunks; p-1 of them are reduced
            return F + 2 * (p - 1) * xs(b, k) + (p - 1) * rs(b, k)
        if op == "all_gather" and algorithm == "direct":
            # own block copied into the output, then p-1 sends of it while the peers' blocks arrive
            return F + K(b) + (p - 1) * X(b)
        if op == "all_gather" and algorithm == "ring":
            # own block copied, then p-1 ring steps of one block in k pipelined chunks
            return F + K(b) + (p - 1) * xs(b, k)
        if op == "reduce_scatter" and algorithm == "direct":
            # own block copied to the output, p-1 blocks exchanged and reduced into it
            return F + K(b) + (p - 1) * (X(b) + R(b))
        if op == "reduce_scatter" and algorithm == "ring":
            # the input copied to scratch (the ring reduces in place), p-1 ring steps with
            # reductions, then this rank's segment copied out
            return F + K(n) + (p - 1) * (xs(b, k) + rs(b, k)) + K(b)
        if op == "broadcast" and algorithm == "binomial_tree":
            # the root sends the buffer in kn chunks to each of its ceil(log2 p) children; the
            # last chunk then descends the remaining levels; then the closing dissemination
            # rounds of empty messages, the first of which ends when the last rank's word
            # reaches the root (one way)
            kn = _chunks(n, c)
            depth = _ceil_log2(p)
            stream = S(n) + (kn - 1) * S(0)
            return F + depth * stream + (depth - 1) * S(n / kn) + S(0) + (depth - 1) * X(0)
        if op == "all_to_all" and algorithm == "pairwise":
            # own block copied, p-1 blocks exchanged with the peers one after the other
            return F + K(b) + (p - 1) * X(b)
        if op == "barrier" and algorithm == "dissemination":
            return F + _ceil_log2(p) * X(0)
        raise ValueError(f"no cost formula for {op} / {algorithm}")

    def choose(self, op: str, nbytes: int, world_size: int) -> Choice:
        """The candidate with the least predicted time, why, and that prediction (memoized)."""
        key = (op, int(nbytes), int(world_size))
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if world_size <= 1:
            choice = Choice("local", "world size 1", 0.0)
        else:
            choice = self._choose(op, int(nbytes), int(world_size))
        if len(self._memo) >= 4096:
            self._memo.clear()
        self._memo[key] = choice
        return choice

    def _choose(self, op: str, nbytes: int, p: int) -> Choice:
        cands = ALGORITHMS.get(op)
        if not cands:
            raise ValueError(f"unknown op {op!r}")
        preds = [(self.predict(op, a, nbytes, p), a) for a in cands]
        forced = dict(self.force).get(op)
        if forced is not None:
            t = next(t for t, a in preds if a == forced)
            others = ", ".join(f"{a} {_fmt_s(t_)}" for t_, a in preds if a != forced)
            return Choice(forced, f"forced ({forced} {_fmt_s(t)}" + (f"; {others})" if others else ")"), t)
        best_t, best = preds[0]
        for t, a in preds[1:]:
            if t < best_t:
                best_t, best = t, a
        head = self._describe_link(nbytes if op in ("all_reduce", "broadcast") else nbytes / p)
        if len(preds) == 1:
            return Choice(best, f"cost model ({head}): {best} {_fmt_s(best_t)}, the only algorithm", best_t)
        rest = " < ".join(f"{a} {_fmt_s(t)}" for t, a in sorted(preds) if a != best)
        return Choice(best, f"cost model ({head}): {best} {_fmt_s(best_t)} < {rest}", best_t)

    def _describe_link(self, m: float) -> str:
        link = self.governing(m)
        if link is None:
            return "no links"
        _, alpha, beta = link.exchange.band(m)
        gbps = 1 / beta / 1e9 if beta > 0 else math.inf
        return f"{link.name}: α={alpha * 1e6:.3g} µs, β={beta * 1e9:.3g} ns/B ≈ {gbps:.3g} GB/s"

    # -- (de)serialisation -----------------------------------------------------------------
    def to_fit(self) -> dict[str, Any]:
        """The calibration file's "fit" section for this model (links by class name)."""
        return {"links": {link.name: link.to_json() for link in self.links},
                "reduce": self.reduce.to_json(), "copy": self.copy.to_json(),
                "call": self.call, "sender": self.sender}


# -- defaults and construction ---------------------------------------------------------------
# Measured on this project's 2-vCPU development box (AMD EPYC, Firecracker VM, Linux 6.18, Python
# 3.11.7, numpy 2.4.6, anyio 4.16, asyncio) on 2026-11-24 13:50 UTC, with no other load (other
# processes used 0.01 of a core meanwhile), by
#     python -m sagellm_comm.topology.calibrate --transports shm,tcp,ucx,inproc
# (`calibrate.run`: 2 processes over 127.0.0.1 per transport, 4 B to 64 MiB), and pasted here
# rounded to 6 digits. tcp here is tcp_loopback. tcp_remote is NOT measured (this box has no
# second host): it is tcp_loopback's curves with 30 µs more latency and at most 10 Gb/s
# (1.16 GB/s of payload), an assumption until a cluster calibrates it. On a loaded box these
# numbers are far off (shm latencies grow 10x when the two ranks share a core with other work):
# calibrate where you run.
DEFAULT_FIT_SOURCE = "calibration of the 2-vCPU dev box, 2026-11-24 13:50 UTC (shm, tcp_loopback, ucx, inproc)"
DEFAULT_FIT: dict[str, Any] = {
    "links": {
        "shm": {
            "oneway": [[0, 1.75281e-05, 1.06058e-10],
                       [65536, 2.43509e-05, 1.94961e-12],
                       [262144, 1.26976e-05, 4.64035e-11],
                       [1048576, -1.29046e-05, 7.08197e-11]],
            "exchange": [[0, 2.26583e-05, 7.50118e-11],
                         [65536, 1.85696e-05, 1.374e-10],
                         [1048576, -6.41898e-06, 1.61231e-10],
                         [16777216, -0.000869831, 2.12694e-10]],
            "base": {
                "all_gather/direct": 2.76668e-05,
                "all_gather/ring": 0.000163179,
                "all_reduce/recursive_doubling": 2.69064e-05,
                "all_reduce/ring": 0.000191733,
                "all_to_all/pairwise": 2.72668e-05,
                "barrier/dissemination": 1.52637e-05,
                "broadcast/binomial_tree": 0.000253409,
                "reduce_scatter/direct": 3.33877e-05,
                "reduce_scatter/ring": 0.000173577,
            },
        },
        "tcp_loopback": {
            "oneway": [[0, 6.24004e-05, 2.51324e-10],
                       [65536, 7.30237e-05, 8.92261e-11],
                       [262144, 6.12538e-05, 1.34124e-10],
                       [1048576, 1.11787e-05, 1.8188e-10]],
            "exchange": [[0, 7.54636e-05, 2.52417e-11],
                         [65536, 5.53537e-05, 3.32095e-10],
                         [4194304, -0.000523999, 4.70224e-10]],
            "base": {
                "all_gather/direct": 2.00146e-05,
                "all_gather/ring": 6.94731e-05,
                "all_reduce/recursive_doubling": -1.10071e-06,
                "all_reduce/ring": 6.48517e-05,
                "all_to_all/pairwise": 3.86513e-06,
                "barrier/dissemination": -7.61176e-08,
                "broadcast/binomial_tree": 0.000148305,
                "reduce_scatter/direct": 3.65156e-05,
                "reduce_scatter/ring": 8.02168e-05,
            },
        },
        "ucx": {
            "oneway": [[0, 8.55911e-05, 0.0],
                       [262144, 7.60329e-05, 3.64617e-11],
                       [4194304, -6.71334e-05, 7.05952e-11]],
            "exchange": [[0, 8.715e-05, 0.0],
                         [262144, 7.49433e-05, 4.65651e-11],
                         [4194304, -0.000276668, 1.30396e-10]],
            "base": {
                "all_gather/direct": -2.16017e-05,
                "all_gather/ring": 0.000110936,
                "all_reduce/recursive_doubling": 3.05075e-05,
                "all_reduce/ring": 0.000241912,
                "all_to_all/pairwise": -2.14962e-05,
                "barrier/dissemination": -3.2904e-05,
                "broadcast/binomial_tree": 0.000171529,
                "reduce_scatter/direct": -1.40887e-05,
                "reduce_scatter/ring": 0.000156942,
            },
        },
        "inproc": {
            "oneway": [[0, 3.1799e-05, 2.51271e-11],
                       [262144, 2.56948e-05, 4.84128e-11],
                       [1048576, 6.92228e-06, 6.63156e-11],
                       [4194304, -3.15898e-05, 7.54976e-11]],
            "exchange": [[0, 5.91097e-05, 5.37884e-11],
                         [65536, 4.44531e-05, 2.77431e-10],
                         [1048576, -9.61079e-05, 4.1148e-10],
                         [16777216, 0.00570955, 6.5436e-11]],
            "base": {
                "all_gather/direct": 7.25425e-05,
                "all_gather/ring": 0.00020847,
                "all_reduce/recursive_doubling": 6.84971e-05,
                "all_reduce/ring": 0.000192245,
                "all_to_all/pairwise": 9.6553e-05,
                "barrier/dissemination": 4.65828e-05,
                "broadcast/binomial_tree": 0.000156846,
                "reduce_scatter/direct": 8.78014e-05,
                "reduce_scatter/ring": 0.000229574,
            },
        },
    },
    "reduce": [[0, 4.28935e-07, 1.26836e-11],
               [262144, -1.81944e-06, 2.12605e-11],
               [4194304, -7.91789e-05, 3.97044e-11],
               [16777216, -0.000448185, 6.16989e-11]],
    "copy": [[0, 2.5468e-07, 8.68773e-12],
             [262144, -2.75598e-06, 2.01725e-11],
             [4194304, -6.47645e-05, 3.49565e-11],
             [16777216, -0.000503266, 6.10932e-11]],
    "call": 8.16985e-06,
    "sender": 3.27835e-05,
}

REMOTE_EXTRA_ALPHA = 30e-6
REMOTE_MIN_BETA = 1 / 1.16e9


def _remote_from(loopback: Curve) -> Curve:
    """tcp_remote's assumed curve: loopback's, with more latency and no faster than 10 Gb/s.

    Each band's beta is raised to at least REMOTE_MIN_BETA and the intercepts are
    re-derived so that the pieces still join at the knots.
    """
    bands: list[Band] = []
    for lo, a, b in loopback.bands:
        b = max(b, REMOTE_MIN_BETA)
        if not bands:
            bands.append((0, a + REMOTE_EXTRA_ALPHA, b))
        else:
            _, pa, pb = bands[-1]
            bands.append((lo, pa + pb * lo - b * lo, b))
    return Curve(tuple(bands))


def default_link(name: str, fit: dict[str, Any] | None = None) -> LinkCost:
    """The curves of link class `name` in `fit` (a calibration's fit section), else the built-in ones.

    Built in: the measured classes of DEFAULT_FIT; ucx as tcp_loopback; any other
    name (tcp_remote, unknown) as tcp_remote's assumption.
    """
    if fit is not None and name in fit.get("links", {}):
        return LinkCost.from_json(name, fit["links"][name])
    links = DEFAULT_FIT["links"]
    if name in links:
        return LinkCost.from_json(name, links[name])
    loop = LinkCost.from_json("tcp_loopback", links["tcp_loopback"])
    if name == "ucx":
        return replace(loop, name="ucx")
    # the software cost per algorithm is the same; the wire adds latency and caps bandwidth
    return LinkCost(name, _remote_from(loop.oneway), _remote_from(loop.exchange), loop.base)


def link_class(transport: str, describe: str = "") -> str:
    """The cost class of a link: its transport, and for tcp whether the peer is on loopback.

    `describe` is `Connection.describe()` ("tcp 127.0.0.1:41234"). A tcp peer
    reached through a non-loopback address counts as remote even when it is on
    this host: the slower guess.
    """
    t = transport.lower()
    if t == "tcp":
        host = describe.strip().removeprefix("tcp").strip().rsplit(":", 1)[0].strip("[]'\"() ")
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        return "tcp_loopback" if local else "tcp_remote"
    return t if t in LINK_CLASSES else "tcp_remote"


def group_class(link_classes: Iterable[str]) -> str | None:
    """The link class that governs a group: the slowest present, in the fixed order of LINK_CLASSES.

    Why a fixed order and not a comparison of curves: a rank sees only its own
    links, and every rank must derive the same class without talking. In a group
    that spans hosts every rank has a link to another host, and the cross-host
    class (tcp_remote, or ucx when asked for) ranks above every same-host class
    (shm, tcp_loopback), so every member picks the cross-host class; in a group on
    one host every member sees the same class. Unknown names count as tcp_remote.
    None: no links (a group of one).
    """
    order = {c: i for i, c in enumerate(LINK_CLASSES)}
    present = {c if c in order else "tcp_remote" for c in link_classes}
    return max(present, key=lambda c: order[c]) if present else None


def model_from_fit(fit: dict[str, Any], link_classes: Iterable[str], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   source: str = "calibration") -> CostModel:
    """A model of one calibration's "fit" section, for a group whose links are of `link_classes`
    (the governing one, `group_class`, is used)."""
    name = group_class(link_classes)
    return CostModel(
        links=() if name is None else (default_link(name, fit),),
        reduce=Curve.from_json(fit.get("reduce", DEFAULT_FIT["reduce"])),
        copy=Curve.from_json(fit.get("copy", DEFAULT_FIT["copy"])),
        call=float(fit.get("call", DEFAULT_FIT["call"])),
        sender=float(fit.get("sender", DEFAULT_FIT["sender"])),
        chunk_bytes=chunk_bytes, source=source)


def default_model(link_classes: Iterable[str], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> CostModel:
    """The built-in model for a group whose links are of `link_classes`.

    No calibration file is read here: every rank must build the same model
    without talking, and the built-in constants are the same everywhere. A
    calibration enters only through `cost_model_for`, with every rank's gathered.
    One shared instance per (classes, chunk size), so its memo serves every group.
    """
    name = group_class(link_classes)
    return _default_model(() if name is None else (name,), chunk_bytes)


@lru_cache(maxsize=64)
def _default_model(names: tuple[str, ...], chunk_bytes: int) -> CostModel:
    return model_from_fit(DEFAULT_FIT, names, chunk_bytes=chunk_bytes, source="defaults")


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cost_model_for(link_classes: Sequence[str], calibrations: Sequence[dict[str, Any] | None], *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> CostModel:
    """The group's model from every rank's link classes and calibration (as gathered at init).

    Order-independent and identical on every rank given the same inputs (as
    multisets). The governing class is `group_class(link_classes)`; every
    distinct fit of that class found in the calibrations is kept (the group's
    S and X are their pointwise maximum and F the largest base: the slowest
    host's measurement governs); if no calibration measured the class, its
    built-in curves. Compute (reduction, copy) and the generic fixed costs come
    from the calibration that is slowest at a 1 MiB reduction (ties by content);
    the built-in ones if none has them. `calibrations` holds whole calibration
    documents (with a "fit" section) or bare fit sections; None entries count as
    "no calibration on that rank".
    """
    fits: list[dict[str, Any]] = []
    for cal in calibrations:
        if not cal:
            continue
        fit = cal.get("fit", cal)
        if isinstance(fit, dict) and isinstance(fit.get("links"), dict):
            fits.append(fit)
    fits.sort(key=_canon)
    name = group_class(link_classes)
    names = [] if name is None else [name]
    links: list[LinkCost] = []
    for name in names:
        found = sorted({_canon(f["links"][name]) for f in fits if name in f["links"]})
        if found:
            links.extend(LinkCost.from_json(name, json.loads(s)) for s in found)
        else:
            links.append(default_link(name))
    compute = [f for f in fits if "reduce" in f]
    slowest = DEFAULT_FIT
    if compute:
        slowest = max(compute, key=lambda f: (Curve.from_json(f["reduce"])(1 << 20), _canon(f)))
    if not fits:
        return default_model(names, chunk_bytes=chunk_bytes)
    base = model_from_fit(slowest, [], chunk_bytes=chunk_bytes, source=f"calibration of {len(fits)} rank(s)")
    return replace(base, links=tuple(links), calibrations=tuple(sorted({_canon(f) for f in fits})))


def predict_all(model: CostModel, op: str, nbytes: int, world_size: int) -> dict[str, float]:
    """Every candidate's prediction for one call."""
    return {a: model.predict(op, a, nbytes, world_size) for a in ALGORITHMS[op]}

