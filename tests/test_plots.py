"""`plots.plot_benchmark`: every benchmark's JSON document becomes a PNG that shows ours against its peer.

all-reduce and transports run for real (tiny sizes, bounded subprocesses); the
others cannot run here (GPUs) or take a minute (soak), so their documents are
built the way the modules build them, through the modules' own functions where
there is one. Beyond "a PNG was written", each test checks what is drawn: which
lines, with which labels, at which sizes and values, on a log2 size axis.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import imread

from sagellm_comm import bench_allreduce, bench_cost, bench_kv, bench_soak, plots

CLI = [sys.executable, "-m", "sagellm_comm.cli"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers ------------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the file really is a PNG that decodes."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    assert imread(str(path)).shape[:2] == (height, width)
    return width, height


def saved(doc: dict[str, Any], tmp_path: Path, name: str) -> tuple[int, int]:
    path = tmp_path / "sub" / f"{name}.png"  # a folder that does not exist yet
    plots.plot_benchmark(doc, str(path))
    return png_size(path)


def panel(fig: Figure, title: str) -> Axes:
    """The one axes whose title starts with `title`."""
    found = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def title_of(fig: Figure) -> str:
    """The figure's title with its line breaks undone (it wraps to the figure's width)."""
    return " ".join(fig.get_suptitle().split())


def labels(ax: Axes) -> list[str]:
    """The data lines' labels (reference lines are labelled with a leading underscore)."""
    return [str(line.get_label()) for line in ax.get_lines() if not str(line.get_label()).startswith("_")]


def line(ax: Axes, label: str) -> tuple[list[float], list[float]]:
    for ln in ax.get_lines():
        if ln.get_label() == label:
            return [float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()]  # type: ignore[union-attr]
    raise AssertionError(f"no line {label!r} in {labels(ax)}")


def assert_log2_sizes(ax: Axes, sizes: list[int]) -> None:
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2  # type: ignore[attr-defined]
    assert sorted(float(t) for t in ax.get_xticks()) == sorted(float(s) for s in sizes)


def assert_parity_line(ax: Axes) -> None:
    parity = [ln for ln in ax.get_lines() if ln.get_label() == plots.PARITY]
    assert len(parity) == 1 and list(parity[0].get_ydata()) == [1.0, 1.0]  # type: ignore[arg-type]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def machine() -> dict[str, Any]:
    return bench_allreduce.machine_info()


# -- all-reduce and transports: real runs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_reduce_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("ar") / "ar.json"
    compare = ["--compare", "gloo"] if HAS_TORCH else []
    out = run_cli("bench", "all-reduce", "--world", "2", "--sizes", "4,64K,1M", "--iters", "3", "--warmup", "1",
                  "--max-seconds", "0.05", "--no-progress", *compare, "--json", str(path), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.fixture(scope="module")
def transports_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("tr") / "tr.json"
    gloo = [] if HAS_TORCH else ["--no-gloo"]
    out = run_cli("bench", "transports", "--transports", "tcp", "--sizes", "4,64K", "--p2p-sizes", "4,64K",
                  "--iters", "3", "--max-seconds", "0.05", *gloo, "--json", str(path), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.mark.multiprocess
def test_all_reduce_bandwidth_against_gloo(all_reduce_doc: dict[str, Any], tmp_path: Path) -> None:
    doc = all_reduce_doc
    sizes = [4, 64 << 10, 1 << 20]
    fig = plots.figure_for(doc)
    bw = panel(fig, "all_reduce float32 sum, bus bandwidth")
    assert_log2_sizes(bw, sizes)
    ours = "ours (sagellm-comm, asyncio)"
    assert labels(bw) == ([ours, "gloo (torch.distributed)"] if HAS_TORCH else [ours])
    xs, ys = line(bw, ours)
    assert xs == [float(s) for s in sizes]
    assert close(ys, [r["ours"]["busbw_gbps"] for r in doc["results"]])
    assert bw.get_yscale() == "log"
    title = title_of(fig)
    assert "bench all-reduce" in title and "world 2" in title and f"{doc['machine']['cpu_count']} CPUs" in title
    assert doc["machine"]["date"][:10] in title
    if HAS_TORCH:
        ratio = panel(fig, "ours / gloo")
        assert labels(ratio) == ["ours / gloo bus bandwidth"]
        assert close(line(ratio, "ours / gloo bus bandwidth")[1], [r["busbw_ratio"] for r in doc["results"]])
        assert_parity_line(ratio)
        assert "vs gloo" in title
    assert saved(doc, tmp_path, "ar") == (9 * plots.DPI, 7 * plots.DPI)


def test_all_reduce_plots_bus_bandwidth_and_without_a_peer_no_ratio() -> None:
    """World 4: bus bandwidth is 1.5 x the algorithm bandwidth, so plotting the wrong one shows."""
    world, sizes, times_us = 4, [4, 64 << 10, 16 << 20], [50.0, 120.0, 9000.0]
    ours = []
    for nbytes, t in zip(sizes, times_us, strict=True):
        algbw = nbytes / (t / 1e6) / 1e9
        ours.append({"bytes": nbytes, "count": nbytes // 4, "iters": 5, "algorithm": "ring", "ok": True,
                     "time_us": t, "min_time_us": t, "p10_time_us": t * 0.9, "p90_time_us": t * 1.3,
                     "algbw_gbps": algbw, "busbw_gbps": algbw * bench_allreduce.busbw_factor(world),
                     "rank_median_us": [t] * world})
    doc = {"benchmark": "all_reduce", "machine": machine(), "results": bench_allreduce.combine(ours, None),
           "settings": {"world": world, "backend": "trio", "transport": "shm"}, "all_ok": True}
    fig = plots.figure_for(doc)
    assert len(fig.axes) == 1  # no peer in the run: no ratio panel
    bw = fig.axes[0]
    assert labels(bw) == ["ours (sagellm-comm, trio)"]
    assert close(line(bw, "ours (sagellm-comm, trio)")[1], [1.5 * m["algbw_gbps"] for m in ours])
    assert_log2_sizes(bw, sizes)
    band = bw.collections[0].get_paths()[0].vertices[:, 1]  # the p10-p90 spread around the median
    assert max(band) == pytest.approx(ours[2]["busbw_gbps"] / 0.9) and min(band) > 0
    assert "world 4, transport shm" in title_of(fig) and "vs gloo" not in title_of(fig)


@pytest.mark.multiprocess
def test_transports_all_reduce_and_p2p_against_gloo_and_memcpy(transports_doc: dict[str, Any],
                                                                tmp_path: Path) -> None:
    doc = transports_doc
    fig = plots.figure_for(doc)
    ar = panel(fig, "all_reduce float32 sum, 2 processes")
    assert_log2_sizes(ar, [4, 64 << 10])
    assert labels(ar) == (["ours over tcp", "gloo (torch.distributed)"] if HAS_TORCH else ["ours over tcp"])
    assert close(line(ar, "ours over tcp")[1], [m["busbw_gbps"] for m in doc["all_reduce"]["ours"]["tcp"]])
    p2p = panel(fig, "point-to-point one-way")
    assert_log2_sizes(p2p, [4, 64 << 10])
    assert labels(p2p) == ["ours over tcp", "memcpy (1 core, the copy ceiling)"]
    assert line(p2p, "memcpy (1 core, the copy ceiling)") == ([65536.0], [doc["memcpy_gbps"]["65536"]])
    per_copy = panel(fig, "ours / single-core memcpy")
    xs, ys = line(per_copy, "tcp / memcpy")
    assert xs == [65536.0]  # memcpy is measured from 64 KiB only: no ratio at 4 B
    assert close(ys, [doc["p2p"]["tcp"][1]["gbps"] / doc["memcpy_gbps"]["65536"]])
    assert_parity_line(per_copy)
    if HAS_TORCH:
        assert_parity_line(panel(fig, "ours / gloo bus bandwidth"))
    assert saved(doc, tmp_path, "transports") == (14 * plots.DPI, 8 * plots.DPI)


# -- documents built the way the modules build them ------------------------------------------------------------
def nccl_doc() -> dict[str, Any]:
    """Shaped like bench_nccl.run's file: rows as nccl_worker writes them (bus bandwidth by its own _busbw)."""
    from sagellm_comm import bench_nccl

    rows = []
    for op in ("all_reduce", "all_gather"):
        for nbytes, ours_us, sync_us, pipe_us in ((8, 40.0, 25.0, 9.0), (1 << 20, 60.0, 50.0, 45.0),
                                                  (64 << 20, 900.0, 880.0, 870.0)):
            rows.append({"op": op, "bytes": nbytes, "iters": 20, "ours_us": ours_us, "torch_sync_us": sync_us,
                         "torch_pipelined_us": pipe_us,
                         "ours_busbw": bench_nccl._busbw(op, nbytes, 2, ours_us / 1e6),
                         "torch_busbw": bench_nccl._busbw(op, nbytes, 2, sync_us / 1e6),
                         "torch_pipelined_busbw": bench_nccl._busbw(op, nbytes, 2, pipe_us / 1e6), "path": "nccl"})
    return {"benchmark": "nccl", "command": ["bench", "nccl"], "machine": machine(), "world": 2,
            "gpu": "NVIDIA H100 80GB HBM3", "rows": rows, "all_ok": True}


def test_nccl_bandwidth_per_op_against_torch(tmp_path: Path) -> None:
    doc = nccl_doc()
    fig = plots.figure_for(doc)
    assert len(fig.axes) == 4  # (bandwidth, ratio) x 2 ops
    for op in ("all_reduce", "all_gather"):
        bw = panel(fig, f"{op}: bus bandwidth")
        assert labels(bw) == ["ours (awaited)", "torch NCCL + stream sync", "torch NCCL pipelined"]
        assert_log2_sizes(bw, [8, 1 << 20, 64 << 20])
        ratio = panel(fig, f"{op}: ours / torch")
        mine = [r for r in doc["rows"] if r["op"] == op]
        assert close(line(ratio, "ours / torch + sync")[1], [r["torch_sync_us"] / r["ours_us"] for r in mine])
        assert_parity_line(ratio)
    # all_reduce moves 2(n-1)/n of the bytes per link, all_gather (n-1)/n: same time, twice the bus bandwidth
    ar = line(panel(fig, "all_reduce: bus bandwidth"), "ours (awaited)")[1]
    ag = line(panel(fig, "all_gather: bus bandwidth"), "ours (awaited)")[1]
    assert close(ar, [2 * y for y in ag])
    assert "NVIDIA H100" in title_of(fig) and "world 2" in title_of(fig)
    assert saved(doc, tmp_path, "nccl")[0] > 0


def gpu_doc() -> dict[str, Any]:
    """Shaped like bench_gpu.run's file: event_latency rows, cpu, host_overhead, staged_p2p with two rings."""
    lat = [{"kernel_us": d, "raw_median_us": 3.0, "raw_p90_us": 4.0, "asyncio_median_us": 9.0 + d / 100,
            "asyncio_p90_us": 14.0, "trio_median_us": 11.0, "trio_p90_us": 17.0} for d in (0.0, 50.0, 500.0)]
    over = [{"world": 1, "backend": "asyncio", "path": "nccl", "torch_launch_us": 6.0, "torch_sync_us": 14.0,
             "ours_us": 21.0, "lane_launch_us": 7.0, "ours_over_torch_sync": 1.5, "ours_over_torch_launch": 3.5,
             "rounds": 20}]
    staged = []
    for ring, scale in (("64 MiB", 1.0), ("4 MiB", 0.6)):
        for nbytes, gbps in ((64 << 20, 9.0), (256 << 20, 11.0)):
            row = {"bytes": nbytes, "time_us": nbytes / (gbps * scale) / 1e3, "gbps": gbps * scale, "iters": 20,
                   "ok": True, "how": "shm", "pcie_h2d_gbps": 24.0, "pcie_d2h_gbps": 20.0}
            staged.append({**row, "ratio_to_pcie": row["gbps"] / 20.0, "ring": ring})
    return {"benchmark": "gpu", "command": ["bench", "gpu"], "machine": machine(), "gpus": ["NVIDIA H100"],
            "event_latency": lat, "cpu": {"idle_cpu_pct": 0.4, "long_wait_cpu_pct": 2.5, "long_wait_ms": 301.0},
            "host_overhead": over, "staged_p2p": staged, "all_ok": True}


def test_gpu_staging_against_pcie_latency_and_overhead(tmp_path: Path) -> None:
    doc = gpu_doc()
    fig = plots.figure_for(doc)
    staged = panel(fig, "CUDA -> CUDA")
    assert labels(staged) == ["ours host-staged (ring 64 MiB)", "ours host-staged (ring 4 MiB)",
                              "PCIe h2d (pinned copy)", "PCIe d2h (pinned copy)"]
    assert_log2_sizes(staged, [64 << 20, 256 << 20])
    ratio = panel(fig, "ours / slower of PCIe")
    assert close(line(ratio, "ring 4 MiB / PCIe")[1], [0.6 * 9.0 / 20, 0.6 * 11.0 / 20])
    assert_parity_line(ratio)
    lat = panel(fig, "completion latency")
    assert len(lat.patches) == 3 * 3  # three waiters x three kernel lengths
    heights = sorted(round(p.get_height(), 6) for p in lat.patches)  # type: ignore[attr-defined]
    assert heights[:3] == [3.0, 3.0, 3.0]  # the bare loop's medians
    over = panel(fig, "host overhead")
    assert sorted(p.get_height() for p in over.patches) == [6.0, 7.0, 14.0, 21.0]  # type: ignore[attr-defined]
    assert "idle CPU 0.40%" in title_of(fig)
    assert saved(doc, tmp_path, "gpu") == (14 * plots.DPI, 9 * plots.DPI)


class _Bf16Shape(bench_kv.Shape):
    """bench_kv.Shape without torch: its itemsize asks torch, and bfloat16 is 2 bytes."""

    @property
    def itemsize(self) -> int:
        return 2


def kv_doc() -> dict[str, Any]:
    """Shaped like bench_kv.run's file, rows made by bench_kv._rows from records like kv_worker's."""
    shape = _Bf16Shape(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    s = bench_kv.Settings(shape=shape, tokens=[64, 256], codecs=["none", "int8"], transports=["tcp"])
    results = []
    for tokens, raw_s in ((64, 60e-6), (256, 250e-6)):
        nbytes = shape.raw_bytes(tokens)
        kv = {codec: {"seconds": [raw_s * k, raw_s * k * 1.1], "first_seconds": [raw_s / 2] * 2,
                      "stats_seconds": [raw_s * k] * 2, "wire_bytes": nbytes // (2 if codec == "int8" else 1),
                      "raw_bytes": nbytes, "path": "stream", "ok": True}
              for codec, k in (("none", 4.0), ("int8", 10.0))}
        results.append(bench_kv._rows("tcp", s, {"tokens": tokens, "raw_seconds": [raw_s, raw_s],
                                                 "raw_first_seconds": [raw_s / 2] * 2, "raw_ok": True, "kv": kv}))
    ceil = {"64": {"memcpy_gbps": 50.0}, "256": {"memcpy_gbps": 70.0}}
    rows = [r for size in results for r in size["rows"]]
    return {"benchmark": "kv", "command": ["bench", "kv"], "machine": machine(),
            "settings": {**asdict(s), "bytes_per_token": shape.bytes_per_token, "budget_seconds": s.budget()},
            "rows": rows, "raw": [size["raw"] for size in results], "ceilings": ceil, "all_ok": True}


def test_kv_channel_against_the_bare_transport(tmp_path: Path) -> None:
    doc = kv_doc()
    fig = plots.figure_for(doc)
    bw = panel(fig, "prefill -> decode")
    assert labels(bw) == ["bare transport tcp (same bytes)", "KV channel none over tcp", "KV channel int8 over tcp",
                          "ceiling: memcpy of one layer (1 core)"]
    sizes = [64 * 1024, 256 * 1024]  # 2 layers x K,V x 64 B per token-head x 2 heads x tokens
    assert_log2_sizes(bw, sizes)
    none = [r for r in doc["rows"] if r["codec"] == "none"]
    assert close(line(bw, "KV channel none over tcp")[1], [r["kv_gbps"] for r in none])
    assert line(bw, "ceiling: memcpy of one layer (1 core)") == ([float(s) for s in sizes], [50.0, 70.0])
    ratio = panel(fig, "KV channel / bare transport")
    xs, ys = line(ratio, "int8 over tcp: KV / bare")
    assert xs == [float(s) for s in sizes] and close(ys, [1 / (10 * 1.05)] * 2)  # median of k and 1.1 k
    assert ratio.get_yscale() == "log"  # 0.095 next to parity: more than 8x, so the small ones stay readable
    assert_parity_line(ratio)
    assert "2 layers x 2 kv heads" in title_of(fig)
    assert saved(doc, tmp_path, "kv") == (10 * plots.DPI, 8 * plots.DPI)


def overlap_doc(timeline: bool = False) -> dict[str, Any]:
    """Shaped like bench_overlap.run's file: rank 0's medians (seconds), per-round medians, efficiencies."""
    rounds = {"compute": [0.010, 0.011], "comm": [0.006, 0.006], "sequential": [0.016, 0.017],
              "overlapped": [0.0115, 0.012]}
    res: dict[str, Any] = {k: statistics.median(v) for k, v in rounds.items()}
    res["efficiency"] = (res["sequential"] - res["overlapped"]) / min(res["compute"], res["comm"])
    res["overlap_report_efficiency"] = 0.8
    res["path"] = "nccl"
    res["rounds"] = rounds
    if timeline:
        res["timeline"] = [{"rank": r, "step": i, "wall": 0.012, "compute": [[0.0, 0.0105]],
                            "comm": [[0.0002, 0.004], [0.005, 0.0065]]} for r in (0, 1) for i in range(2)]
    spec = {"mode": "all-reduce", "world": 2, "hidden": 8192, "tokens": 256, "matmuls": 16,
            "comm_bytes": 64 << 20, "steps": 30, "rounds": 2, "backend": "asyncio", "gpu_per_rank": True,
            "port": 1}
    return {"benchmark": "overlap", "command": ["bench", "overlap"], "machine": machine(), "settings": spec,
            "result": res, "all_ok": True}


def test_overlap_step_times_and_efficiency(tmp_path: Path) -> None:
    doc = overlap_doc()
    r = doc["result"]
    fig = plots.figure_for(doc)
    steps = panel(fig, "one step of each loop")
    widths = [p.get_width() for p in steps.patches]  # type: ignore[attr-defined]
    assert close(widths, [r[k] * 1e3 for k in ("compute", "comm", "sequential", "overlapped")])
    assert [t.get_text() for t in steps.get_yticklabels()] == [
        "compute alone", "communication alone", "compute then comm", "in comm.overlap()"]
    ideal = [ln for ln in steps.get_lines() if ln.get_label() == "ideal overlap: max(compute, comm)"]
    assert len(ideal) == 1 and close([float(x) for x in ideal[0].get_xdata()], [10.5, 10.5])  # type: ignore[union-attr]
    eff = panel(fig, "overlap efficiency")
    assert close([p.get_height() for p in eff.patches], [r["efficiency"], 0.8])  # type: ignore[attr-defined]
    assert "64 MiB all_reduce" in title_of(fig)
    assert saved(doc, tmp_path, "overlap") == (12 * plots.DPI, 5 * plots.DPI)


def test_overlap_timeline_when_spans_are_recorded(tmp_path: Path) -> None:
    doc = overlap_doc(timeline=True)
    fig = plots.figure_for(doc)
    tl = panel(fig, "recorded spans")
    assert [t.get_text() for t in tl.get_yticklabels()] == ["rank 0 compute", "rank 0 comm", "rank 1 compute",
                                                           "rank 1 comm"]
    bars = tl.collections  # one broken_barh per row; steps laid end to end: the second starts at 12 ms
    assert len(bars) == 4
    comm0 = bars[1].get_paths()
    assert len(comm0) == 4  # two spans per step, two steps
    assert min(p.vertices[:, 0].min() for p in comm0[2:]) == pytest.approx(12.2)
    assert saved(doc, tmp_path, "overlap-timeline")[1] > 5 * plots.DPI


def soak_doc(with_seconds: bool = True) -> dict[str, Any]:
    """Shaped like bench_soak.run's file, samples taken by bench_soak.measure() in this process."""
    s = bench_soak.Settings(seconds=4.0, world=2, transport="tcp")
    ranks = []
    for rank in range(2):
        samples: dict[str, Any] = {"start": bench_soak.measure()}
        for i, label in enumerate(bench_soak.LABELS):
            sample = {**bench_soak.measure(), "label": label, "round": 100 * (i + 1),
                      "ops": {"all_reduce": 10 * (i + 1), "p2p_recv": 30 * (i + 1)}}
            if with_seconds:
                sample["seconds"] = 1.0 + 0.5 * i
            samples[label] = sample
        ranks.append({"rank": rank, "rounds": 500, "seconds": 4.0, "ops": {"all_reduce": 50, "p2p_recv": 150},
                      "expected_errors": {}, "unexpected_errors": {}, "wrong": 0, "notes": [], "cancels": {},
                      "aborted": "", "seconds_by_kind": {}, "samples": samples, "channel_counters": {},
                      "before_init": bench_soak.measure(), "after_close": bench_soak.measure()})
    tot = bench_soak.totals(ranks)
    why = bench_soak.failures(s, ranks)
    shown = bench_soak.SHOWN
    return {"benchmark": "soak", "command": ["bench", "soak"], "machine": machine(),
            "settings": {**asdict(s), "warmup": s.warmup_seconds()},
            "thresholds": {"rss_growth_mib": s.rss_limit_mib, "fd_growth": 0, "shm_segment_growth": 0},
            "totals": tot, "growth": [{k: bench_soak.growth(r, k) for k, _, _ in shown} | {"rank": r["rank"]}
                                      for r in ranks],
            "ranks": ranks, "failures": why, "ok": not why}


def test_soak_memory_and_throughput_over_time(tmp_path: Path) -> None:
    doc = soak_doc()
    fig = plots.figure_for(doc)
    mem = panel(fig, "memory at each sample")
    xs, ys = line(mem, "rank 1 RSS trimmed")
    assert xs == [1.0, 1.5, 2.0, 2.5, 3.0]  # the start sample has no time and is left out
    warm = doc["ranks"][1]["samples"]["warm"]
    assert ys[0] == warm["rss_trimmed"] / (1 << 20)
    limit = [ln for ln in mem.get_lines() if ln.get_label() == "rank 1 limit: warm + 32 MiB"]
    assert len(limit) == 1 and limit[0].get_ydata()[0] == warm["rss_trimmed"] / (1 << 20) + 32  # type: ignore[index]
    rate = panel(fig, "throughput")
    assert close(line(rate, "rank 0 rounds/s")[1], [200.0] * 4)  # 100 rounds per 0.5 s between samples
    assert close(line(rate, "rank 0 ops/s")[1], [80.0] * 4)
    ops = panel(fig, "ops done")
    assert [p.get_width() for p in ops.patches] == list(doc["totals"]["ops"].values())  # type: ignore[attr-defined]
    assert "2 ranks over tcp" in title_of(fig)
    assert saved(doc, tmp_path, "soak") == (14 * plots.DPI, 9 * plots.DPI)


def test_soak_without_timed_samples_is_a_bar_summary(tmp_path: Path) -> None:
    doc = soak_doc(with_seconds=False)
    fig = plots.figure_for(doc)
    assert [ax.get_title() for ax in fig.axes] == [
        "ops done (collectives once, messages and transfers by receivers)", "growth after the warm-up"]
    growth = panel(fig, "growth after the warm-up")
    want = [g["rss_trimmed"] / (1 << 20) for g in doc["growth"]]
    assert close([p.get_height() for p in growth.patches], want)  # type: ignore[attr-defined]
    assert [ln.get_ydata()[0] for ln in growth.get_lines()] == [32.0]  # type: ignore[index]
    assert saved(doc, tmp_path, "soak-bars") == (12 * plots.DPI, 5 * plots.DPI)


def cost_doc() -> dict[str, Any]:
    """Shaped like bench_cost.main's file: worker rows, summary by bench_cost.summarize."""
    rows = []
    for op, alts in (("all_reduce", ["ring"]), ("broadcast", [])):
        for nbytes, meas in ((4, 50e-6), (64 << 10, 80e-6), (16 << 20, 4e-3)):
            row: dict[str, Any] = {"op": op, "bytes": nbytes, "requested": nbytes, "algorithm": "recursive_doubling",
                                   "reason": "cost model", "predicted": meas * 1.1, "measured": meas, "iters": 10,
                                   "p10": meas * 0.9, "p90": meas * 1.2, "alternatives": []}
            for alg in alts:
                row["alternatives"].append({"algorithm": alg, "predicted": meas * 3, "measured": meas * 2,
                                            "iters": 10, "p10": meas * 1.8, "p90": meas * 2.2})
            rows.append(row)
    settings = {"world": 2, "transport": "shm", "backend": "asyncio", "model": "built-in defaults (shm)"}
    return {"benchmark": "cost_model", "command": ["bench", "cost-model"], "machine": machine(),
            "settings": settings, "summary": bench_cost.summarize(rows), "rows": rows, "model_fit": {}}


def test_cost_model_predicted_against_measured(tmp_path: Path) -> None:
    doc = cost_doc()
    fig = plots.figure_for(doc)
    assert len(fig.axes) == 4  # (times, error) x 2 ops
    ar = panel(fig, "all_reduce: median |error| 10.0%")
    assert labels(ar) == ["measured (chosen)", "predicted (chosen)", "measured ring (forced)", "predicted ring"]
    assert_log2_sizes(ar, [4, 64 << 10, 16 << 20])
    assert close(line(ar, "measured (chosen)")[1], [50.0, 80.0, 4000.0])
    err = panel(fig, "all_reduce: error")
    assert close(line(err, "chosen")[1], [10.0] * 3)
    assert close(line(err, "ring (forced)")[1], [50.0] * 3)
    assert labels(panel(fig, "broadcast: median")) == ["measured (chosen)", "predicted (chosen)"]
    assert "median |error| 10.0%" in title_of(fig)
    assert saved(doc, tmp_path, "cost")[1] == 8 * plots.DPI


# -- dispatch and errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "kind"), [(nccl_doc, "nccl"), (gpu_doc, "gpu"), (kv_doc, "kv"),
                                             (overlap_doc, "overlap"), (soak_doc, "soak"), (cost_doc, "cost_model")])
def test_the_kind_is_known_from_the_keys_alone(build: Any, kind: str) -> None:
    doc = build()
    assert plots.benchmark_kind(doc) == kind
    del doc["benchmark"]
    assert plots.benchmark_kind(doc) == kind


def test_an_unknown_document_names_its_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"keys: \['colour', 'shape'\]"):
        plots.plot_benchmark({"shape": 1, "colour": 2}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="'bogus'"):
        plots.figure_for({"benchmark": "bogus", "rows": []})
    assert not (tmp_path / "x.png").exists()


def test_a_malformed_document_is_a_value_error() -> None:
    doc = nccl_doc()
    del doc["rows"][0]["torch_busbw"]
    with pytest.raises(ValueError, match=r"malformed nccl.*torch_busbw"):
        plots.figure_for(doc)
    with pytest.raises(ValueError, match="no rows"):
        plots.figure_for({**nccl_doc(), "rows": []})


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'sagellm-comm\[plot\]'") as err:
        plots.figure_for(nccl_doc())
    assert isinstance(err.value, plots.PlotUnavailable)


def test_size_labels_read_like_the_tables() -> None:
    assert [plots.size_label(n) for n in (4, 65536, 1 << 20, 3 << 19, 1 << 30)] == [
        "4 B", "64 KiB", "1 MiB", "1.5 MiB", "1 GiB"]
