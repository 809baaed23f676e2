"""Pictures of the benchmarks' JSON documents (`--plot FILE.png`).

The plots are drawn from the document a benchmark writes with `--json`, never
from live objects, so a file measured last week on another host plots exactly
like one measured now, and drawing can neither change what a benchmark measures
nor slow it down. Every picture puts ours beside the peer the benchmark ran in
the same run (gloo, NCCL, the bare transport, a memcpy ceiling): an absolute
number from a shared box means little, the ratio next to it is the finding.

matplotlib is an optional extra: it is imported only here and only when a
picture is asked for, and only its object API is used (no pyplot, no global
backend switch), rendering through Agg, so a benchmark run headless, in a
thread or beside other matplotlib users behaves the same.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["INSTALL_HINT", "PlotUnavailable", "benchmark_kind", "figure_for", "machine_line", "plot_benchmark",
           "size_label"]

INSTALL_HINT = ("plotting needs matplotlib, which is not installed: "
                "pip install 'sagellm-comm[plot]' (or pip install matplotlib)")


class PlotUnavailable(ImportError):
    """matplotlib is missing: the benchmark's numbers are fine, only the picture cannot be drawn."""


def plot_benchmark(doc: dict[str, Any], path: str) -> None:
    """Write the picture of a benchmark's JSON document `doc` to `path` (PNG unless its suffix says otherwise).

    Raises PlotUnavailable (an ImportError) without matplotlib, and ValueError for a
    document that is not one of the benchmarks' (naming the keys it has).
    """
    fig = figure_for(doc)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)


def figure_for(doc: dict[str, Any]) -> Figure:
    """The Figure `plot_benchmark` saves, apart so tests and notebooks can look at its lines and axes."""
    kind = benchmark_kind(doc)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotUnavailable(INSTALL_HINT, name="matplotlib") from e
    width, height = _FIGSIZE[kind]
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig renders through Agg whatever backend pyplot has
    try:
        _BUILDERS[kind](fig, doc)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"malformed {kind} benchmark document ({type(e).__name__}: {e}); "
                         f"keys: {sorted(doc)}") from e
    return fig


def benchmark_kind(doc: dict[str, Any]) -> str:
    """Which benchmark wrote `doc`: its "benchmark" field, else the keys only that benchmark writes."""
    if not isinstance(doc, dict):
        raise ValueError(f"a benchmark document is a JSON object, not {type(doc).__name__}")
    name = str(doc.get("benchmark", "")).replace("-", "_")
    if name in _BUILDERS:
        return name
    keys = set(doc)
    first = _first_row(doc.get("rows"))
    result = doc.get("result")
    if isinstance(doc.get("results"), list) and "ours" in _first_row(doc["results"]):
        return "all_reduce"
    if {"all_reduce", "p2p"} <= keys:
        return "transports"
    if keys & {"staged_p2p", "event_latency", "host_overhead"}:
        return "gpu"
    if {"ranks", "totals"} <= keys:
        return "soak"
    if isinstance(result, dict) and "overlapped" in result:
        return "overlap"
    if "ours_busbw" in first:
        return "nccl"
    if "kv_gbps" in first:
        return "kv"
    if {"predicted", "measured"} <= set(first):
        return "cost_model"
    shown = f"benchmark {doc['benchmark']!r}, " if "benchmark" in doc else ""
    raise ValueError(f"not a benchmark document this can plot ({shown}keys: {sorted(keys)}); known benchmarks: "
                     + ", ".join(sorted(_BUILDERS)))


def _first_row(rows: Any) -> dict[str, Any]:
    return rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}


# -- shared pieces ------------------------------------------------------------------------------------
DPI = 110
PARITY = "_parity"  # the label of the 1.0 line on ratio panels (leading "_": kept out of legends)
_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size_label(n: float) -> str:
    """4 B, 64 KiB, 1.5 MiB: how the benchmarks' tables spell sizes."""
    for unit, scale in _UNITS:
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def _num(x: Any) -> float | None:
    """A plottable number, or None for a missing, null or NaN cell (a size the peer did not run)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _series(ax: Axes, xs: Sequence[float], ys: Sequence[Any], label: str, *, positive: bool = True,
            **style: Any) -> None:
    """One line, skipping the points a log axis cannot show or the document does not have."""
    pts = [(x, v) for x, y in zip(xs, ys, strict=True) if (v := _num(y)) is not None and (v > 0 or not positive)]
    if not pts:
        return
    style.setdefault("marker", "o")
    style.setdefault("markersize", 4)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)


def _size_axis(ax: Axes, sizes: Iterable[float], label: str = "message size") -> None:
    """log2 x axis with a tick at each measured size (thinned when crowded), labelled like the tables."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted({float(s) for s in sizes if s and s > 0})
    step = max(1, math.ceil(len(ticks) / 10))
    ticks = ticks[::step]
    if ticks:
        ax.set_xticks(ticks, [size_label(t) for t in ticks], rotation=45 if len(ticks) > 5 else 0,
                      ha="right" if len(ticks) > 5 else "center")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"{label} (log2)")
    ax.grid(True, which="major", alpha=0.3)


def _bandwidth_axes(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(f"{ylabel} (GB/s, log)")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _ratio_axes(ax: Axes, title: str, ylabel: str) -> None:
    """A ratio panel: the parity line at 1.0, so above/below reads as faster/slower at a glance.

    Linear from 0 while the ratios are within 8x of parity; log beyond, where a
    linear axis would flatten the small ones (a 0.01 next to a 3) onto the floor.
    """
    ys = [np.asarray(line.get_ydata(), dtype=float).ravel() for line in ax.get_lines()]
    vals = [float(v) for y in ys for v in y if v > 0]
    if vals and max(max(vals), 1.0) / min(min(vals), 1.0) > 8:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1, label=PARITY)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _nothing(ax: Axes, text: str) -> None:
    """A panel the document has no data for says so, instead of vanishing (the layout stays the same)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _when(doc: dict[str, Any]) -> str:
    raw = (doc.get("machine") or {}).get("date")
    if not raw:
        return "date unknown"
    try:
        t = _dt.datetime.fromisoformat(str(raw))
    except ValueError:
        return str(raw)
    if t.tzinfo is not None:
        t = t.astimezone(_dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo is not None else "")


def machine_line(doc: dict[str, Any]) -> str:
    """Where and when: the numbers of a 2-core VM and of an 8-GPU node must never be mistaken for each other."""
    m = doc.get("machine") or {}
    parts = []
    gpus = doc.get("gpus") or ([doc["gpu"]] if doc.get("gpu") else []) or ([m["gpu"]] if m.get("gpu") else [])
    if gpus:
        parts.append(f"{len(gpus)} x {gpus[0]}" if len(gpus) > 1 else str(gpus[0]))
    cpu = ", ".join(str(x) for x in (m.get("processor"), f"{m['cpu_count']} CPUs" if m.get("cpu_count") else None)
                    if x)
    if cpu:
        parts.append(cpu)
    if m.get("platform"):
        parts.append(" ".join(str(m["platform"]).split("-")[:2]))
    versions = [f"{k} {m[k]}" for k in ("python", "torch", "sagellm_comm") if m.get(k)]
    if versions:
        parts.append(", ".join(versions))
    parts.append(_when(doc))
    return " | ".join(parts)


def _suptitle(fig: Figure, doc: dict[str, Any], headline: str) -> None:
    width = max(60, int(fig.get_figwidth() * 11))  # characters of an 11 pt title that fit the figure
    fig.suptitle("\n".join([*textwrap.wrap(headline, width), *textwrap.wrap(machine_line(doc), width)]),
                 fontsize=11)


def _band(ax: Axes, xs: Sequence[float], lo: Sequence[Any], hi: Sequence[Any], **style: Any) -> None:
    """The p10-p90 spread around a median line: how far one run's number can be trusted."""
    pts = [(x, a, b) for x, a_, b_ in zip(xs, lo, hi, strict=True)
           if (a := _num(a_)) is not None and (b := _num(b_)) is not None and a > 0 and b > 0]
    if len(pts) > 1:
        ax.fill_between([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], alpha=0.15,
                        linewidth=0, **style)


# -- all_reduce ---------------------------------------------------------------------------------------
def _bw_spread(m: dict[str, Any] | None, key: str) -> tuple[float | None, float | None]:
    """Bandwidth at the p90 and p10 times (same bytes, so bandwidth scales with 1/time)."""
    if not m or _num(m.get(key)) is None or not m.get("p10_time_us") or not m.get("p90_time_us"):
        return None, None
    bw, t = float(m[key]), float(m["time_us"])
    return bw * t / float(m["p90_time_us"]), bw * t / float(m["p10_time_us"])


def _all_reduce(fig: Figure, doc: dict[str, Any]) -> None:
    rows = doc["results"]
    if not rows:
        raise ValueError("the all_reduce document has no results to plot")
    s = doc.get("settings") or {}
    key = "busbw_gbps" if "busbw_gbps" in rows[0]["ours"] else "algbw_gbps"
    sizes = [float(r["size_bytes"]) for r in rows]
    has_gloo = any(r.get("gloo") for r in rows)
    gs = fig.add_gridspec(2 if has_gloo else 1, 1, height_ratios=[3, 2] if has_gloo else [1])
    ax = fig.add_subplot(gs[0, 0])
    sides = [("ours", f"ours (sagellm-comm, {s.get('backend', '?')})", "C0")]
    if has_gloo:
        sides.append(("gloo", "gloo (torch.distributed)", "C1"))
    for side, label, color in sides:
        ms = [r.get(side) for r in rows]
        _series(ax, sizes, [m[key] if m else None for m in ms], label, color=color)
        spread = [_bw_spread(m, key) for m in ms]
        _band(ax, sizes, [a for a, _ in spread], [b for _, b in spread], color=color)
    bw = "bus bandwidth" if key == "busbw_gbps" else "algorithm bandwidth"
    _size_axis(ax, sizes)
    _bandwidth_axes(ax, f"all_reduce float32 sum, {bw} (median; band p10-p90)", bw)
    if has_gloo:
        rx = fig.add_subplot(gs[1, 0], sharex=ax)
        _series(rx, sizes, [r.get("busbw_ratio") for r in rows], "ours / gloo bus bandwidth", color="C2")
        _size_axis(rx, sizes)
        _ratio_axes(rx, "ours / gloo (above 1: ours faster)", "ratio")
    peer = " vs gloo" if has_gloo else ""
    _suptitle(fig, doc, f"bench all-reduce: sagellm-comm{peer}, world {s.get('world', '?')}, "
                        f"transport {s.get('transport', 'auto')}")


# -- transports ---------------------------------------------------------------------------------------
def _transports(fig: Figure, doc: dict[str, Any]) -> None:
    s = doc.get("settings") or {}
    ar: dict[str, list[dict[str, Any]]] = doc["all_reduce"]["ours"] or {}
    gloo: list[dict[str, Any]] | None = doc["all_reduce"].get("gloo")
    p2p: dict[str, list[dict[str, Any]]] = doc["p2p"] or {}
    memcpy = {int(k): float(v) for k, v in (doc.get("memcpy_gbps") or {}).items()}
    if not ar and not p2p:
        raise ValueError("the transports document has no measurements to plot")
    gs = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    names = list(dict.fromkeys([*ar, *p2p]))
    color = {t: f"C{i}" for i, t in enumerate(names)}

    ax, rx = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0])
    ar_sizes = sorted({float(m["bytes"]) for rows in ar.values() for m in rows})
    gloo_bw = {int(g["bytes"]): g["busbw_gbps"] for g in gloo or []}
    for t, rows in ar.items():
        xs = [float(m["bytes"]) for m in rows]
        _series(ax, xs, [m["busbw_gbps"] for m in rows], f"ours over {t}", color=color[t])
        if gloo:
            _series(rx, xs, [m["busbw_gbps"] / gloo_bw[int(m["bytes"])] if gloo_bw.get(int(m["bytes"])) else None
                             for m in rows], f"{t} / gloo", color=color[t])
    if gloo:
        _series(ax, [float(g["bytes"]) for g in gloo], [g["busbw_gbps"] for g in gloo], "gloo (torch.distributed)",
                color="k", linestyle="--")
    _size_axis(ax, ar_sizes)
    _bandwidth_axes(ax, "all_reduce float32 sum, 2 processes: bus bandwidth", "bus bandwidth")
    if gloo:
        _size_axis(rx, ar_sizes)
        _ratio_axes(rx, "ours / gloo bus bandwidth (above 1: ours faster)", "ratio")
    else:
        _nothing(rx, "no gloo comparison in this run")

    bx, qx = fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, 1])
    p2p_sizes = sorted({float(m["bytes"]) for rows in p2p.values() for m in rows})
    for t, rows in p2p.items():
        xs = [float(m["bytes"]) for m in rows]
        _series(bx, xs, [m["gbps"] for m in rows], f"ours over {t}", color=color[t])
        if memcpy:
            _series(qx, xs, [m["gbps"] / memcpy[int(m["bytes"])] if memcpy.get(int(m["bytes"])) else None
                             for m in rows], f"{t} / memcpy", color=color[t])
    if memcpy:
        cs = sorted(memcpy)
        _series(bx, [float(c) for c in cs], [memcpy[c] for c in cs], "memcpy (1 core, the copy ceiling)",
                color="k", linestyle="--")
    _size_axis(bx, p2p_sizes)
    _bandwidth_axes(bx, "point-to-point one-way, 2 processes", "bandwidth")
    if memcpy:
        _size_axis(qx, p2p_sizes)
        _ratio_axes(qx, "ours / single-core memcpy", "ratio")
    else:
        _nothing(qx, "no memcpy ceiling in this run")
    _suptitle(fig, doc, f"bench transports: {', '.join(names)} side by side"
                        f"{' vs gloo' if gloo else ''}, {s.get('backend', '?')}")


# -- nccl -----------------------------------------------------------------------------------------------
def _nccl(fig: Figure, doc: dict[str, Any]) -> None:
    rows = doc["rows"]
    if not rows:
        raise ValueError("the nccl document has no rows to plot")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig.set_size_inches(max(10.0, 4.2 * len(ops)), 8.0)
    gs = fig.add_gridspec(2, len(ops), height_ratios=[3, 2])
    for i, op in enumerate(ops):
        mine = [r for r in rows if r["op"] == op]
        xs = [float(r["bytes"]) for r in mine]
        ax = fig.add_subplot(gs[0, i])
        _series(ax, xs, [r["ours_busbw"] for r in mine], "ours (awaited)", color="C0")
        _series(ax, xs, [r["torch_busbw"] for r in mine], "torch NCCL + stream sync", color="C1")
        _series(ax, xs, [r.get("torch_pipelined_busbw") for r in mine], "torch NCCL pipelined", color="C1",
                linestyle=":")
        _size_axis(ax, xs, "total bytes")
        _bandwidth_axes(ax, f"{op}: bus bandwidth", "bus bandwidth")
        rx = fig.add_subplot(gs[1, i], sharex=ax)
        _series(rx, xs, [r["ours_busbw"] / r["torch_busbw"] if r["torch_busbw"] else None for r in mine],
                "ours / torch + sync", color="C0")
        _series(rx, xs, [r["ours_busbw"] / r["torch_pipelined_busbw"] if r.get("torch_pipelined_busbw") else None
                         for r in mine], "ours / torch pipelined", color="C0", linestyle=":")
        _size_axis(rx, xs, "total bytes")
        _ratio_axes(rx, f"{op}: ours / torch (above 1: ours faster)", "ratio")
    path = rows[0].get("path", "?")
    _suptitle(fig, doc, f"bench nccl: awaited collectives vs torch.distributed NCCL, world {doc.get('world', '?')} "
                        f"({path})")


# -- gpu ---------------------------------------------------------------------------------------------------
def _gpu(fig: Figure, doc: dict[str, Any]) -> None:
    gs = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    staged: list[dict[str, Any]] = doc.get("staged_p2p") or []
    ax, rx = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0])
    rings = list(dict.fromkeys(str(r.get("ring", "default")) for r in staged))
    sizes = sorted({float(r["bytes"]) for r in staged})
    for i, ring in enumerate(rings):
        mine = [r for r in staged if str(r.get("ring", "default")) == ring]
        xs = [float(r["bytes"]) for r in mine]
        _series(ax, xs, [r["gbps"] for r in mine], f"ours host-staged (ring {ring})", color=f"C{i}")
        _series(rx, xs, [r.get("ratio_to_pcie") for r in mine], f"ring {ring} / PCIe", color=f"C{i}")
    if staged:
        first = [r for r in staged if str(r.get("ring", "default")) == rings[0]]
        xs = [float(r["bytes"]) for r in first]
        _series(ax, xs, [r.get("pcie_h2d_gbps") for r in first], "PCIe h2d (pinned copy)", color="k",
                linestyle="--")
        _series(ax, xs, [r.get("pcie_d2h_gbps") for r in first], "PCIe d2h (pinned copy)", color="k",
                linestyle=":")
        _size_axis(ax, sizes)
        _bandwidth_axes(ax, "CUDA -> CUDA between 2 processes on one GPU (host-staged, no NCCL)", "bandwidth")
        _size_axis(rx, sizes)
        _ratio_axes(rx, "ours / slower of PCIe h2d, d2h", "ratio")
    else:
        _nothing(ax, "no host-staged transfers in this document")
        _nothing(rx, "")

    lx = fig.add_subplot(gs[0, 1])
    lat: list[dict[str, Any]] = doc.get("event_latency") or []
    kinds = [(k, label) for k, label in (("raw", "bare query() loop"), ("asyncio", "ours, asyncio"),
                                        ("trio", "ours, trio")) if any(f"{k}_median_us" in r for r in lat)]
    width = 0.8 / max(1, len(kinds))
    for j, (k, label) in enumerate(kinds):
        med = [_num(r.get(f"{k}_median_us")) or 0.0 for r in lat]
        p90 = [_num(r.get(f"{k}_p90_us")) or 0.0 for r in lat]
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(lat))]
        lx.bar(xs, med, width, label=f"{label} (median, whisker p90)", color=f"C{j}",
               yerr=[[0.0] * len(med), [max(0.0, b - a) for a, b in zip(med, p90, strict=True)]], capsize=2)
    if lat:
        lx.set_xticks(range(len(lat)), [f"{float(r['kernel_us']):g} us" for r in lat])
        lx.set_xlabel("kernel length")
        lx.set_ylabel("GPU finish -> waiter resumes (us)")
        lx.set_title("completion latency (lower is better)", fontsize=10)
        lx.legend(fontsize=8)
    else:
        _nothing(lx, "no completion-latency rows")

    ox = fig.add_subplot(gs[1, 1])
    over: list[dict[str, Any]] = doc.get("host_overhead") or []
    parts = [("torch_launch_us", "torch launch only"), ("torch_sync_us", "torch + stream sync"),
             ("ours_us", "ours awaited"), ("lane_launch_us", "our process group's launch")]
    width = 0.8 / len(parts)
    for j, (k, label) in enumerate(parts):
        xs = [i + (j - (len(parts) - 1) / 2) * width for i in range(len(over))]
        ox.bar(xs, [_num(o.get(k)) or 0.0 for o in over], width, label=label, color=f"C{j}")
    if over:
        ox.set_xticks(range(len(over)), [f"world {o.get('world', '?')} ({o.get('path', '?')})" for o in over])
        ox.set_ylabel("host time per 8 B all_reduce (us)")
        ox.set_title("host overhead on CUDA (medians of rounds)", fontsize=10)
        ox.legend(fontsize=8)
    else:
        _nothing(ox, "no host-overhead rows")
    cpu = doc.get("cpu") or {}
    extra = (f"; idle CPU {cpu['idle_cpu_pct']:.2f}%, during a long wait {cpu['long_wait_cpu_pct']:.1f}%"
             if "idle_cpu_pct" in cpu and "long_wait_cpu_pct" in cpu else "")
    _suptitle(fig, doc, f"bench gpu: host-staged transfers vs PCIe, completion latency, host overhead vs NCCL{extra}")


# -- kv ---------------------------------------------------------------------------------------------------
def _kv(fig: Figure, doc: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = doc["rows"]
    if not rows:
        raise ValueError("the kv document has no rows to plot")
    s = doc.get("settings") or {}
    shape = s.get("shape") or {}
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 2])
    ax = fig.add_subplot(gs[0, 0])
    rx = fig.add_subplot(gs[1, 0], sharex=ax)
    transports = list(dict.fromkeys(r["transport"] for r in rows))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    sizes = sorted({float(r["raw_bytes"]) for r in rows})
    styles = ["-", "--", "-.", ":"]
    for i, t in enumerate(transports):
        mine = [r for r in rows if r["transport"] == t]
        raw = {float(r["raw_bytes"]): r["raw_gbps"] for r in mine}
        xs = sorted(raw)
        _series(ax, xs, [raw[x] for x in xs], f"bare transport {t} (same bytes)", color="k",
                linestyle=styles[i % len(styles)], marker="s")
        for j, codec in enumerate(codecs):
            cr = [r for r in mine if r["codec"] == codec]
            if not cr:
                continue
            cx = [float(r["raw_bytes"]) for r in cr]
            style: dict[str, Any] = {"color": f"C{j}", "linestyle": styles[i % len(styles)]}
            _series(ax, cx, [r["kv_gbps"] for r in cr], f"KV channel {codec} over {t}", **style)
            _series(rx, cx, [r["kv_over_raw"] for r in cr], f"{codec} over {t}: KV / bare", **style)
    tokens_bytes = {str(r["tokens"]): float(r["raw_bytes"]) for r in rows}
    ceil: dict[str, dict[str, float]] = doc.get("ceilings") or {}
    names = {"memcpy_gbps": "memcpy of one layer (1 core)", "d2d_gbps": "device copy (d2d)",
             "h2d_gbps": "pinned h2d copy", "d2h_gbps": "pinned d2h copy"}
    for k, label in names.items():
        pts = sorted((tokens_bytes[t], c[k]) for t, c in ceil.items() if k in c and t in tokens_bytes)
        if pts:
            _series(ax, [p[0] for p in pts], [p[1] for p in pts], f"ceiling: {label}", color="0.55",
                    linestyle=":", marker="x")
    _size_axis(ax, sizes, "request KV bytes")
    _bandwidth_axes(ax, "prefill -> decode transfer: raw KV bytes / receiver's seconds (medians)", "bandwidth")
    _size_axis(rx, sizes, "request KV bytes")
    _ratio_axes(rx, "KV channel / bare transport (1.0: the channel adds nothing)", "ratio")
    layout = (f"{shape.get('num_layers', '?')} layers x {shape.get('num_kv_heads', '?')} kv heads x head dim "
              f"{shape.get('head_dim', '?')}, {shape.get('dtype', '?')}")
    _suptitle(fig, doc, f"bench kv: KV channel vs the bare transport ({', '.join(transports)}), caches on "
                        f"{s.get('device', '?')}; {layout}; block ids {s.get('ids', '?')}")


# -- overlap ------------------------------------------------------------------------------------------------
def _overlap(fig: Figure, doc: dict[str, Any]) -> None:
    r = doc["result"]
    s = doc.get("settings") or {}
    timeline = r.get("timeline") or []
    if timeline:
        fig.set_size_inches(12.0, 8.5)
    gs = fig.add_gridspec(2 if timeline else 1, 2, width_ratios=[3, 1])
    tx = fig.add_subplot(gs[0, 0])
    loops = [("compute", "compute alone"), ("comm", "communication alone"), ("sequential", "compute then comm"),
             ("overlapped", "in comm.overlap()")]
    present = [(k, label) for k, label in loops if _num(r.get(k)) is not None]
    if not present:
        raise ValueError(f"the overlap result has none of {[k for k, _ in loops]}")
    ys = list(range(len(present)))[::-1]
    ms = [float(r[k]) * 1e3 for k, _ in present]
    tx.barh(ys, ms, color=[f"C{i}" for i in range(len(present))], height=0.6)
    right = max(ms)
    for y, (k, _), m in zip(ys, present, ms, strict=True):
        rounds = [v * 1e3 for v in (r.get("rounds") or {}).get(k, []) if _num(v) is not None]
        if rounds:
            tx.plot(rounds, [y] * len(rounds), linestyle="", marker="|", color="k", markersize=10,
                    label="median of each round" if k == present[0][0] else "_rounds")
        end = max([m, *rounds])
        right = max(right, end)
        tx.text(end, y, f"  {m:.3f} ms", va="center", fontsize=8)
    tx.set_xlim(0, right * 1.4)  # room for the numbers and the legend right of the longest bar
    if _num(r.get("compute")) is not None and _num(r.get("comm")) is not None:
        best = max(float(r["compute"]), float(r["comm"])) * 1e3
        tx.axvline(best, color="0.3", linestyle="--", linewidth=1, label="ideal overlap: max(compute, comm)")
    tx.set_yticks(ys, [label for _, label in present])
    tx.set_xlabel("time per step (ms, median)")
    tx.set_title("one step of each loop", fontsize=10)
    tx.legend(fontsize=8, loc="upper right")

    ex = fig.add_subplot(gs[0, 1])
    effs = [("efficiency", "(sequential - overlapped)\n/ min(compute, comm)"),
            ("overlap_report_efficiency", "overlap() report:\nhidden / min(spans)")]
    vals = [_num(r.get(k)) for k, _ in effs]
    ex.bar(range(len(effs)), [v if v is not None else 0.0 for v in vals], color=["C4", "C5"])
    for i, v in enumerate(vals):
        ex.text(i, (v or 0.0), "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    ex.axhline(1.0, color="0.35", linestyle="--", linewidth=1, label=PARITY)
    ex.set_xticks(range(len(effs)), [label for _, label in effs], fontsize=7)
    ex.set_ylim(0, max(1.1, *(v + 0.1 for v in vals if v is not None)))
    ex.set_ylabel("hidden fraction of the shorter side")
    ex.set_title("overlap efficiency (1.0: fully hidden)", fontsize=10)

    if timeline:
        _timeline(fig.add_subplot(gs[1, :]), timeline)
    what = "all_reduce" if s.get("mode") == "all-reduce" else "D2H offload"
    comm_bytes = s.get("comm_bytes")
    _suptitle(fig, doc, f"bench overlap: {s.get('mode', '?')} (world {s.get('world', '?')}, {r.get('path', '?')}); "
                        f"{s.get('matmuls', '?')} matmuls ({s.get('tokens', '?')}x{s.get('hidden', '?')}) + "
                        f"{size_label(nbytes) if (nbytes := _num(comm_bytes)) else '?'} {what} per step")


def _timeline(ax: Axes, steps: list[dict[str, Any]]) -> None:
    """Recorded spans, one row per rank and kind: [{"rank", "step", "compute": [[t0, t1], ...], "comm": [...]}],
    times in seconds from the start of the step's overlap block."""
    rows: dict[tuple[int, str], list[tuple[float, float]]] = {}
    offset: dict[int, float] = {}  # per rank: its steps one after another, so several steps read as a timeline
    for step in steps:
        rank = int(step.get("rank", 0))
        start = offset.get(rank, 0.0)
        spans = [(float(a), float(b)) for kind in ("compute", "comm") for a, b in step.get(kind, [])]
        for kind in ("compute", "comm"):
            rows.setdefault((rank, kind), []).extend(
                (start + float(a), float(b) - float(a)) for a, b in step.get(kind, []))
        offset[rank] = start + max([float(step.get("wall", 0.0))] + [b for _, b in spans])
    keys = sorted(rows, key=lambda k: (k[0], k[1] != "compute"))
    for y, key in enumerate(keys):
        ax.broken_barh([(a * 1e3, w * 1e3) for a, w in rows[key]], (y - 0.35, 0.7),
                       color="C0" if key[1] == "compute" else "C1", label=key[1])
    ax.set_yticks(range(len(keys)), [f"rank {rank} {kind}" for rank, kind in keys])
    ax.invert_yaxis()  # rank 0 on top, like the step panel's first loop
    ax.set_xlabel("time (ms, steps laid end to end)")
    ax.set_title("recorded spans of overlapped steps", fontsize=10)


# -- soak ------------------------------------------------------------------------------------------------------
def _soak(fig: Figure, doc: dict[str, Any]) -> None:
    ranks: list[dict[str, Any]] = doc["ranks"]
    s = doc.get("settings") or {}
    timed = [(r, sorted((v for v in r.get("samples", {}).values() if _num(v.get("seconds")) is not None),
                        key=lambda v: float(v["seconds"]))) for r in ranks]
    has_time = any(len(samples) > 1 for _, samples in timed)
    if not has_time:
        fig.set_size_inches(12.0, 5.0)
    gs = fig.add_gridspec(2, 2) if has_time else fig.add_gridspec(1, 2)
    if has_time:
        mx, px, fx = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, 0])
        limit = _num((doc.get("thresholds") or {}).get("rss_growth_mib"))
        for r, samples in timed:
            c = f"C{int(r['rank']) % 10}"
            ts = [float(v["seconds"]) for v in samples]
            _series(mx, ts, [v.get("rss", 0) / (1 << 20) for v in samples], f"rank {r['rank']} RSS", color=c,
                    linestyle=":")
            _series(mx, ts, [v.get("rss_trimmed", 0) / (1 << 20) for v in samples], f"rank {r['rank']} RSS trimmed",
                    color=c)
            warm = r.get("samples", {}).get("warm")
            if limit is not None and warm and _num(warm.get("rss_trimmed")) is not None:
                mx.axhline(warm["rss_trimmed"] / (1 << 20) + limit, color=c, linestyle="--", linewidth=0.8,
                           label=f"rank {r['rank']} limit: warm + {limit:g} MiB")
            pairs = [(a, b) for a, b in itertools.pairwise(samples) if float(b["seconds"]) > float(a["seconds"])]
            ends = [float(b["seconds"]) for _, b in pairs]
            spans = [float(b["seconds"]) - float(a["seconds"]) for a, b in pairs]
            _series(px, ends, [(_ops(b) - _ops(a)) / d if "ops" in a and "ops" in b else None
                               for (a, b), d in zip(pairs, spans, strict=True)], f"rank {r['rank']} ops/s", color=c)
            _series(px, ends, [(int(b.get("round", 0)) - int(a.get("round", 0))) / d
                               for (a, b), d in zip(pairs, spans, strict=True)],
                    f"rank {r['rank']} rounds/s", color=c, linestyle="--", marker="s")
            for key, style in (("fds", "-"), ("shm_segments", "--"), ("threads", ":")):
                _series(fx, ts, [v.get(key) for v in samples], f"rank {r['rank']} {key}", positive=False, color=c,
                        linestyle=style)
        mx.set_xlabel("seconds since init")
        mx.set_ylabel("MiB")
        mx.set_title("memory at each sample (nothing in flight)", fontsize=10)
        mx.legend(fontsize=7)
        px.set_xlabel("seconds since init")
        px.set_ylabel("per second, between samples")
        px.set_title("throughput (a leak or a stall shows as a fall)", fontsize=10)
        px.legend(fontsize=7)
        fx.set_xlabel("seconds since init")
        fx.set_ylabel("count")
        fx.set_title("open fds, shm segments, threads", fontsize=10)
        fx.legend(fontsize=7)
        bx = fig.add_subplot(gs[1, 1])
    else:
        bx = fig.add_subplot(gs[0, 0])
        _soak_growth(fig.add_subplot(gs[0, 1]), doc)
    ops: dict[str, int] = (doc.get("totals") or {}).get("ops") or {}
    if ops:
        names = list(ops)
        bx.barh(range(len(names)), [ops[n] for n in names], color="C0")
        bx.set_yticks(range(len(names)), names, fontsize=8)
        bx.invert_yaxis()
        bx.set_xlabel("count over the run")
        bx.set_title("ops done (collectives once, messages and transfers by receivers)", fontsize=10)
    else:
        _nothing(bx, "no totals in this document")
    verdict = "PASS" if doc.get("ok") else "FAIL: " + "; ".join(doc.get("failures") or ["see the document"])
    _suptitle(fig, doc, f"bench soak: {s.get('world', '?')} ranks over {s.get('transport', '?')}, "
                        f"{s.get('backend', '?')}, {_num(s.get('seconds')) or 0:g} s, "
                        f"{(doc.get('totals') or {}).get('rounds', '?')} rounds - {verdict[:120]}")


def _soak_growth(ax: Axes, doc: dict[str, Any]) -> None:
    """Without samples over time, the verdict's own numbers: each rank's growth from warm-up to end."""
    growth: list[dict[str, Any]] = doc.get("growth") or []
    if not growth:
        _nothing(ax, "no growth figures in this document")
        return
    ranks = [f"rank {g.get('rank', i)}" for i, g in enumerate(growth)]
    mib = [(_num(g.get("rss_trimmed")) or 0.0) / (1 << 20) for g in growth]
    ax.bar(range(len(growth)), mib, color="C0")
    for i, g in enumerate(growth):
        ax.text(i, mib[i], f"fds {g.get('fds')}, shm {g.get('shm_segments')}", ha="center", va="bottom", fontsize=8)
    limit = _num((doc.get("thresholds") or {}).get("rss_growth_mib"))
    if limit is not None:
        ax.axhline(limit, color="C3", linestyle="--", linewidth=1, label=f"limit {limit:g} MiB")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(growth)), ranks)
    ax.set_ylabel("RSS after malloc_trim, end - warm (MiB)")
    ax.set_title("growth after the warm-up", fontsize=10)


def _ops(sample: dict[str, Any]) -> int:
    return sum(int(v) for v in (sample.get("ops") or {}).values())


# -- cost model ---------------------------------------------------------------------------------------------------
def _err(pred: Any, meas: Any) -> float | None:
    p, m = _num(pred), _num(meas)
    return (p / m - 1.0) * 100 if p is not None and m else None


def _cost_model(fig: Figure, doc: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = doc["rows"]
    if not rows:
        raise ValueError("the cost_model document has no rows to plot")
    s = doc.get("settings") or {}
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig.set_size_inches(max(10.0, 4.2 * len(ops)), 8.0)
    gs = fig.add_gridspec(2, len(ops), height_ratios=[3, 2])
    per_op = (doc.get("summary") or {}).get("per_op") or {}
    for i, op in enumerate(ops):
        mine = sorted((r for r in rows if r["op"] == op), key=lambda r: int(r["bytes"]))
        xs = [float(r["bytes"]) for r in mine]
        ax = fig.add_subplot(gs[0, i])
        ex = fig.add_subplot(gs[1, i], sharex=ax)
        _series(ax, xs, [r["measured"] * 1e6 for r in mine], "measured (chosen)", color="C0")
        _band(ax, xs, [_scaled(r.get("p10")) for r in mine], [_scaled(r.get("p90")) for r in mine], color="C0")
        _series(ax, xs, [r["predicted"] * 1e6 for r in mine], "predicted (chosen)", color="C0", linestyle="--",
                marker="x")
        _series(ex, xs, [_err(r["predicted"], r["measured"]) for r in mine], "chosen", positive=False, color="C0")
        alts = list(dict.fromkeys(a["algorithm"] for r in mine for a in r.get("alternatives", [])))
        for j, alg in enumerate(alts, start=1):
            pts = [(float(r["bytes"]), a) for r in mine for a in r.get("alternatives", []) if a["algorithm"] == alg]
            ax_ = [p[0] for p in pts]
            _series(ax, ax_, [_scaled(a.get("measured")) for _, a in pts], f"measured {alg} (forced)",
                    color=f"C{j}", markersize=3)
            _series(ax, ax_, [_scaled(a.get("predicted")) for _, a in pts], f"predicted {alg}", color=f"C{j}",
                    linestyle="--", marker="x", markersize=3)
            _series(ex, ax_, [_err(a.get("predicted"), a.get("measured")) for _, a in pts], f"{alg} (forced)",
                    positive=False, color=f"C{j}", markersize=3)
        _size_axis(ax, xs)
        ax.set_yscale("log")
        ax.set_ylabel("time (us, log)")
        med = _num(per_op.get(op))
        ax.set_title(f"{op}" + (f": median |error| {med * 100:.1f}%" if med is not None else ""), fontsize=10)
        ax.legend(fontsize=7)
        _size_axis(ex, xs)
        ex.axhline(0.0, color="0.35", linestyle="--", linewidth=1, label=PARITY)
        ex.set_ylabel("predicted / measured - 1 (%)")
        ex.set_title(f"{op}: error", fontsize=10)
    total = _num((doc.get("summary") or {}).get("median_abs_error"))
    _suptitle(fig, doc, f"bench cost-model: predicted vs measured, world {s.get('world', '?')} over "
                        f"{s.get('transport', '?')}, model: {s.get('model', '?')}"
                        + (f"; median |error| {total * 100:.1f}%" if total is not None else ""))


def _scaled(seconds: Any) -> float | None:
    v = _num(seconds)
    return None if v is None else v * 1e6


# -- dispatch -------------------------------------------------------------------------------------------------------
_BUILDERS: dict[str, Callable[[Figure, dict[str, Any]], None]] = {
    "all_reduce": _all_reduce, "transports": _transports, "nccl": _nccl, "gpu": _gpu, "kv": _kv,
    "overlap": _overlap, "soak": _soak, "cost_model": _cost_model,
}
_FIGSIZE: dict[str, tuple[float, float]] = {
    "all_reduce": (9, 7), "transports": (14, 8), "nccl": (15, 8), "gpu": (14, 9), "kv": (10, 8),
    "overlap": (12, 5), "soak": (14, 9), "cost_model": (20, 8),
}
