"""Tests of flowkit.bench: bootstrap statistics, verdicts, the result cache, the registry,
run_experiment and the markdown report. Every file goes under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowkit.bench import (
    BenchResult,
    BenchRun,
    Claim,
    Interval,
    ResultCache,
    as_percent,
    available,
    bootstrap_mean,
    column,
    config_hash,
    default_cache_root,
    experiment,
    markdown_table,
    paired_bootstrap,
    proportion,
    run_experiment,
    update_benchmarks,
    verdict,
)
from flowkit.bench import core  # noqa: F401
from flowkit.registry import EXPERIMENTS
from flowkit.cli.bench import main as bench_main
from flowkit.bench.report import format_result
from flowkit.errors import InputError, UnknownNameError

# ------------------------------------------------------------------ stats


def test_paired_bootstrap_covers_true_mean_difference_at_nominal_rate():
    rng = np.random.default_rng(1234)
    true_diff, hits, trials = -0.3, 0, 200
    for trial in range(trials):
        b = rng.normal(1.0, 1.0, size=50)
        a = b + true_diff + rng.normal(0.0, 0.5, size=50)  # paired: shares b's noise
        iv = paired_bootstrap(a, b, n_boot=1000, seed=trial)
        hits += iv.contains(true_diff)
    assert 0.90 <= hits / trials <= 0.98


def test_ratio_of_means_covers_true_ratio_at_nominal_rate():
    rng = np.random.default_rng(99)
    true_ratio, hits, trials = 1.1, 0, 200
    for trial in range(trials):
        b = rng.uniform(1.0, 3.0, size=50)  # mean 2
        a = true_ratio * b + rng.normal(0.0, 0.2, size=50)
        iv = paired_bootstrap(a, b, stat="ratio_of_means", n_boot=1000, seed=trial)
        hits += iv.contains(true_ratio)
    assert 0.90 <= hits / trials <= 0.98


def test_bootstrap_is_deterministic_given_seed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)
    assert bootstrap_mean(a, seed=3) == bootstrap_mean(a, seed=3)


def test_bootstrap_estimates_and_interval_order():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.5, 1.5, 2.5, 2.5])
    iv = paired_bootstrap(a, b)
    assert iv.estimate == pytest.approx(0.5)
    assert iv.low <= iv.estimate <= iv.high and iv.n == 4 and iv.stat == "mean_diff" and iv.ci == 0.95
    r = paired_bootstrap(a, b, stat="ratio_of_means")
    assert r.estimate == pytest.approx(2.5 / 2.0) and r.low <= r.estimate <= r.high
    wide, narrow = paired_bootstrap(a, b, ci=0.99), paired_bootstrap(a, b, ci=0.5)
    assert wide.width >= iv.width >= narrow.width


def test_bootstrap_degenerate_cases():
    one = paired_bootstrap([3.0], [1.0])
    assert (one.estimate, one.low, one.high, one.n) == (2.0, 2.0, 2.0, 1)
    ratio = paired_bootstrap([3.0], [2.0], stat="ratio_of_means")
    assert (ratio.low, ratio.high) == (1.5, 1.5)
    const = paired_bootstrap([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every pair differs by exactly 1
    assert const.low == pytest.approx(1.0) and const.high == pytest.approx(1.0)
    assert bootstrap_mean([5.0]) == Interval(5.0, 5.0, 5.0, 1, "mean", 0.95)


def test_bootstrap_refuses_bad_input():
    with pytest.raises(InputError, match="sample 2"):
        paired_bootstrap([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="baseline"):
        paired_bootstrap([1.0, 2.0], [1.0, float("inf")])
    with pytest.raises(InputError, match="differ in length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(InputError, match="stat"):
        paired_bootstrap([1.0], [1.0], stat="median")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="ci"):
        paired_bootstrap([1.0], [1.0], ci=95)
    with pytest.raises(InputError, match="nonzero mean"):
        paired_bootstrap([1.0, 2.0], [1.0, -1.0], stat="ratio_of_means")
    with pytest.raises(InputError, match="1-D"):
        bootstrap_mean(np.ones((2, 2)))
    with pytest.raises(ValueError):  # every flowkit input error is a ValueError
        bootstrap_mean([float("nan")])


def test_proportion_in_percent():
    iv = proportion([True, True, False, False])
    assert iv.estimate == 50.0 and 0.0 <= iv.low <= 50.0 <= iv.high <= 100.0
    assert as_percent([True, False]).tolist() == [100.0, 0.0]
    assert as_percent([1, 0, 1]).tolist() == [100.0, 0.0, 100.0]
    with pytest.raises(InputError):
        as_percent([0, 2])
    assert proportion([True] * 5) == Interval(100.0, 100.0, 100.0, 5, "mean", 0.95)


# ------------------------------------------------------------------ verdicts


def iv(low: float, high: float, stat: str = "mean_diff") -> Interval:
    return Interval((low + high) / 2, low, high, 10, stat)


@pytest.mark.parametrize(
    "claim, low, high, expected",
    [
        # lower / higher, margin 0
        (Claim("lower"), -2.0, -1.0, "met"),
        (Claim("lower"), 1.0, 2.0, "missed"),
        (Claim("lower"), -1.0, 1.0, "inconclusive"),
        (Claim("lower"), 0.0, 0.0, "missed"),
        (Claim("higher"), 1.0, 2.0, "met"),
        (Claim("higher"), -2.0, -1.0, "missed"),
        (Claim("higher"), -1.0, 1.0, "inconclusive"),
        # lower / higher by at least a margin
        (Claim("lower", margin=0.5), -1.0, -0.6, "met"),
        (Claim("lower", margin=0.5), -0.4, -0.1, "missed"),
        (Claim("lower", margin=0.5), -0.6, -0.4, "inconclusive"),
        (Claim("higher", margin=0.5), 0.6, 1.0, "met"),
        (Claim("higher", margin=0.5), 0.1, 0.4, "missed"),
        (Claim("higher", margin=0.5), 0.4, 0.6, "inconclusive"),
        # non-inferiority
        (Claim("no_worse", margin=0.1, better="higher"), -0.05, 0.2, "met"),
        (Claim("no_worse", margin=0.1, better="higher"), -0.3, -0.2, "missed"),
        (Claim("no_worse", margin=0.1, better="higher"), -0.2, 0.1, "inconclusive"),
        (Claim("no_worse", margin=0.1, better="lower"), -0.2, 0.05, "met"),
        (Claim("no_worse", margin=0.1, better="lower"), 0.2, 0.3, "missed"),
        (Claim("no_worse", margin=0.1, better="lower"), -0.1, 0.2, "inconclusive"),
        # equivalence
        (Claim("equivalent", margin=0.1), -0.05, 0.05, "met"),
        (Claim("equivalent", margin=0.1), -0.1, 0.1, "met"),
        (Claim("equivalent", margin=0.1), 0.2, 0.3, "missed"),
        (Claim("equivalent", margin=0.1), -0.3, -0.2, "missed"),
        (Claim("equivalent", margin=0.1), 0.05, 0.2, "inconclusive"),
        (Claim("equivalent", margin=0.1), -0.5, 0.5, "inconclusive"),
        # targets
        (Claim("at_most", target=1.03), 0.99, 1.02, "met"),
        (Claim("at_most", target=1.03), 1.0, 1.03, "met"),
        (Claim("at_most", target=1.03), 1.031, 1.1, "missed"),
        (Claim("at_most", target=1.03), 1.0, 1.05, "inconclusive"),
        (Claim("at_least", target=90.0), 91.0, 99.0, "met"),
        (Claim("at_least", target=90.0), 80.0, 89.0, "missed"),
        (Claim("at_least", target=90.0), 85.0, 95.0, "inconclusive"),
    ],
)
def test_verdict_branches(claim, low, high, expected):
    assert verdict(claim, iv(low, high)) == expected


@pytest.mark.parametrize(
    "claim, low, high, expected",
    [
        (Claim("lower", stat="ratio_of_means"), 0.8, 0.9, "met"),
        (Claim("lower", stat="ratio_of_means"), 1.1, 1.2, "missed"),
        (Claim("lower", stat="ratio_of_means"), 0.9, 1.1, "inconclusive"),
        (Claim("higher", margin=0.05, stat="ratio_of_means"), 1.06, 1.2, "met"),
        (Claim("higher", margin=0.05, stat="ratio_of_means"), 1.0, 1.04, "missed"),
        (Claim("equivalent", margin=0.05, stat="ratio_of_means"), 0.97, 1.02, "met"),
        (Claim("equivalent", margin=0.05, stat="ratio_of_means"), 1.06, 1.1, "missed"),
        (Claim("no_worse", margin=0.05, better="lower", stat="ratio_of_means"), 0.9, 1.04, "met"),
        (Claim("at_most", target=1.03, stat="ratio_of_means"), 1.01, 1.02, "met"),
    ],
)
def test_verdict_on_ratios_is_centred_on_one(claim, low, high, expected):
    assert verdict(claim, iv(low, high, "ratio_of_means")) == expected


def test_relative_margin_scales_with_baseline_mean():
    claim = Claim("equivalent", margin=0.05, relative=True)  # within 5% of the baseline
    assert verdict(claim, iv(-0.05, 0.05), baseline_mean=2.0) == "met"  # delta 0.1
    assert verdict(claim, iv(-0.05, 0.05), baseline_mean=-2.0) == "met"  # |baseline|
    assert verdict(claim, iv(0.15, 0.2), baseline_mean=2.0) == "missed"
    assert verdict(claim, iv(-0.05, 0.05), baseline_mean=0.5) == "inconclusive"  # delta 0.025
    nw = Claim("no_worse", margin=0.05, relative=True, better="lower")  # FSD within 5%
    assert verdict(nw, iv(-1.0, 4.0), baseline_mean=100.0) == "met"
    assert verdict(nw, iv(6.0, 9.0), baseline_mean=100.0) == "missed"
    with pytest.raises(InputError, match="baseline mean"):
        verdict(claim, iv(-0.05, 0.05))


def test_claim_validation():
    with pytest.raises(InputError, match="kind"):
        Claim("smaller")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="margin"):
        Claim("lower", margin=-0.1)
    with pytest.raises(InputError, match="better"):
        Claim("no_worse", margin=0.1)
    with pytest.raises(InputError, match="target"):
        Claim("at_most")
    with pytest.raises(InputError, match="target"):
        Claim("lower", target=1.0)
    with pytest.raises(InputError, match="margin"):
        Claim("at_least", target=1.0, margin=0.1)
    with pytest.raises(InputError, match="relative"):
        Claim("equivalent", margin=0.05, relative=True, stat="ratio_of_means")
    with pytest.raises(InputError, match="stat"):
        Claim("lower", stat="median")
    with pytest.raises(InputError, match="interval"):
        verdict(Claim("lower"), Interval(0.0, float("nan"), 1.0, 3))


def test_claim_text():
    assert Claim("lower").describe("APG", "saturation", "CFG") == "APG saturation lower than CFG"
    assert "within 5%" in Claim("equivalent", margin=0.05, relative=True).describe("APG", "FSD", "CFG")
    assert "<= 1.03" in Claim("at_most", target=1.03, stat="ratio_of_means").describe("AG", "wall time", "CFG")
    assert Claim("higher", text="custom words").describe("a", "b", "c") == "custom words"


# ------------------------------------------------------------------ cache


def test_config_hash_stable_and_distinct():
    config = {"method": "apg", "scale": 7.5, "steps": 20, "opts": {"eta": 0.0, "momentum": -0.5}, "seeds": [0, 1, 2]}
    reordered = {"seeds": [0, 1, 2], "opts": {"momentum": -0.5, "eta": 0.0}, "steps": 20, "scale": 7.5, "method": "apg"}
    h = config_hash(config)
    assert h == config_hash(reordered) == "0ac929e36ee263e4"  # pinned: caches survive sessions
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert config_hash({**config, "scale": np.float64(7.5)}) == h
    assert config_hash({**config, "seeds": (0, 1, 2)}) == h
    assert config_hash({**config, "steps": np.int64(20)}) == h
    different = [
        {**config, "scale": 7.5000001},
        {**config, "steps": 20.0},
        {**config, "steps": "20"},
        {**config, "opts": {"eta": 0.0, "momentum": 0.5}},
        {**config, "extra": None},
    ]
    assert len({h, *map(config_hash, different)}) == len(different) + 1
    with pytest.raises(InputError, match="object"):
        config_hash({"x": object()})


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWKIT_CACHE", str(tmp_path / "fk"))
    assert default_cache_root() == tmp_path / "fk" / "bench"
    assert ResultCache().root == tmp_path / "fk" / "bench"
    monkeypatch.delenv("FLOWKIT_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "flowkit" / "bench"


def test_cache_get_put_and_run_cached(tmp_path):
    cache = ResultCache(tmp_path)
    config = {"method": "cfg", "n": 3}
    assert cache.get("exp", config) is None
    calls = []

    def fn():
        calls.append(1)
        return [{"i": i, "score": np.float32(i) / 2, "ok": np.bool_(i > 0)} for i in range(3)]

    first = cache.run_cached("exp", config, fn)
    second = cache.run_cached("exp", config, fn)
    assert len(calls) == 1
    assert first == second == [{"i": 0, "score": 0.0, "ok": False}, {"i": 1, "score": 0.5, "ok": True},
                               {"i": 2, "score": 1.0, "ok": True}]
    assert type(first[1]["score"]) is float and type(first[1]["ok"]) is bool
    cache.run_cached("exp", {**config, "method": "apg"}, fn)  # another config misses
    assert len(calls) == 2
    cache.put("exp", config, [{"x": 1}])
    assert cache.get("exp", config) == [{"x": 1}]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(InputError, match="list of dicts"):
        cache.put("exp", config, [1, 2])  # type: ignore[list-item]
    with pytest.raises(InputError, match="experiment name"):
        cache.get("../escape", config)


def test_cache_ignores_foreign_or_damaged_entries(tmp_path):
    cache = ResultCache(tmp_path)
    config = {"a": 1}
    cache.put("exp", config, [{"x": 1}])
    path = cache.path("exp", config)
    entry = json.loads(path.read_text())
    entry["config"] = {"a": 2}  # as if another config had hashed the same
    path.write_text(json.dumps(entry))
    assert cache.get("exp", config) is None
    path.write_text("{truncated")
    assert cache.get("exp", config) is None


def test_chunked_arm_resumes_after_interruption(tmp_path):
    config = {"arm": "apg", "version": 1}
    computed: list[int] = []

    def sample(indices):
        computed.extend(indices)
        return [{"index": i, "value": float(np.random.default_rng([5, i]).normal())} for i in indices]

    class Killed(Exception):
        pass

    def killed_midway(indices):
        if indices[0] >= 32:  # dies while computing the third chunk
            raise Killed
        return sample(indices)

    cache = ResultCache(tmp_path / "cache")
    with pytest.raises(Killed):
        cache.run_cached_chunks("exp", config, 50, killed_midway, chunk=16)
    assert computed == list(range(32))
    computed.clear()
    resumed = cache.run_cached_chunks("exp", config, 50, sample, chunk=16)
    assert computed == list(range(32, 50))  # only the missing chunks
    computed.clear()
    again = cache.run_cached_chunks("exp", config, 50, sample, chunk=16)
    assert computed == [] and again == resumed
    fresh = ResultCache(tmp_path / "other").run_cached_chunks("exp", config, 50, sample, chunk=16)
    assert resumed == fresh and [r["index"] for r in resumed] == list(range(50))
    computed.clear()
    more = cache.run_cached_chunks("exp", config, 64, sample, chunk=16)  # first 3 chunks reused
    assert computed == list(range(48, 64)) and more[:48] == resumed[:48]


def test_chunk_function_must_return_one_result_per_index(tmp_path):
    cache = ResultCache(tmp_path)
    with pytest.raises(InputError, match="one dict per index"):
        cache.run_cached_chunks("exp", {}, 4, lambda idx: [{"x": 0}], chunk=2)
    with pytest.raises(InputError, match="chunk"):
        cache.run_cached_chunks("exp", {}, 4, lambda idx: [], chunk=0)
    assert cache.run_cached_chunks("exp", {}, 0, lambda idx: []) == []


# ------------------------------------------------------------------ experiments


@pytest.fixture
def counting_experiment():
    """A throwaway registered experiment whose arm counts the samples it computes."""
    computed: list[int] = []

    def arm(indices):
        computed.extend(indices)
        return [{"i": i, "t": 1.0 + 0.01 * i, "b": 2.0 + 0.01 * i + 0.001 * (i % 3)} for i in indices]

    @experiment("_test_counting", "counting test experiment")
    def run(bench: BenchRun) -> None:
        res = bench.arm("both", {"version": 1}, arm, n=bench.sample_count(full=40, quick=8), chunk=8)
        bench.compare("T", "loss", claim=Claim("lower"), treatment=column(res, "t"),
                      baseline=column(res, "b"), baseline_name="B", units="s",
                      per_sample={"index": column(res, "i")})
        bench.measure("T", "wall ratio", column(res, "t") / column(res, "b"), Claim("at_most", target=0.6))
        bench.info["note"] = "hello"

    yield computed
    EXPERIMENTS.unregister("_test_counting")


def test_run_experiment_selftest_writes_json(tmp_path):
    result = run_experiment("selftest", quick=True, out_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    assert result.path == tmp_path / "out" / "selftest.quick.json"
    data = json.loads(result.path.read_text())
    assert data["experiment"] == "selftest" and data["quick"] is True
    assert data["versions"]["flowkit"] and "torch" in data["versions"] and data["date"]
    assert {r["verdict"] for r in data["rows"]} == {"met"}
    lower = next(r for r in data["rows"] if r["claim_spec"]["kind"] == "lower")
    equiv = next(r for r in data["rows"] if r["claim_spec"]["kind"] == "equivalent")
    assert lower["verdict"] == "met" and equiv["verdict"] == "met"
    assert lower["high"] < 0 and lower["low"] <= -0.5 <= lower["high"] + 0.1
    samples = data["samples"]["synthetic"]
    assert len(samples) == lower["n"] == len(lower["treatment_values"]) == 48
    assert set(samples[0]) == {"index", "baseline", "improved", "equivalent"}
    assert BenchResult.load(result.path).verdicts == result.verdicts


def test_selftest_full_run_is_met_and_larger(tmp_path):
    result = run_experiment("selftest", out_dir=tmp_path, cache_root=tmp_path / "cache")
    assert result.path == tmp_path / "selftest.json" and not result.quick
    assert set(result.verdicts.values()) == {"met"}
    assert result.row("improved", "loss").n == 400
    assert result.row("no-effect", "loss").verdict == "met"


def test_second_run_computes_nothing_and_matches(tmp_path, counting_experiment):
    first = run_experiment("_test_counting", out_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    assert counting_experiment == list(range(40))
    counting_experiment.clear()
    second = run_experiment("_test_counting", out_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    assert counting_experiment == []
    assert [r.to_dict() for r in first.rows] == [r.to_dict() for r in second.rows]
    row = second.row("T", "loss")
    assert row.verdict == "met" and row.baseline == "B" and row.units == "s" and row.n == 40
    assert row.treatment_mean == pytest.approx(1.195) and row.per_sample["index"][:3] == [0.0, 1.0, 2.0]
    assert second.row("T", "wall ratio").verdict == "met" and second.row("T", "wall ratio").baseline_mean is None
    assert second.info == {"note": "hello"}


def test_committed_results_seed_a_fresh_cache(tmp_path, counting_experiment):
    """A run in a new session (empty cache) takes the committed results of arms whose key is
    unchanged and computes nothing (mutants: ignoring the committed file recomputes all 40; a
    changed arm config must not be taken over); a legacy file without arm keys is taken over
    only for adopted arms."""
    out = tmp_path / "out"
    first = run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache1")
    data = json.loads(first.path.read_text())
    assert set(data["arm_keys"]) == {"both"}
    counting_experiment.clear()
    again = run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache2")  # a new machine
    assert counting_experiment == []
    assert [r.to_dict() for r in again.rows] == [r.to_dict() for r in first.rows]
    # another arm key (the config changed): recomputed
    data["arm_keys"]["both"] = "0" * 16
    first.path.write_text(json.dumps(data))
    run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache3")
    assert counting_experiment == list(range(40))
    # a legacy file (no keys): only adopted arms are taken over, and the adoption is recorded
    del data["arm_keys"]
    first.path.write_text(json.dumps(data))
    counting_experiment.clear()
    run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache4")
    assert counting_experiment == list(range(40))
    first.path.write_text(json.dumps(data))
    counting_experiment.clear()
    adopted = run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache5", adopt=["both"])
    assert counting_experiment == [] and adopted.info["adopted"] == {"both": data["date"]}


def test_a_run_cut_short_resumes_from_its_progress_file_on_a_new_machine(tmp_path, counting_experiment,
                                                                        monkeypatch):
    """While it runs, a bench keeps its finished chunks in NAME.progress.json; a later run with
    an empty cache (a new session) takes them back and computes only the rest (mutant: no
    progress file, or ignoring it, recomputes all 40); success removes the file."""
    from flowkit.bench import cache as cache_mod

    out = tmp_path / "out"
    real = cache_mod.ResultCache._chunk
    done = []

    def dying(self, folder, config, fn, start, stop, *, wait):
        if len(done) == 2:
            raise KeyboardInterrupt  # the session ends after two chunks
        part = real(self, folder, config, fn, start, stop, wait=wait)
        done.append(start)
        return part

    monkeypatch.setattr(cache_mod.ResultCache, "_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache1")
    monkeypatch.undo()
    progress = out / "_test_counting.progress.json"
    assert progress.is_file() and not (out / "_test_counting.json").exists()
    assert sorted(json.loads(progress.read_text())["arms"]["both"]["chunks"]) == ["0-8", "8-16"]
    counting_experiment.clear()
    run_experiment("_test_counting", out_dir=out, cache_root=tmp_path / "cache2")
    assert counting_experiment == list(range(16, 40))
    assert not progress.exists()


def test_max_samples_caps_the_arms_records_it_and_a_later_run_adds_the_rest(tmp_path, counting_experiment):
    capped = run_experiment("_test_counting", out_dir=tmp_path / "out", cache_root=tmp_path / "cache", max_samples=16)
    assert counting_experiment == list(range(16))
    assert capped.row("T", "loss").n == 16
    assert capped.info["samples_capped"] == {"max_samples": 16, "full": [40]}
    assert "samples capped at 16 per arm" in format_result(capped)
    counting_experiment.clear()
    full = run_experiment("_test_counting", out_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    assert counting_experiment == list(range(16, 40))  # the capped run's chunks are reused
    assert full.row("T", "loss").n == 40 and "samples_capped" not in full.info
    # a cap above the experiment's size changes nothing and records nothing
    above = run_experiment("_test_counting", out_dir=None, cache_root=tmp_path / "cache", max_samples=100)
    assert above.row("T", "loss").n == 40 and "samples_capped" not in above.info
    with pytest.raises(InputError, match="max_samples"):
        run_experiment("_test_counting", out_dir=None, cache_root=tmp_path / "cache", max_samples=0)
    with pytest.raises(SystemExit):
        bench_main(["_test_counting", "--max-samples", "0", "--out", str(tmp_path / "o")])


def test_seed_is_part_of_the_arm_key(tmp_path, counting_experiment):
    run_experiment("_test_counting", quick=True, out_dir=None, cache_root=tmp_path)
    run_experiment("_test_counting", quick=True, out_dir=None, cache_root=tmp_path, seed=1)
    assert counting_experiment == list(range(8)) * 2


def test_unknown_experiment_lists_known_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="known: .*selftest") as err:
        run_experiment("selftst", out_dir=tmp_path, cache_root=tmp_path)
    assert "did you mean 'selftest'" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert "selftest" in available()
    assert not list(tmp_path.iterdir())


def test_registry_refuses_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        @experiment("selftest", "an impostor")
        def impostor(bench: BenchRun) -> None:
            pass


def test_bench_run_checks_its_input(tmp_path):
    bench = BenchRun("x", cache=ResultCache(tmp_path))
    with pytest.raises(InputError, match="baseline"):
        bench.measure("m", "acc", [1.0, 2.0], Claim("higher"))
    with pytest.raises(InputError, match="per_sample"):
        bench.compare("m", "acc", claim=Claim("higher"), treatment=[1.0, 2.0], baseline=[0.0, 1.0],
                      per_sample={"seed": [0]})
    bench.arm("a", {}, lambda idx: [{"v": i} for i in idx], n=2)
    with pytest.raises(InputError, match="already ran"):
        bench.arm("a", {}, lambda idx: [{"v": i} for i in idx], n=2)
    with pytest.raises(InputError, match="did you mean 'score'"):
        column([{"score": 1.0}], "scor")


# ------------------------------------------------------------------ floors and ceilings

NO_WORSE_2 = Claim("no_worse", margin=2.0, better="higher")


@pytest.mark.parametrize("claim", [NO_WORSE_2, Claim("higher"), Claim("lower"), Claim("equivalent", margin=1.0)])
@pytest.mark.parametrize("value", [0.0, 100.0])
def test_rates_stuck_at_a_floor_or_ceiling_are_uninformative(tmp_path, claim, value):
    """Both arms at 0% (or 100%) on every sample: the interval is [0, 0] and says nothing.
    Mutants caught: the old verdicts, "met" for no worse at 0% vs 0% (a quick bottleneck run's
    caption accuracy) and "missed" for higher at 100% vs 100% (GFCG's presence)."""
    bench = BenchRun("demo", cache=ResultCache(tmp_path))
    n = 8
    row = bench.compare("M", "caption accuracy", claim=claim, treatment=[value] * n, baseline=[value] * n,
                        baseline_name="B", units="%")
    assert row.verdict == "uninformative"
    assert "nothing can move" in row.notes
    assert (row.low, row.high) == (0.0, 0.0)
    old = verdict(claim, Interval(0.0, 0.0, 0.0, n))  # what the row said before
    assert old in ("met", "missed")
    table = markdown_table([row])
    assert table.splitlines()[2].endswith("| uninformative |")


def test_floor_or_ceiling_needs_both_arms_there(tmp_path):
    """Negative controls: one arm off the bound, or the arms at different bounds, or a value
    between the bounds, keep the ordinary verdict; 0/1 rates (no units) are caught as well."""
    bench = BenchRun("demo", cache=ResultCache(tmp_path))
    n = 8
    for t, b in [([100.0] * (n - 1) + [0.0], [100.0] * n), ([0.0] * n, [100.0] * n), ([50.0] * n, [50.0] * n)]:
        row = bench.compare("M", "presence", claim=Claim("higher"), treatment=t, baseline=b, units="%")
        assert row.verdict != "uninformative" and "nothing can move" not in row.notes
        assert row.verdict == verdict(Claim("higher"), Interval(row.estimate, row.low, row.high, n))
    row = bench.compare("M", "hit", claim=NO_WORSE_2, treatment=[1.0] * n, baseline=[1.0] * n)
    assert row.verdict == "uninformative"
    row = bench.compare("M", "hit", claim=NO_WORSE_2, treatment=[100.0] * n, baseline=[100.0] * n)  # not a % row
    assert row.verdict == "met"
    # a single arm's target is still judged at a bound
    assert bench.measure("M", "accuracy", [100.0] * n, Claim("at_least", target=90.0), units="%").verdict == "met"
    assert verdict(Claim("at_least", target=90.0), Interval(100.0, 100.0, 100.0, n, stat="mean"), bound=100.0) == "met"


# ------------------------------------------------------------------ report


def _rows(tmp_path):
    bench = BenchRun("demo", cache=ResultCache(tmp_path))
    bench.compare("APG", "saturation", claim=Claim("lower"), treatment=[1.0, 2.0, 3.0],
                  baseline=[2.0, 3.0, 4.5], baseline_name="CFG")
    bench.compare("AG", "time", claim=Claim("at_most", target=1.03, stat="ratio_of_means", text="a|b"),
                  treatment=[1.0, 1.1], baseline=[1.0, 1.0], baseline_name="CFG", units="s")
    return bench.rows


def test_markdown_table(tmp_path):
    table = markdown_table(_rows(tmp_path)).splitlines()
    assert table[0] == "| method | metric | claim | n | treatment | baseline | diff [95% CI] | verdict |"
    assert len(table) == 4
    assert table[2].startswith("| APG | saturation | APG saturation lower than CFG | 3 | 2 | 3.167 (CFG) | -1.167 [")
    assert table[2].endswith("| met |")
    assert "a\\|b" in table[3] and "| x1.05 [" in table[3] and "1.05 s" in table[3]


def _write_result(out: Path, name: str, quick: bool, tmp_path: Path) -> None:
    bench = BenchRun(name, quick=quick, cache=ResultCache(tmp_path))
    bench.compare("M", "full" if not quick else "quick", claim=Claim("lower"), treatment=[0.0, 1.0],
                  baseline=[1.0, 2.0])
    result = BenchResult(name, f"{name} description", quick, 0, bench.rows, {}, {}, {}, "today", 1.0)
    out.mkdir(exist_ok=True)
    (out / (f"{name}.quick.json" if quick else f"{name}.json")).write_text(json.dumps(result.to_dict()))


def test_update_benchmarks_keeps_hand_written_text(tmp_path):
    out = tmp_path / "results"
    _write_result(out, "alpha", False, tmp_path)
    _write_result(out, "alpha", True, tmp_path)  # the full run wins
    _write_result(out, "beta", True, tmp_path)  # only a quick run: used, marked quick
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nIntro by hand.\n\n<!-- bench:alpha:start -->\nstale table\n<!-- bench:alpha:end -->\n\n"
        "Closing words by hand.\n"
    )
    text = update_benchmarks(out, doc)
    assert doc.read_text() == text
    assert "Intro by hand." in text and "Closing words by hand." in text and "stale table" not in text
    assert text.index("Intro by hand.") < text.index("### alpha") < text.index("Closing words") < text.index("### beta")
    assert "| M | full |" in text and "| M | quick |" in text and "### beta (quick run)" in text
    assert text.count("<!-- bench:alpha:start -->") == 1 and text.count("<!-- bench:beta:end -->") == 1
    assert update_benchmarks(out, doc) == text  # idempotent
    # a running bench's progress file is not a result (mutant: globbing it made an empty section)
    (out / "gamma.progress.json").write_text(json.dumps({"experiment": "gamma", "arms": {}}))
    assert update_benchmarks(out, doc) == text and "gamma" not in text
    new_doc = tmp_path / "new" / "benchmarks.md"
    assert update_benchmarks(out, new_doc, names=["beta"]).startswith("# Benchmarks")
    assert "### alpha" not in new_doc.read_text()


def test_cli_runs_and_lists(tmp_path, capsys):
    assert bench_main(["selftest", "--quick", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"),
                       "--docs", str(tmp_path / "bench.md")]) == 0
    printed = capsys.readouterr().out
    assert "| improved | loss |" in printed and "selftest.quick.json" in printed
    assert "<!-- bench:selftest:start -->" in (tmp_path / "bench.md").read_text()
    assert bench_main(["--list"]) == 0
    assert "selftest" in capsys.readouterr().out


_WORKER = r"""
import json, os, sys, time
from flowkit.bench.cache import ResultCache
root, log = sys.argv[1], sys.argv[2]
open(log + f".started-{os.getpid()}", "w").close()
def fn(indices):
    deadline = time.time() + 60
    while len(__import__("glob").glob(log + ".started-*")) < 2 and time.time() < deadline:
        time.sleep(0.01)  # both workers are up before any chunk finishes
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "indices": indices}) + "\n")
    time.sleep(0.2)
    return [{"index": i, "value": i * i} for i in indices]
out = ResultCache(root, poll=0.05).run_cached_chunks("exp", {"arm": "shared"}, 40, fn, chunk=4)
print(json.dumps(out))
"""


def test_two_processes_share_the_chunks_of_one_arm(tmp_path):
    import subprocess
    import sys

    log_path = tmp_path / "computed.jsonl"
    cmd = [sys.executable, "-c", _WORKER, str(tmp_path / "cache"), str(log_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = [{"index": i, "value": i * i} for i in range(40)]
    assert outs[0] == expected and outs[1] == expected
    calls = [json.loads(line) for line in log_path.read_text().splitlines()]
    chunks = sorted(c["indices"][0] for c in calls)
    assert chunks == list(range(0, 40, 4))  # every chunk computed exactly once
    assert len({c["pid"] for c in calls}) == 2  # and both processes did some of them
    assert not list((tmp_path / "cache").rglob("*.claim"))  # claims are released


def test_a_chunk_claimed_by_a_live_process_is_left_to_it_and_awaited(tmp_path):
    import socket
    import subprocess
    import sys
    import threading

    from flowkit.bench.cache import CacheClaim

    cache = ResultCache(tmp_path, poll=0.02)
    config = {"arm": "x"}
    path = cache.chunk_dir("exp", config) / "000002-000004.json"
    path.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        CacheClaim(path).path.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "time": 0}))
        computed: list[int] = []

        def fn(indices):
            computed.extend(indices)
            return [{"index": i, "by": "us"} for i in indices]

        def other_finishes():  # the other process writes its chunk, then drops its claim
            import time

            time.sleep(0.3)
            from flowkit.bench.cache import write_json_atomic

            write_json_atomic(path, {"config": config, "results": [{"index": 2, "by": "them"}, {"index": 3, "by": "them"}]})
            CacheClaim(path).path.unlink()

        t = threading.Thread(target=other_finishes)
        t.start()
        out = cache.run_cached_chunks("exp", config, 6, fn, chunk=2)
        t.join()
    finally:
        other.kill()
        other.wait()
    assert computed == [0, 1, 4, 5]  # the claimed chunk was skipped, then read back
    assert [r["by"] for r in out] == ["us", "us", "them", "them", "us", "us"]


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from flowkit.bench.cache import CacheClaim, hold_claim

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = ResultCache(tmp_path, poll=0.02)
    path = cache.chunk_dir("exp", {}) / "000000-000002.json"
    path.parent.mkdir(parents=True)
    claim_file = CacheClaim(path).path
    claim_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": 0}))
    out = cache.run_cached_chunks("exp", {}, 2, lambda idx: [{"i": i} for i in idx], chunk=2)
    assert out == [{"i": 0}, {"i": 1}] and not claim_file.exists()
    # an old claim from another host is stale after the timeout, a fresh one is not
    claim_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    assert not CacheClaim(path, timeout=3600).stale() and CacheClaim(path, timeout=0).stale()
    claim_file.unlink()
    # a failing computation releases its claim; hold_claim releases on exit
    with pytest.raises(RuntimeError):
        ResultCache(tmp_path).run_cached_chunks("exp", {"b": 1}, 2, lambda idx: (_ for _ in ()).throw(RuntimeError()), chunk=2)
    assert not list(tmp_path.rglob("*.claim"))
    with hold_claim(tmp_path / "fit.json") as held:
        assert held.held and (tmp_path / "fit.json.claim").exists()
        assert not CacheClaim(tmp_path / "fit.json").try_acquire()  # the same process, another claimant
    assert not (tmp_path / "fit.json.claim").exists()
