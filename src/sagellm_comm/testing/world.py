"""Simulated worlds: N ranks as tasks of one event loop, over in-process links.

Each rank gets a real `Communicator` with its own progress engine; only the
links are in memory. So the same collectives, matching, heartbeats and failure
propagation run as across processes, and a fault plan can break them on purpose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..group import DEFAULT_CHUNK_BYTES, Communicator
from ..scheduler.engine import Engine, EngineConfig
from ..scheduler.ordering import GroupState
from ..transports.inproc import InprocConnection, connection_pair
from .faults import FaultPlan, RankKilled


def _mesh(n: int) -> list[dict[int, InprocConnection]]:
    conns: list[dict[int, InprocConnection]] = [{} for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = connection_pair(f"rank{i}", f"rank{j}")
            conns[i][j], conns[j][i] = a, b
    return conns


async def run_ranks(
    world_size: int,
    body: Callable[..., Awaitable[Any]],
    *args: Any,
    faults: FaultPlan | None = None,
    timeout: float | None = None,
    heartbeat_interval: float = 0.2,
    heartbeat_timeout: float = 2.0,
    chunk_bytes: int | None = None,
    return_exceptions: bool = False,
) -> list[Any]:
    """Run `body(comm, *args)` on `world_size` simulated ranks in this event loop.

    Returns the bodies' results by rank. A rank killed by the fault plan yields
    its `RankKilled` error as its result. If other ranks raise, an ExceptionGroup
    of their errors (each noted with its rank) is raised, unless
    `return_exceptions` puts the exceptions in the result list instead.
    `timeout` is every op's default time limit (`CommTimeout`).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    plan = faults or FaultPlan()
    conns = _mesh(world_size)
    for rank, seconds in plan.delays.items():
        for conn in conns[rank].values():
            conn.tx.delay = seconds
    config = EngineConfig(heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout)
    results: list[Any] = [None] * world_size
    errors: dict[int, Exception] = {}

    def fault_hook(rank: int, engine: Engine) -> Callable[[str], None]:
        count = 0

        def hook(op: str) -> None:
            nonlocal count
            n, count = count, count + 1
            for a, b, at in plan.cuts:
                if a == rank and at == n:
                    conns[a][b].cut()
            if plan.kills.get(rank) == n:
                engine.abort(RankKilled(f"rank {rank} was killed by the fault plan at op {n} ({op})"))
                raise RankKilled(f"rank {rank} was killed by the fault plan at its op {n} ({op})")

        return hook

    async def run_one(rank: int) -> None:
        engine = Engine(rank, world_size, dict(conns[rank]), config)
        async with anyio.create_task_group() as tg:
            engine.start(tg)
            comm = Communicator(engine, GroupState("world", list(range(world_size)), rank),
                                timeout=timeout, transport="inproc", owns_engine=True,
                                chunk_bytes=DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
            comm.before_op = fault_hook(rank, engine)
            try:
                results[rank] = await body(comm, *args)
            except RankKilled as e:
                results[rank] = e
            except Exception as e:
                e.add_note(f"raised on simulated rank {rank} of {world_size}")
                errors[rank] = e
                results[rank] = e
            finally:
                with anyio.CancelScope(shield=True):
                    await comm.aclose()
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for rank in range(world_size):
            tg.start_soon(run_one, rank)

    if errors and not return_exceptions:
        raise ExceptionGroup(f"{len(errors)} of {world_size} simulated ranks failed",
                             [errors[r] for r in sorted(errors)])
    return results
