"""`sagellm-comm bench kv` end to end: two real processes over tcp, a tiny cache, every row sane.

Run as a user runs it (a subprocess with a deadline): a hang is a failure, and the
command itself kills its workers when one fails.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "sagellm_comm.cli", "bench", "kv"]
TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--block-size", "16"]


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_unknown_codec_is_a_usage_error() -> None:
    out = run_bench("--codec", "none,zstd", "--transport", "tcp", timeout=60)
    assert out.returncode == 2
    assert "zstd" in out.stderr


def test_two_gpus_are_asked_for_only_where_they_exist() -> None:
    """--gpus 2 (rank r on GPU r) is refused with the reason on CPU caches and where torch sees fewer GPUs."""
    torch = pytest.importorskip("torch")
    out = run_bench("--gpus", "2", "--transport", "tcp", timeout=60)
    assert out.returncode == 2 and "--gpus applies to --device cuda only" in out.stderr, out.stderr
    out = run_bench("--gpus", "3", timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr, out.stderr
    if torch.cuda.device_count() < 2:
        out = run_bench("--device", "cuda", "--gpus", "2", "--transport", "tcp", timeout=60)
        assert out.returncode == 2, out.stderr
        assert ("needs a CUDA GPU" in out.stderr if torch.cuda.device_count() == 0
                else f"torch sees {torch.cuda.device_count()} GPU(s)" in out.stderr), out.stderr


@pytest.mark.multiprocess
def test_tiny_kv_bench_writes_sane_rows(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "kv.json"
    out = run_bench(*TINY, "--tokens", "40,64", "--codec", "none", "--transport", "tcp", "--iters", "2",
                    "--timeout", "90", "--json", str(path), timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kv/raw" in out.stdout
    doc = json.loads(path.read_text())
    assert doc["all_ok"] is True
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"]
    assert doc["settings"]["backend"] == "asyncio"
    per_token = 2 * 2 * 2 * 16 * 2  # K and V x layers x heads x head dim x bf16
    assert doc["settings"]["bytes_per_token"] == per_token
    rows = doc["rows"]
    assert [(r["tokens"], r["codec"], r["transport"]) for r in rows] == [(40, "none", "tcp"), (64, "none", "tcp")]
    for r in rows:
        assert r["raw_bytes"] == math.ceil(r["tokens"] / 16) * 16 * per_token  # whole blocks
        for key in ("kv_seconds", "kv_gbps", "raw_seconds", "raw_gbps", "kv_over_raw", "first_layer_ms",
                    "raw_first_layer_ms", "compression", "wire_bytes"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["first_layer_ms"] <= r["kv_seconds"] * 1e3
        assert 0.5 < r["compression"] <= 1.0  # no codec: the wire carries the blocks plus checksums
        assert len(r["kv_times"]) == len(r["raw_times"]) == 2 and r["ok"] is True
    assert doc["ceilings"]["40"]["memcpy_gbps"] > 0
