"""examples/test_with_simulated_ranks.py passes as a user would run it: `pytest` on that file, under pytest-trio.

The example is a test file for users to copy, so it lives in examples/, which the
suite's testpaths do not collect; this runs it in a pytest of its own, bounded in time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_with_simulated_ranks.py"
EXPECTED = 15  # its tests, parametrized cases counted: change it together with the example


def test_the_simulated_ranks_example_passes_under_pytest_trio() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", str(EXAMPLE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"=* *{EXPECTED} passed in [\d.]+s( \([\d:]+\))? *=*", summary), summary
