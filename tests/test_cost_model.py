"""The cost model: predictions, the choice, the fit, the calibration cache, and what stats record.

No timing assertions on real measurements: the calibration test checks only that
a probe runs, writes the cache and reads it back.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import anyio
import numpy as np
import pytest

import sagellm_comm as sc
from sagellm_comm.collectives import select
from sagellm_comm.testing import run_ranks
from sagellm_comm.topology import calibrate
from sagellm_comm.topology.cost import (
    ALGORITHMS,
    DEFAULT_FIT,
    CostModel,
    Curve,
    LinkCost,
    cost_model_for,
    default_model,
    fit_curve,
    group_class,
    link_class,
    model_from_fit,
    predict_all,
)

SIZES = [4 << i for i in range(0, 25)]  # 4 B .. 64 MiB, every power of two
WORLDS = [2, 3, 4, 5, 8]
OPS = list(ALGORITHMS)


def _ops_algos() -> list[tuple[str, str]]:
    return [(op, a) for op, algos in ALGORITHMS.items() for a in algos]


# -- predictions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["shm", "tcp_loopback", "tcp_remote", "inproc", "ucx"])
@pytest.mark.parametrize(("op", "algo"), _ops_algos())
def test_predictions_grow_with_size(cls: str, op: str, algo: str) -> None:
    model = default_model([cls])
    for p in WORLDS:
        preds = [model.predict(op, algo, n, p) for n in SIZES]
        assert all(t > 0 for t in preds)
        assert all(b >= a for a, b in itertools.pairwise(preds)), (op, algo, p, preds)


@pytest.mark.parametrize(("op", "algo"), _ops_algos())
def test_more_ranks_never_cost_less(op: str, algo: str) -> None:
    model = default_model(["shm"])
    for n in (4, 64 << 10, 16 << 20):
        preds = [model.predict(op, algo, n, p) for p in (2, 4, 8, 16)]
        if op in ("all_gather", "reduce_scatter", "all_to_all") and algo == "ring":
            continue  # a fixed total split over more ranks: per-rank bytes shrink
        assert all(b >= a * 0.999 for a, b in itertools.pairwise(preds)), (op, algo, n, preds)


def test_default_shm_model_doubling_small_ring_large() -> None:
    model = default_model(["shm"])
    for p in (2, 3, 4, 8):
        assert model.choose("all_reduce", 4, p).algorithm == "recursive_doubling"
        assert model.choose("all_reduce", 16 << 10, p).algorithm == "recursive_doubling"
    for p in (4, 8):
        assert model.choose("all_reduce", 64 << 20, p).algorithm == "ring"
    for p in (2, 4, 8):  # tiny: one round to every peer
        assert model.choose("all_gather", 64 * p, p).algorithm == "direct"
        assert model.choose("reduce_scatter", 64 * p, p).algorithm == "direct"


def test_world_of_one_is_local() -> None:
    model = default_model([])
    for op in OPS:
        assert model.choose(op, 1 << 20, 1) == ("local", "world size 1", 0.0)
        assert model.predict(op, ALGORITHMS[op][0], 1 << 20, 1) == 0.0


def test_choose_is_the_argmin_of_predict_and_deterministic() -> None:
    model = default_model(["shm"])
    twin = model_from_fit(model.to_fit(), ["shm"], source=model.source)
    assert twin == model and hash(twin) == hash(model)
    for op in OPS:
        for p in (2, 3, 8):
            for n in (4, 4096, 1 << 20, 64 << 20):
                preds = predict_all(model, op, n, p)
                best = min(ALGORITHMS[op], key=lambda a: (preds[a], ALGORITHMS[op].index(a)))
                got = model.choose(op, n, p)
                assert got.algorithm == best
                assert got.predicted == preds[best]
                assert got.reason.startswith("cost model (shm: α=")
                for a in ALGORITHMS[op]:
                    assert a in got.reason
                assert model.choose(op, n, p) is got  # memoized
                assert twin.choose(op, n, p) == got  # an equal model (another rank) agrees


def test_select_with_and_without_a_model() -> None:
    model = default_model(["tcp_loopback"])
    c = select.all_reduce(1 << 20, 4, model)
    assert c == model.choose("all_reduce", 1 << 20, 4) and c.predicted > 0
    algo, why, predicted = select.all_reduce(1 << 20, 4)  # the old size rules, no prediction
    assert (algo, predicted) == ("ring", 0.0) and "bandwidth-bound" in why
    assert select.barrier(4, model).algorithm == "dissemination"
    assert select.barrier(1, model).algorithm == "local"
    assert select.broadcast(100, 3, model).reason.endswith("the only algorithm")


def test_forcing_overrides_the_prediction() -> None:
    model = default_model(["shm"])
    forced = model.forcing("all_reduce", "ring")
    c = forced.choose("all_reduce", 4, 2)
    assert c.algorithm == "ring" and c.reason.startswith("forced")
    assert c.predicted == model.predict("all_reduce", "ring", 4, 2)
    assert forced.choose("all_gather", 4, 2) == model.choose("all_gather", 4, 2)
    with pytest.raises(ValueError):
        model.forcing("all_reduce", "direct")


def test_slowest_link_governs_and_every_rank_names_the_same() -> None:
    assert group_class(["shm", "tcp_remote", "shm"]) == "tcp_remote"
    assert group_class(["tcp_loopback", "shm"]) == "tcp_loopback"
    assert group_class(["shm", "ucx"]) == "ucx"
    assert group_class(["weird"]) == "tcp_remote"
    assert group_class([]) is None
    both = default_model(["tcp_remote", "shm"])
    assert both == default_model(["tcp_remote"]) and [link.name for link in both.links] == ["tcp_remote"]
    # 2 hosts, ranks 0 and 1 on host A (shm between them), rank 2 alone on host B: each rank
    # sees only its own links, yet every one builds the same model and so picks the same algorithms
    views = [["shm", "tcp_remote"], ["shm", "tcp_remote"], ["tcp_remote", "tcp_remote"]]
    models = [default_model(v) for v in views]
    assert models[0] == models[1] == models[2]
    cals = [_fake_calibration(1.0, ("shm", "tcp_remote")), _fake_calibration(2.0, ("shm",)), None]
    gathered = [cost_model_for(v, cals) for v in views]  # (init gathers every rank's classes; any view works)
    assert gathered[0] == gathered[1] == gathered[2]


def test_link_classes() -> None:
    assert link_class("shm") == "shm"
    assert link_class("tcp", "tcp 127.0.0.1:5000") == "tcp_loopback"
    assert link_class("tcp", "tcp ::1:5000") == "tcp_loopback"
    assert link_class("tcp", "tcp 10.0.0.2:5000") == "tcp_remote"
    assert link_class("tcp", "tcp ?") == "tcp_remote"
    assert link_class("inproc", "inproc rank0") == "inproc"
    assert link_class("somethingnew") == "tcp_remote"


# -- the fit ---------------------------------------------------------------------------------------
def test_fit_recovers_a_line_exactly() -> None:
    alpha, beta = 23.5e-6, 0.087e-9
    pts = [(n, alpha + beta * n) for n in SIZES]
    curve, errors = fit_curve(pts)
    assert len(curve.bands) == 1
    assert curve.alpha == pytest.approx(alpha, rel=1e-9)
    assert curve.beta == pytest.approx(beta, rel=1e-9)
    assert max(abs(e) for e in errors) < 1e-9


def test_fit_recovers_bands_at_measured_sizes() -> None:
    truth = Curve(((0, 30e-6, 0.5e-9), (1 << 20, 30e-6 + (0.5e-9 - 0.1e-9) * (1 << 20), 0.1e-9)))
    assert truth(1 << 20) == pytest.approx(30e-6 + 0.5e-9 * (1 << 20))  # continuous at the knot
    curve, errors = fit_curve([(n, truth(n)) for n in SIZES])
    assert [b[0] for b in curve.bands] == [0, 1 << 20]
    for (_, a, b), (_, ta, tb) in zip(curve.bands, truth.bands, strict=True):
        assert a == pytest.approx(ta, rel=1e-6) and b == pytest.approx(tb, rel=1e-6)
    assert max(abs(e) for e in errors) < 1e-6


def test_fit_never_decreases() -> None:
    rng = np.random.default_rng(5)
    pts = [(n, (40e-6 + 0.2e-9 * n) * float(rng.uniform(0.7, 1.3))) for n in SIZES]
    curve, _ = fit_curve(pts)
    vals = [curve(n) for n in SIZES]
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert all(beta >= 0 for _, _, beta in curve.bands)


def test_fit_raw_recovers_each_algorithms_base() -> None:
    """Synthetic probe results: curves on lines, algorithm times = their messages + a known base."""
    one, exch = Curve.line(20e-6, 0.1e-9), Curve.line(30e-6, 0.2e-9)
    red, cpy = Curve.line(0.5e-6, 0.02e-9), Curve.line(0.3e-6, 0.01e-9)
    truth = {key: 1e-6 * (i + 1) - 15e-6 for i, key in enumerate(f"{op}/{a}" for op, a in _ops_algos())}
    bare = CostModel(links=(LinkCost("shm", one, exch, tuple((k, 0.0) for k in truth)),), reduce=red, copy=cpy,
                     call=0.0, sender=0.0)
    algos = {}
    for key, base in truth.items():
        op, algo = key.split("/")
        nbytes = calibrate.tiny_bytes(op, 2)
        algos[key] = [nbytes, bare.predict(op, algo, nbytes, 2) + base]
    raw = {"links": {"shm": {"oneway": [[n, one(n)] for n in SIZES], "exchange": [[n, exch(n)] for n in SIZES],
                             "barrier": 40e-6, "algorithms": algos}},
           "reduce": [[n, red(n)] for n in SIZES], "copy": [[n, cpy(n)] for n in SIZES], "sender": 30e-6}
    fit = calibrate.fit_raw(raw)["fit"]
    model = cost_model_for(["shm"], [{"fit": fit}])
    for key, base in truth.items():
        op, algo = key.split("/")
        assert model.fixed(op, algo) == pytest.approx(base, abs=1e-12)  # bases may be negative
    assert fit["call"] == pytest.approx(10e-6) and fit["sender"] == 30e-6
    no_base = replace(model, links=tuple(replace(link, base=()) for link in model.links))
    assert no_base.fixed("all_reduce", "ring") == pytest.approx(10e-6 + 30e-6)  # call + sender
    assert no_base.fixed("all_gather", "direct") == pytest.approx(10e-6)


# -- calibration documents and the group model -------------------------------------------------------
def _fake_calibration(scale: float, classes: tuple[str, ...] = ("shm", "tcp_loopback")) -> dict[str, Any]:
    fit = json.loads(json.dumps(DEFAULT_FIT))
    fit["links"] = {c: {"oneway": [[0, 20e-6 * scale, 0.1e-9 * scale]],
                        "exchange": [[0, 30e-6 * scale, 0.2e-9 * scale]]} for c in classes}
    fit["reduce"] = [[0, 1e-6, 0.03e-9 * scale]]
    return {"schema": calibrate.SCHEMA, "host_key": f"h{scale}", "fit": fit}


def test_model_round_trips_through_the_calibration_json() -> None:
    cal = _fake_calibration(1.5)
    model = cost_model_for(["shm", "tcp_loopback"], [cal])
    text = json.dumps({"fit": model.to_fit()})
    again = model_from_fit(json.loads(text)["fit"], ["shm", "tcp_loopback"], source=model.source)
    assert again == model
    assert again.choose("all_reduce", 1 << 20, 4) == model.choose("all_reduce", 1 << 20, 4)
    assert model.links == (LinkCost.from_json("tcp_loopback", cal["fit"]["links"]["tcp_loopback"]),)


def test_cost_model_for_is_order_independent() -> None:
    cals: list[dict[str, Any] | None] = [_fake_calibration(1.0), _fake_calibration(2.0), None,
                                         _fake_calibration(1.0)]
    classes = ["tcp_loopback", "shm", "shm"]
    ref = cost_model_for(classes, cals)
    for perm in itertools.permutations(cals):
        for cls_perm in itertools.permutations(classes):
            assert cost_model_for(list(cls_perm), list(perm)) == ref
    # the slower calibration's curves govern; the slower host's reduction is used
    slow = cost_model_for(classes, [_fake_calibration(2.0)])
    for n in (4, 1 << 20, 64 << 20):
        assert ref.X(n) == slow.X(n)
    assert ref.reduce == slow.reduce
    # no calibration at all: the built-in defaults; a class nobody measured: its default curves
    assert cost_model_for(["shm"], [None, None]) == default_model(["shm"])
    mixed = cost_model_for(["shm", "tcp_remote"], [_fake_calibration(1.0, ("shm",))])
    assert mixed.links == default_model(["tcp_remote"]).links
    assert mixed.reduce == Curve.from_json(_fake_calibration(1.0)["fit"]["reduce"])


def test_models_key_caches() -> None:
    a = cost_model_for(["shm"], [_fake_calibration(1.0)])
    b = cost_model_for(["shm"], [_fake_calibration(1.0)])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert isinstance(a, CostModel) and a.with_chunk_bytes(a.chunk_bytes) is a
    assert a.with_chunk_bytes(4096) != a


# -- what the communicator records ------------------------------------------------------------------
@pytest.mark.anyio
async def test_stats_record_the_prediction_and_the_reason() -> None:
    async def body(comm: sc.Communicator) -> list[Any]:
        out = []
        for n in (10, 300_000):
            await comm.all_reduce(np.ones(n, np.float32))
            out.append(comm.stats.last("all_reduce"))
        await comm.barrier()
        out.append(comm.stats.last("barrier"))
        comm.cost_model = None  # the old size rules: no prediction
        await comm.all_reduce(np.ones(10, np.float32))
        out.append(comm.stats.last("all_reduce"))
        return [out, comm.link_classes(), comm.stats.to_dict()]

    with anyio.fail_after(20):
        results = await run_ranks(2, body)
    model = default_model(["inproc"])
    for recs, classes, d in results:
        assert classes == ["inproc"]
        for rec, n in zip(recs[:2], (10, 300_000), strict=True):
            want = select.all_reduce(4 * n, 2, model)
            assert rec.ok and rec.algorithm == want.algorithm
            assert rec.predicted == want.predicted > 0
            assert rec.reason == want.reason and rec.reason.startswith("cost model (inproc")
            assert rec.seconds > 0
        assert recs[2].predicted > 0 and recs[2].algorithm == "dissemination"
        assert recs[3].predicted == 0.0 and "KiB" in recs[3].reason
        assert d["records"][0]["predicted"] > 0


@pytest.mark.anyio
async def test_a_forced_model_runs_that_algorithm_correctly() -> None:
    async def body(comm: sc.Communicator) -> list[Any]:
        out = []
        for op, algo in (("all_reduce", "ring"), ("all_reduce", "recursive_doubling"), ("all_gather", "ring"),
                         ("reduce_scatter", "ring"), ("all_gather", "direct")):
            assert comm.cost_model is not None
            comm.cost_model = comm.cost_model.forcing(op, algo)
            x = np.arange(12, dtype=np.float32) + comm.rank
            if op == "all_reduce":
                got = await comm.all_reduce(x)
            elif op == "all_gather":
                got = await comm.all_gather(x)
            else:
                got = await comm.reduce_scatter(x)
            rec = comm.stats.last(op)
            assert rec is not None
            out.append((rec.algorithm, algo, got.copy()))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(3, body)
    base = np.arange(12, dtype=np.float32)
    for rank, rows in enumerate(results):
        for i, (ran, want, got) in enumerate(rows):
            assert ran == want
            if i < 2:
                np.testing.assert_array_equal(got, 3 * base + 3)
            elif i == 3:
                np.testing.assert_array_equal(got, (3 * base + 3)[4 * rank : 4 * rank + 4])
            else:
                np.testing.assert_array_equal(got, np.stack([base + r for r in range(3)]))


@pytest.mark.anyio
async def test_split_groups_keep_the_calibrations_and_the_rules() -> None:
    cal = _fake_calibration(1.0, ("inproc",))

    async def body(comm: sc.Communicator) -> Any:
        comm.cost_model = cost_model_for(comm.link_classes(), [cal] * comm.world_size)
        sub = comm.split([0, 1])
        comm.cost_model = None
        rules = comm.split([0, 1])
        return (sub.cost_model, rules.cost_model) if sub is not None and rules is not None else None

    with anyio.fail_after(20):
        results = await run_ranks(3, body)
    want = cost_model_for(["inproc"], [cal])
    assert results[0] == results[1] == (want, None)
    assert results[0][0].source.startswith("calibration")
    assert results[2] is None


# -- a real calibration, tiny -------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_calibration_writes_and_loads_the_cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibrate.load() is None
    doc = calibrate.run(["tcp"], [4, 4096, 65536], seconds_budget=0.5)
    path = calibrate.cache_path()
    assert doc["path"] == str(path) and path.parent == tmp_path / "sagellm-comm"
    assert path.name == f"calibration-{calibrate.host_key()}.json"
    loaded = calibrate.load()
    assert loaded is not None
    assert loaded["fit"] == doc["fit"] and loaded["host_key"] == calibrate.host_key()
    assert set(loaded["raw"]["links"]) == {"tcp_loopback"}
    assert [n for n, _ in loaded["raw"]["links"]["tcp_loopback"]["oneway"]] == [4, 4096, 65536]
    assert loaded["versions"]["numpy"] and loaded["date"]
    model = cost_model_for(["tcp_loopback"], [loaded])
    assert model.source.startswith("calibration")
    assert model.choose("all_reduce", 4, 2).predicted > 0
    text = calibrate.format_report(loaded)
    assert "tcp_loopback" in text and "fit error" in text
    assert calibrate.load("no-such-host") is None


@pytest.mark.multiprocess
def test_bench_cost_model_reports_predicted_and_measured(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_comm import bench_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no calibration there: the built-in defaults
    out = tmp_path / "cost.json"
    rc = bench_cost.main(["--world", "2", "--transport", "tcp", "--sizes", "4,64K", "--ops", "all_reduce,broadcast",
                          "--max-seconds", "0.02", "--iters", "5", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(r["op"], r["bytes"]) for r in doc["rows"]] == [("all_reduce", 4), ("all_reduce", 65536),
                                                             ("broadcast", 4), ("broadcast", 65536)]
    for r in doc["rows"]:
        assert r["predicted"] > 0 and r["measured"] > 0 and r["reason"].startswith("cost model (tcp_loopback")
    assert all("measured" in a for a in doc["rows"][0]["alternatives"])  # the other all_reduce, forced
    assert doc["summary"]["points"] == 4 and doc["summary"]["median_abs_error"] is not None
    text = capsys.readouterr().out
    assert "median |error|" in text and "built-in defaults" in text
