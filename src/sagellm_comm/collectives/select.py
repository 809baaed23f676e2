"""Which algorithm runs each call, and why: a rule of size and world size.

Every rank evaluates the same rule on the same fingerprint, so they agree without
talking. The reason is recorded in the op's stats record.
"""

from __future__ import annotations

from functools import lru_cache

SMALL_BYTES = 64 * 1024  # below this, rounds (latency) cost more than bytes (bandwidth)
PAIR_EXCHANGE_BYTES = 4 * 1024 * 1024  # measured on shm and tcp: one exchange beats the ring up to here


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def all_reduce(nbytes: int, size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    if nbytes <= SMALL_BYTES or nbytes < size * 1024:
        return "recursive_doubling", f"{_kib(nbytes)} <= {_kib(SMALL_BYTES)}: latency-bound, log2(p) rounds"
    if size == 2 and nbytes <= PAIR_EXCHANGE_BYTES:
        # two ranks: ring and doubling move the same bytes; doubling needs one round, not two
        return "recursive_doubling", (f"2 ranks, {_kib(nbytes)} <= {_kib(PAIR_EXCHANGE_BYTES)}: same bytes as "
                                      "the ring in one round instead of two; the ring wins once it pipelines")
    return "ring", f"{_kib(nbytes)} > {_kib(SMALL_BYTES)}: bandwidth-bound, ring reduce-scatter + all-gather"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def all_gather(total_bytes: int, size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    if total_bytes <= SMALL_BYTES:
        return "direct", f"{_kib(total_bytes)} gathered <= {_kib(SMALL_BYTES)}: one round to every peer"
    return "ring", f"{_kib(total_bytes)} gathered > {_kib(SMALL_BYTES)}: bandwidth-bound ring"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def reduce_scatter(total_bytes: int, size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    if total_bytes <= SMALL_BYTES:
        return "direct", f"{_kib(total_bytes)} <= {_kib(SMALL_BYTES)}: one round to every peer"
    return "ring", f"{_kib(total_bytes)} > {_kib(SMALL_BYTES)}: bandwidth-bound ring"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def broadcast(nbytes: int, size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    return "binomial_tree", "log2(p) depth, chunks pipelined down the tree"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def all_to_all(nbytes: int, size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    return "pairwise", "every chunk goes straight to its rank"


@lru_cache(maxsize=1024)  # a pure rule of (size, world), asked on every op
def barrier(size: int) -> tuple[str, str]:
    if size == 1:
        return "local", "world size 1"
    return "dissemination", "ceil(log2 p) rounds of empty messages"
