"""What a benchmark leaves besides its table and JSON: a trace of its ops (`--trace`) and a plot (`--plot`).

Why one place for every benchmark: their ranks run in fresh child processes,
which inherit only the environment. `SAGELLM_COMM_TRACE` set to a scratch
folder makes every rank (in a child, or in this process) write its own trace
when its communicator closes; once the run ends, successful or not, this merges
those files into one timeline (`trace.merge_traces`). A plot is drawn from the
same document `--json` writes (`plots.plot_benchmark`), read back from a
scratch file when no `--json` was given.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import trace


def add_args(p: Any) -> None:
    """`--trace FILE` and `--plot FILE.png` on a benchmark's parser."""
    p.add_argument("--trace", metavar="FILE",
                   help="write a Chrome/Perfetto trace of every op of every rank here (open in ui.perfetto.dev)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the results (the --json document) into this image")


def run(trace_path: str | None, plot_path: str | None, json_path: str | None,
        body: Callable[[str | None], int]) -> int:
    """Run `body(json path or None)` with tracing and plotting as asked; returns its exit code."""
    if not trace_path and not plot_path:
        return body(json_path)
    with tempfile.TemporaryDirectory(prefix="sagellm-comm-bench-") as tmp:
        doc_path = json_path or (str(Path(tmp) / "report.json") if plot_path else None)
        old = os.environ.get(trace.ENV)
        if trace_path:
            os.environ[trace.ENV] = str(Path(tmp) / "trace.rank{rank}.pid{pid}.json")
        try:
            rc = body(doc_path)
        finally:
            if trace_path:
                if old is None:
                    os.environ.pop(trace.ENV, None)
                else:
                    os.environ[trace.ENV] = old
                trace.follow_env()  # ranks that ran in this process: stop recording them
                _merge(Path(tmp), trace_path)
        if plot_path and doc_path:
            rc = _plot(doc_path, plot_path) or rc
    return rc


def _merge(tmp: Path, out: str) -> None:
    files = sorted(tmp.glob("trace.rank*.json"))
    doc = trace.merge_traces(files, out)
    ops = sum(1 for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "op")
    ranks = doc["otherData"]["ranks"]
    print(f"# wrote trace {out}: {ops} ops; ranks {', '.join(map(str, ranks)) or 'none'}; {len(files)} file(s) "
          f"merged (open it in https://ui.perfetto.dev)")


def _plot(doc_path: str, out: str) -> int:
    if not Path(doc_path).exists():
        print(f"# no plot: the benchmark wrote no results to draw ({out})", file=sys.stderr)
        return 1
    doc: dict[str, Any] = json.loads(Path(doc_path).read_text())
    try:
        from .plots import plot_benchmark

        plot_benchmark(doc, out)
    except ImportError as e:  # no matplotlib
        print(f"# no plot: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"# no plot: {e}", file=sys.stderr)
        return 1
    print(f"# wrote plot {out}")
    return 0
