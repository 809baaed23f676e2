"""Which algorithm runs each call, and why: the cost model's prediction, or a rule of size.

With a `CostModel` (what every `Communicator` passes: `comm.cost_model`), each
function returns the candidate with the least predicted time, the reason (the
model's link constants and every candidate's prediction) and that prediction.
Without one (`model=None`), the fixed size rules below decide, as before the
model existed, and the prediction is 0 (none).

Every rank evaluates the same function of the same inputs (the fingerprint's
size, the world size and a model that is identical on every rank), so they
agree without talking. The reason and the prediction go into the op's stats record.
"""

from __future__ import annotations

from functools import lru_cache

from ..topology.cost import Choice, CostModel

__all__ = ["Choice", "all_gather", "all_reduce", "all_to_all", "barrier", "broadcast", "reduce_scatter"]

SMALL_BYTES = 64 * 1024  # below this, rounds (latency) cost more than bytes (bandwidth)
PAIR_EXCHANGE_BYTES = 4 * 1024 * 1024  # measured on shm and tcp: one exchange beats the ring up to here


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


def all_reduce(nbytes: int, size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("all_reduce", nbytes, size)
    return _all_reduce_rule(nbytes, size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _all_reduce_rule(nbytes: int, size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    if nbytes <= SMALL_BYTES or nbytes < size * 1024:
        return Choice("recursive_doubling", f"{_kib(nbytes)} <= {_kib(SMALL_BYTES)}: latency-bound, log2(p) rounds")
    if size == 2 and nbytes <= PAIR_EXCHANGE_BYTES:
        # two ranks: ring and doubling move the same bytes; doubling needs one round, not two
        return Choice("recursive_doubling", (f"2 ranks, {_kib(nbytes)} <= {_kib(PAIR_EXCHANGE_BYTES)}: same bytes "
                                             "as the ring in one round instead of two; the ring wins once it "
                                             "pipelines"))
    return Choice("ring", f"{_kib(nbytes)} > {_kib(SMALL_BYTES)}: bandwidth-bound, ring reduce-scatter + all-gather")


def all_gather(total_bytes: int, size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("all_gather", total_bytes, size)
    return _all_gather_rule(total_bytes, size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _all_gather_rule(total_bytes: int, size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    if total_bytes <= SMALL_BYTES:
        return Choice("direct", f"{_kib(total_bytes)} gathered <= {_kib(SMALL_BYTES)}: one round to every peer")
    return Choice("ring", f"{_kib(total_bytes)} gathered > {_kib(SMALL_BYTES)}: bandwidth-bound ring")


def reduce_scatter(total_bytes: int, size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("reduce_scatter", total_bytes, size)
    return _reduce_scatter_rule(total_bytes, size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _reduce_scatter_rule(total_bytes: int, size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    if total_bytes <= SMALL_BYTES:
        return Choice("direct", f"{_kib(total_bytes)} <= {_kib(SMALL_BYTES)}: one round to every peer")
    return Choice("ring", f"{_kib(total_bytes)} > {_kib(SMALL_BYTES)}: bandwidth-bound ring")


def broadcast(nbytes: int, size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("broadcast", nbytes, size)
    return _broadcast_rule(nbytes, size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _broadcast_rule(nbytes: int, size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    return Choice("binomial_tree", "log2(p) depth, chunks pipelined down the tree")


def all_to_all(nbytes: int, size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("all_to_all", nbytes, size)
    return _all_to_all_rule(nbytes, size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _all_to_all_rule(nbytes: int, size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    return Choice("pairwise", "every chunk goes straight to its rank")


def barrier(size: int, model: CostModel | None = None) -> Choice:
    if model is not None:
        return model.choose("barrier", 0, size)
    return _barrier_rule(size)


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def _barrier_rule(size: int) -> Choice:
    if size == 1:
        return Choice("local", "world size 1")
    return Choice("dissemination", "ceil(log2 p) rounds of empty messages")
