"""examples/ray_actors.py: ranks as Ray actors on a local Ray instance compute the unsplit product."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_actors.py"


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_ray_actors_tensor_parallel_linear(world: int) -> None:
    pytest.importorskip("ray")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--world", str(world), "--steps", "3"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = proc.stdout
    assert f"{world} ranks as Ray actors, rendezvous at tcp://127.0.0.1:" in out
    links = re.findall(r"rank (\d+): links (\{.*\})", out)
    assert sorted(int(r) for r, _ in links) == list(range(world))
    assert all(s.count("'shm'") == world - 1 for _, s in links), out  # one machine: shared memory between actors
    assert len(re.findall(r"step \d: tensor-parallel linear", out)) == 3
    assert "ok: every step matched" in out
