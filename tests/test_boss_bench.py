"""The BOSS bench's helpers (flowkit/bench/experiments/boss.py): which grids get arms of their
own, the local cost of a grid under each tuning seed's matrix, the explicit-sigmas grids, and
the cache keys of tables tuned from other seeds."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowkit
from flowkit.bench.experiments.boss import (boss_table_file, equal_groups, grid_costs, new_grids, seed_spread,
                                           sigmas)
from flowkit.boss import BossTable, load_table, path_cost
from flowkit.paths import LinearPath
from flowkit.timegrid import TimeGrid


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _table(seed: int, k_max: int = 6) -> BossTable:
    c = np.triu(np.random.default_rng(seed).random((k_max + 1, k_max + 1)) + 0.1, 1)
    c[np.tril_indices(k_max + 1)] = np.inf
    return BossTable(fingerprint="f" * 24, shape=(3, 8, 8), cost_kind="local",
                     fine=np.linspace(1, 0, k_max + 1).tolist(), cost=c, samples=4, prompts=["a"], guidance="cfg:scale=4.0", prompts_key=f"s{seed}")


def test_new_grids_keeps_only_grids_not_yet_run():
    """A seed's grid equal to the bench table's, the shipped one or an earlier seed's gets no
    arm (mutants: a check that forgets the earlier seeds, or ignores the known grids)."""
    known = [[1.0, 0.5, 0.0], [1.0, 0.75, 0.0]]
    grids = {"seed 0": [1.0, 0.5, 0.0], "seed 1": [1.0, 0.25, 0.0], "seed 2": [1.0, 0.25 + 1e-12, 0.0],
             "seed 3": [1.0, 0.75, 0.5, 0.0]}
    assert new_grids(grids, known) == {"seed 1": [1.0, 0.25, 0.0], "seed 3": [1.0, 0.75, 0.5, 0.0]}
    assert new_grids({}, known) == {}


def test_equal_groups_names_the_grids_that_coincide():
    """Which named grids are one grid (e.g. the final-error grid that stayed uniform), so a row
    between them is read as a grid against itself (mutant: the first member left out)."""
    grids = {"uniform": [1.0, 0.5, 0.0], "bench table": [1.0, 0.75, 0.0], "final table": [1.0, 0.5, 0.0],
             "shipped": [1.0, 0.75, 0.0], "endpoint table": [1.0, 0.25, 0.0]}
    assert equal_groups(grids) == [["uniform", "final table"], ["bench table", "shipped"]]
    assert equal_groups({"a": [1.0, 0.0]}) == []


def test_grid_costs_reads_each_seeds_own_matrix():
    """The cost of a grid under each table is the path cost in that table's matrix; a grid off a
    table's fine grid has none (mutant: every table read through the first one's matrix)."""
    a, b = _table(0), _table(1)
    grids = {"g": [1.0, 0.5, 0.0], "off": [1.0, 0.3, 0.0]}
    costs = grid_costs({"a": a, "b": b}, grids)
    assert costs["g"] == {"a": pytest.approx(path_cost(a.cost, [0, 3, 6])),
                          "b": pytest.approx(path_cost(b.cost, [0, 3, 6]))}
    assert costs["g"]["a"] != costs["g"]["b"]
    assert costs["off"] == {"a": None, "b": None}


def test_seed_spread_records_each_seeds_grid_and_the_others_costs():
    tables = {"seed 0": _table(0), "seed 1": _table(1), "seed 2": _table(0)}
    spread = seed_spread(tables, {"uniform": [1.0, 0.5, 0.0]}, 2)
    assert spread["grids"] == {name: t.times(2).tolist() for name, t in tables.items()}
    assert spread["distinct"] == len({tuple(g) for g in spread["grids"].values()})
    assert set(spread["local_cost"]) == {"seed 0", "seed 1", "seed 2", "uniform"}
    # each seed's grid is the cheapest under its own matrix: no other grid beats it there
    for name in tables:
        own = spread["local_cost"][name][name]
        assert all(spread["local_cost"][g][name] >= own - 1e-12 for g in spread["local_cost"])


def test_sigmas_spec_walks_exactly_the_given_times():
    times = [1.0, 0.78125, 0.546875, 0.265625, 0.0]
    assert TimeGrid.parse(sigmas(times)).build(4, LinearPath()).tolist() == times


def test_other_tuning_seeds_get_their_own_tables_and_the_bench_seed_keeps_its_key(cache):
    """boss_table_file(seed=s) tunes from seed s's noise into a file of its own; the bench's own
    seed keeps the key without a seed suffix, so its cached table and arms stay valid (mutant:
    a key without the seed hands seed 101 the bench seed's table)."""
    items = [("a red circle", None), ("two blue squares", None)]
    shapes = SimpleNamespace(pipe=flowkit.load("tiny"), items=items, size=32, bench=SimpleNamespace(seed=0),
                             base={"model": "tiny"})
    with torch.no_grad():
        own = boss_table_file(shapes, "local", 4, 2)
        assert boss_table_file(shapes, "local", 4, 2, seed=0) == own
        other = boss_table_file(shapes, "local", 4, 2, seed=101)
    assert "-seed" not in own and other.endswith("-seed101.json") and other != own
    assert not np.allclose(load_table(own).cost[0, 1:], load_table(other).cost[0, 1:])
