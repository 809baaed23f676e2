"""The examples run and compute what they claim (tensor-parallel output equals the unsplit model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("world", [2, 3])
def test_tensor_parallel_overlap_matches_unsplit_model(world: int, backend: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tensor_parallel_overlap.py"), "--simulate", str(world), "--backend", backend],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = float(proc.stdout.strip().rsplit("=", 1)[1])
    assert err < 1e-4, proc.stdout
