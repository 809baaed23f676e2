"""The `sagellm-comm` command line, run the way a user runs it: as a subprocess.

Each run is bounded by a timeout (a hang is a failure, and the CLI itself kills
its worker processes on failure).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "sagellm_comm.cli"]


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_versions_and_transports() -> None:
    out = run_cli("info", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sagellm-comm" in out.stdout
    assert "tcp" in out.stdout and "cpu count" in out.stdout


def test_bad_sizes_are_a_usage_error() -> None:
    out = run_cli("bench", "all-reduce", "--sizes", "3", timeout=60)
    assert out.returncode == 2
    assert "float32" in out.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_checks_every_collective(backend: str) -> None:
    out = run_cli("demo", "--world", "2", "--backend", backend, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "result: all ok" in out.stdout
    for op in ("all_reduce(sum)", "all_reduce(avg)", "all_reduce(max)", "all_gather",
               "reduce_scatter", "broadcast", "all_to_all", "barrier", "send/recv ring"):
        assert op in out.stdout
    assert "FAILED" not in out.stdout


@pytest.mark.multiprocess
def test_tiny_bench_against_gloo_writes_json(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "ar.json"
    out = run_cli("bench", "all-reduce", "--world", "2", "--sizes", "4,64K", "--iters", "5",
                  "--compare", "gloo", "--json", str(path), "--no-progress", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(path.read_text())
    assert doc["all_ok"] is True
    assert doc["machine"]["cpu_count"] >= 1
    assert [r["size_bytes"] for r in doc["results"]] == [4, 65536]
    for row in doc["results"]:
        assert row["busbw_ratio"] > 0 and row["time_ratio"] > 0
        assert row["ours"]["iters"] == row["gloo"]["iters"] == 5
        assert row["ours"]["algorithm"]
    assert "busbw" in out.stdout


@pytest.mark.multiprocess
def test_info_world_shows_the_transport_of_every_link() -> None:
    out = run_cli("info", "--world", "3", "--transport", "tcp", timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    links = [ln for ln in out.stdout.splitlines() if "-> rank" in ln]
    assert len(links) == 6 and all(": tcp" in ln for ln in links), out.stdout
    assert "shm" in out.stdout and "ucx" in out.stdout  # availability lines


@pytest.mark.multiprocess
def test_tiny_transports_bench_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "tr.json"
    out = run_cli("bench", "transports", "--transports", "tcp,shm", "--sizes", "4,1M", "--p2p-sizes", "64K",
                  "--iters", "5", "--max-seconds", "0.05", "--no-gloo", "--json", str(path), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(path.read_text())
    assert doc["all_ok"] is True
    assert set(doc["p2p"]) == {"tcp", "shm"}
    assert [r["bytes"] for r in doc["all_reduce"]["ours"]["shm"]] == [4, 1 << 20]
    assert doc["p2p"]["shm"][0]["gbps"] > 0 and doc["memcpy_gbps"]["65536"] > 0
    assert "memcpy" in out.stdout


def test_topo_tree_json_and_the_model_in_use(tmp_path: Path) -> None:
    """`topo` shows this host and which cost-model constants its collectives use; --json parses back."""
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def topo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "topo", *args], capture_output=True, text=True, timeout=120, env=env)

    out = topo()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("host ") and "NUMA" in out.stdout and "discovered in" in out.stdout
    assert "cost model: built-in constants" in out.stdout
    as_json = topo("--json")
    assert as_json.returncode == 0, as_json.stderr
    from sagellm_comm import topology

    assert topology.from_json(as_json.stdout).host.logical_cpus == os.cpu_count()
    cal = topo("--calibrate", "--transports", "tcp", "--sizes", "4,64K", "--budget", "0.5")
    assert cal.returncode == 0, cal.stdout + cal.stderr
    assert "tcp_loopback" in cal.stdout and "cached at" in cal.stdout
    assert list((tmp_path / "sagellm-comm").glob("calibration-*.json"))
    after = topo()
    assert "cost model: calibrated" in after.stdout and "(tcp_loopback)" in after.stdout


@pytest.mark.multiprocess
def test_bench_trace_holds_both_ranks_all_reduces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ar_trace.json"
    out = run_cli("bench", "all-reduce", "--world", "2", "--sizes", "4,64K", "--iters", "5",
                  "--no-progress", "--trace", str(path), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"# wrote trace {path}" in out.stdout
    doc = json.loads(path.read_text())
    assert doc["otherData"]["ranks"] == [0, 1]
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1"}
    for rank in (0, 1):
        ar = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == rank and e["name"] == "all_reduce"]
        sizes = [e["args"]["bytes"] for e in ar]
        assert sizes.count(4) >= 5 and sizes.count(65536) >= 5, sizes
        assert all(e["dur"] >= 0 and e["args"]["ok"] for e in ar)
