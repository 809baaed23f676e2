"""Observability: Chrome/Perfetto traces of op records, merging, process-wide recording, the
SAGELLM_COMM_TRACE variable, Prometheus text and the per-op log lines.

Simulated worlds run on asyncio and trio (the `anyio_backend` fixture); real processes run
through the command line, each bounded by a timeout.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import sagellm_comm as sc
from sagellm_comm import metrics, trace
from sagellm_comm.cli import build_parser
from sagellm_comm.stats import OpRecord, Stats
from sagellm_comm.testing import run_ranks

CLI = [sys.executable, "-m", "sagellm_comm.cli"]


def ops(doc: dict[str, Any], pid: int | None = None) -> list[dict[str, Any]]:
    """The op slices (not the queued ones) of a trace, of one rank if given, in time order."""
    evs = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == "op" and (pid is None or e["pid"] == pid)]
    return sorted(evs, key=lambda e: e["ts"])


def meta(doc: dict[str, Any], name: str) -> dict[tuple[int, int], Any]:
    return {(e["pid"], e["tid"]): e["args"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == name}


async def _mixed(comm: sc.Communicator) -> Stats:
    """Known ops with known sizes: 4000 B all_reduce, 1000 B all_gather input, 800 B broadcast, a barrier,
    then rank 0 sends 64 B to rank 1, rank 1 times out on a receive that never comes, and a last barrier
    (so no rank leaves while rank 1 still waits)."""
    await comm.all_reduce(np.ones(1000, np.float32))
    await comm.all_gather(np.arange(250, dtype=np.int32))
    await comm.broadcast(np.zeros(100, np.float64), root=1)
    await comm.barrier()
    msg = np.arange(16, dtype=np.int32)
    if comm.rank == 0:
        await comm.send(msg, 1)
    elif comm.rank == 1:
        await comm.recv(msg, 0)
        with pytest.raises(sc.CommTimeout):
            await comm.recv(msg, 0, tag=7, timeout=0.05)
    await comm.barrier()
    return comm.stats


@pytest.mark.anyio
async def test_trace_of_a_simulated_world_has_one_event_per_op(tmp_path: Path) -> None:
    path = tmp_path / "world.json"
    with anyio.fail_after(30), trace.recording(path):
        stats = await run_ranks(3, _mixed)
    doc = json.loads(path.read_text())
    assert doc["otherData"]["ranks"] == [0, 1, 2]
    assert meta(doc, "process_name") == {(r, 0): {"name": f"rank {r}"} for r in range(3)}
    names = {"all_reduce": 4000, "all_gather": 1000, "broadcast": 800, "barrier": 0}
    for rank in range(3):
        evs = ops(doc, rank)
        want = [*names, *({0: ["send"], 1: ["recv", "recv"], 2: []}[rank]), "barrier"]
        assert [e["name"] for e in evs] == want
        assert [e["args"]["bytes"] for e in evs[:4]] == list(names.values())
        if rank == 0:
            assert evs[4]["args"]["bytes"] == 64
        recs = [r for r in stats[rank].records]
        assert len(recs) == len(evs)
        for e, rec in zip(evs, recs, strict=True):  # the same records, in call order
            assert e["args"]["algorithm"] == rec.algorithm and e["args"]["seq"] == rec.seq
            assert e["dur"] == pytest.approx(rec.seconds * 1e6, abs=0.01)
            assert e["dur"] >= 0 and e["ts"] >= 0
        for a, b in itertools.pairwise(evs):  # awaited one after another: no overlap on a rank
            assert b["ts"] >= a["ts"] + a["dur"] - 0.01
        assert {meta(doc, "thread_name")[rank, e["tid"]]["name"] for e in evs} == {"world"}
        assert [e["args"]["seq"] for e in evs if e["name"] not in ("send", "recv")] == [0, 1, 2, 3, 4]
    ok = [(e["name"], e["args"]["ok"]) for e in ops(doc, 1)]
    assert ok[-2] == ("recv", False) and all(o for i, (_, o) in enumerate(ok) if i != len(ok) - 2)
    assert "CommTimeout" in ops(doc, 1)[-2]["args"]["error"]
    # one collective overlaps on every rank: all_reduce of rank r starts before every rank's ends
    ar = [ops(doc, r)[0] for r in range(3)]
    assert max(e["ts"] for e in ar) <= min(e["ts"] + e["dur"] for e in ar)


def test_queued_slice_and_overlapping_ops_get_their_own_tracks() -> None:
    t = 1000.0
    recs = [OpRecord("all_reduce", "world", 0, 8, "ring", "", "shm", t + 0.002, t + 0.005, True, queued=t),
            OpRecord("send", "world", -1, 4, "direct", "", "shm", t + 0.003, t + 0.004, True, queued=t + 0.003),
            OpRecord("recv", "world", -1, 4, "direct", "", "shm", t + 0.006, t + 0.007, True)]
    doc = trace.document({3: recs}, anchor=(1.7e9, t))
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"]) for e in xs] == [
        ("queued", 0.0, 2000.0), ("all_reduce", 2000.0, 3000.0), ("send", 3000.0, 1000.0), ("recv", 6000.0, 1000.0)]
    assert doc["otherData"]["origin_unix_us"] == int(1.7e15)
    tracks = meta(doc, "thread_name")
    assert [tracks[3, e["tid"]]["name"] for e in xs] == ["world", "world", "world [2]", "world"]
    assert xs[1]["args"]["queued_us"] == 2000.0 and xs[2]["args"]["queued_us"] == 0.0


@pytest.mark.anyio
async def test_two_ranks_of_different_processes_merge_onto_one_timeline(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        stats = await run_ranks(2, _mixed)
    wall, perf = trace.clock_anchor()
    trace.write_trace(tmp_path / "r0.json", stats[0], anchor=(wall, perf))
    # rank 1 as if in another process: its perf_counter runs 5000 s ahead of ours
    moved = Stats(rank=1, group="world")
    for r in stats[1].records:
        moved.add(OpRecord(**{**r.__dict__, "started": r.started + 5000, "finished": r.finished + 5000,
                              "queued": r.queued + 5000}))
    trace.write_trace(tmp_path / "r1.json", moved, anchor=(wall, perf + 5000))
    merged = trace.merge_traces([tmp_path / "r0.json", tmp_path / "r1.json"], tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text()) == merged
    together = trace.document(stats, anchor=(wall, perf))
    assert merged["otherData"]["origin_unix_us"] == pytest.approx(together["otherData"]["origin_unix_us"], abs=1)
    assert merged["otherData"]["ranks"] == [0, 1]
    for rank in (0, 1):
        got, want = ops(merged, rank), ops(together, rank)
        assert [e["name"] for e in got] == [e["name"] for e in want] and got
        for g, w in zip(got, want, strict=True):
            assert g["ts"] == pytest.approx(w["ts"], abs=1.01)
            assert g["pid"] == rank
    assert meta(merged, "process_name") == {(0, 0): {"name": "rank 0"}, (1, 0): {"name": "rank 1"}}
    # rank 1's first all_reduce overlaps rank 0's on the merged timeline (they ran together)
    a, b = ops(merged, 0)[0], ops(merged, 1)[0]
    assert a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]
    with pytest.raises(ValueError, match="not written by"):
        (tmp_path / "foreign.json").write_text(json.dumps({"traceEvents": []}))
        trace.merge_traces([tmp_path / "foreign.json"])


async def _many(comm: sc.Communicator, n: int) -> int:
    x = np.zeros(4, np.float32)
    for _ in range(n):
        await comm.all_reduce(x)
    return len(comm.stats.records)


@pytest.mark.anyio
async def test_recording_captures_more_than_stats_keeps(tmp_path: Path) -> None:
    n = 1100
    assert Stats.tap is None
    with anyio.fail_after(60), trace.recording(tmp_path / "many.json") as rec:
        assert Stats.tap is not None
        kept = await run_ranks(2, _many, n)
    assert Stats.tap is None  # off again: an untraced op pays one attribute check
    assert kept == [1024, 1024]
    assert {r: len(v) for r, v in rec.records.items()} == {0: n, 1: n}
    doc = json.loads((tmp_path / "many.json").read_text())
    for rank in (0, 1):
        assert [e["args"]["seq"] for e in ops(doc, rank)] == list(range(n))

    started = trace.start(tmp_path / "started.json")
    with anyio.fail_after(30):
        await run_ranks(2, _many, 3)
    doc = trace.stop()
    assert doc is not None and started.records and trace.stop() is None
    assert json.loads((tmp_path / "started.json").read_text()) == doc
    assert [e["name"] for e in ops(doc, 0)] == ["all_reduce"] * 3


@pytest.mark.anyio
async def test_prometheus_text_parses_and_matches_the_counters() -> None:
    with anyio.fail_after(30):
        stats = await run_ranks(2, _mixed)
    text = metrics.prometheus_text(stats, labels={"job": 'de"code'})
    assert stats[0].prometheus() == metrics.prometheus_text([stats[0]])
    sample = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",)*[a-z_]+="(?:[^"\\]|\\.)*")\} (\S+)$')
    families: dict[str, int] = {}
    values: dict[tuple[str, str, str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.fullmatch(r"# HELP sagellm_comm_[a-z_]+_total \S.*", line)
        elif line.startswith("# TYPE "):
            name = line.split()[2]
            assert line == f"# TYPE {name} counter"
            families[name] = families.get(name, 0) + 1
        else:
            m = sample.match(line)
            assert m, line
            labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            assert labels["job"] == 'de\\"code' and labels["group"] == "world"
            values[m.group(1), labels["rank"], labels["op"], labels["algorithm"]] = float(m.group(3))
    assert families == dict.fromkeys(["sagellm_comm_ops_total", "sagellm_comm_op_errors_total",
                                      "sagellm_comm_op_bytes_total", "sagellm_comm_op_seconds_total"], 1)
    for rank, st in enumerate(stats):
        for op, c in st.counters.items():
            def total(name: str, op: str = op, rank: int = rank) -> float:
                return sum(v for (n, r, o, _), v in values.items() if (n, r, o) == (name, str(rank), op))

            assert total("sagellm_comm_ops_total") == c.calls
            assert total("sagellm_comm_op_errors_total") == c.errors
            assert total("sagellm_comm_op_bytes_total") == c.bytes
            assert total("sagellm_comm_op_seconds_total") == pytest.approx(c.seconds)
            for algo, calls in c.algorithms.items():
                assert values["sagellm_comm_ops_total", str(rank), op, algo] == calls
    assert values["sagellm_comm_op_errors_total", "1", "recv", "direct"] == 1
    assert values["sagellm_comm_ops_total", "1", "recv", "direct"] == 2
    assert values["sagellm_comm_op_bytes_total", "0", "all_reduce", stats[0].last("all_reduce").algorithm] == 4000


def test_prometheus_adds_up_communicators_of_one_rank_and_group() -> None:
    a, b = Stats(rank=2, group="world"), Stats(rank=2, group="world")
    for st, n in ((a, 3), (b, 4)):
        for i in range(n):
            st.add(OpRecord("barrier", "world", i, 0, "dissemination", "", "tcp", 1.0, 1.5, ok=i != 0))
    lines = [x for x in metrics.prometheus_text([a, b]).splitlines() if not x.startswith("#")]
    assert 'sagellm_comm_ops_total{rank="2",group="world",op="barrier",algorithm="dissemination"} 7' in lines
    assert 'sagellm_comm_op_errors_total{rank="2",group="world",op="barrier",algorithm="dissemination"} 2' in lines
    assert 'sagellm_comm_op_seconds_total{rank="2",group="world",op="barrier",algorithm="dissemination"} 3.5' in lines
    assert len(lines) == 4


def test_prometheus_kv_channel_counters() -> None:
    class Comm:
        rank, group_id, global_ranks = 0, "world", [5]

    class Chan:
        name, comm = "kv", Comm()

        def __init__(self) -> None:
            self.counters = {"transfers_sent": 2, "transfers_received": 0, "chunks_sent": 9, "chunks_received": 0,
                             "bytes_sent": 123, "bytes_received": 0, "failed": 1}

    text = metrics.prometheus_text([], kv=[Chan()])
    assert 'sagellm_comm_kv_bytes_total{rank="5",group="world",channel="kv",direction="sent"} 123' in text
    assert 'sagellm_comm_kv_failed_total{rank="5",group="world",channel="kv"} 1' in text
    assert text.count("# TYPE sagellm_comm_kv_chunks_total counter") == 1


@pytest.mark.anyio
async def test_a_debug_line_per_op_and_info_on_group_lifecycle(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sagellm_comm")

    async def body(comm: sc.Communicator) -> None:
        await comm.all_reduce(np.ones(1000, np.float32))
        comm.split([0])

    with anyio.fail_after(30):
        await run_ranks(2, body)
    lines = [r.getMessage() for r in caplog.records if r.name == "sagellm_comm.ops"]
    assert len(lines) == 2
    assert all(re.search(r"all_reduce group=world seq=0 bytes=4000 algorithm=\w+ transport=inproc [\d.]+ us$", x)
               for x in lines)
    assert sorted(x.split()[1] for x in lines) == ["0", "1"]
    group = [r.getMessage() for r in caplog.records if r.name == "sagellm_comm.group" and r.levelno == logging.INFO]
    assert sum("group 'world' created" in x for x in group) == 2
    assert sum("group 'world/0#0' created" in x for x in group) == 1
    assert sum("group 'world' closed" in x for x in group) == 2


@pytest.mark.anyio
async def test_env_var_in_process_writes_a_file_per_rank_at_close(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trace.ENV, str(tmp_path / "t.json"))
    try:
        with anyio.fail_after(30):
            await run_ranks(2, _many, 4)
        assert Stats.tap is not None  # still following the variable
    finally:
        monkeypatch.delenv(trace.ENV)
        trace.follow_env()
    assert Stats.tap is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rank0.json", "t.rank1.json"]
    for rank in (0, 1):
        doc = json.loads((tmp_path / f"t.rank{rank}.json").read_text())
        assert [(e["pid"], e["name"]) for e in ops(doc)] == [(rank, "all_reduce")] * 4


def test_env_path_puts_the_rank_in() -> None:
    assert trace.env_path("/t/trace.json", 3) == "/t/trace.rank3.json"
    assert trace.env_path("/t/trace", 0) == "/t/trace.rank0.json"
    assert trace.env_path("/t/{rank}-{pid}.json", 2) == f"/t/2-{os.getpid()}.json"


@pytest.mark.parametrize("bench", ["all-reduce", "transports", "gpu", "overlap", "nccl", "kv", "soak"])
def test_every_bench_takes_trace_and_plot(bench: str) -> None:
    args = build_parser().parse_args(["bench", bench, "--trace", "t.json", "--plot", "p.png"])
    assert (args.trace, args.plot) == ("t.json", "p.png")


def test_cost_model_bench_takes_trace_and_plot(capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_comm import bench_cost

    with pytest.raises(SystemExit):
        bench_cost.main(["--help"])
    assert "--trace FILE" in capsys.readouterr().out


@pytest.mark.parametrize("given", [False, True])
def test_plot_is_drawn_from_the_json_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: bool) -> None:
    from sagellm_comm import bench_output
    from sagellm_comm.bench_allreduce import write_report

    drawn: list[tuple[dict[str, Any], str]] = []
    fake = types.ModuleType("sagellm_comm.plots")
    fake.plot_benchmark = lambda doc, path: drawn.append((doc, path))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sagellm_comm.plots", fake)
    doc = {"benchmark": "all_reduce", "results": [{"size_bytes": 4}]}
    json_path = str(tmp_path / "given.json") if given else None

    def body(path: str | None) -> int:
        assert path is not None and (path == json_path or not given)
        write_report(path, doc)
        return 0

    assert bench_output.run(None, str(tmp_path / "p.png"), json_path, body) == 0
    assert drawn == [(doc, str(tmp_path / "p.png"))]
    assert (tmp_path / "given.json").exists() == given


@pytest.mark.multiprocess
def test_env_var_makes_each_rank_of_a_real_run_write_its_file(tmp_path: Path) -> None:
    env = {**os.environ, trace.ENV: str(tmp_path / "trace.json")}
    out = subprocess.run([*CLI, "bench", "all-reduce", "--world", "2", "--sizes", "4,1K", "--iters", "3",
                          "--max-seconds", "0", "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.rank0.json", "trace.rank1.json"]
    for rank in (0, 1):
        doc = json.loads((tmp_path / f"trace.rank{rank}.json").read_text())
        assert doc["otherData"]["ranks"] == [rank]
        evs = ops(doc)
        assert {e["pid"] for e in evs} == {rank}
        ar = [e["args"]["bytes"] for e in evs if e["name"] == "all_reduce"]
        assert ar.count(4) >= 3 and ar.count(1024) >= 3
    merged = trace.merge_traces(sorted(tmp_path.iterdir()))
    assert {e["pid"] for e in ops(merged)} == {0, 1}
