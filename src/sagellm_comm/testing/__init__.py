"""Tools for testing multi-rank code: simulated worlds, fault plans, pytest fixtures.

    results = await sagellm_comm.testing.run_ranks(4, body, x)
    plan = FaultPlan().kill(rank=2, at_op=3).delay(rank=1, seconds=0.05)
"""

from .faults import FaultPlan, RankKilled
from .world import run_ranks

__all__ = ["FaultPlan", "RankKilled", "run_ranks"]
