"""BOSS: the dynamic program against brute force, the cost matrices' exact identities, the
stored tables' round trip, the grid on the analytic Gaussian world, and the sampler on the
tiny pipelines of each family."""

import copy
import functools
import itertools
import json
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import analytic
import flowkit
import tiny_pipes
from flowkit.boss import (BossTable, Problem, best_path, endpoint_cost, final_error, find_table, fingerprint,
                          load_table, local_cost, path_cost, resolve_table, search_final, tune_table)
from flowkit.denoiser import FunctionDenoiser
from flowkit.errors import InputError, SpecError
from flowkit.guidance_base import GuidanceStack
from flowkit.paths import LinearPath
from flowkit.samplers import Boss, Euler
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid
from flowkit.cli.tune import parse_steps_list

one_thread = tiny_pipes.one_thread


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- the dynamic program -----------------------------------------------------------------

def brute_force(c: np.ndarray, k: int) -> float:
    m = c.shape[0] - 1
    return min(path_cost(c, [0, *inner, m]) for inner in itertools.combinations(range(1, m), k - 1))


@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force_on_random_non_monotone_costs(seed):
    rng = np.random.default_rng(seed)
    m = 8
    c = rng.normal(size=(m + 1, m + 1)) * rng.choice([1, 10], size=(m + 1, m + 1))  # signs and scales mixed
    for k in range(1, m + 1):
        path, total = best_path(c, k)
        assert path[0] == 0 and path[-1] == m and len(path) == k + 1 and all(a < b for a, b in zip(path, path[1:]))
        assert total == pytest.approx(path_cost(c, path), abs=1e-12)
        assert total == pytest.approx(brute_force(c, k), abs=1e-12)


def test_dp_beats_uniform_where_uniform_is_provably_not_optimal():
    # c_ij = w_i (j - i)^2: a step costs its length squared, 25x more where the path starts.
    # For K = 2 on 8 points uniform (0-4-8) costs 25*16 + 16 = 416; 0-2-8 costs 25*4 + 36 = 136,
    # and the exact optimum (by hand: min over s of 25 s^2 + (8 - s)^2, s integer) is s = 1: 74.
    m = 8
    w = np.array([25.0] + [1.0] * m)
    i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
    c = w[:, None] * (j - i) ** 2.0
    path, total = best_path(c, 2)
    assert path_cost(c, [0, 4, 8]) == 416.0
    assert path == [0, 1, 8] and total == 74.0
    assert total == brute_force(c, 2)


def test_dp_refuses_impossible_step_counts_and_nan():
    c = np.zeros((5, 5))
    for k in (0, 5, 2.5):
        with pytest.raises(InputError, match="steps"):
            best_path(c, k)
    c[0, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        best_path(c, 2)


def test_dp_refuses_infeasible_step_counts():
    """+inf above the diagonal (a step that cannot be taken): a step count with no finite path
    is an error naming it and the feasible counts. Mutant caught: returning cost inf with a
    non-monotone path such as [0, 0, 0, 0, 5] (the DP's argmin over an all-inf column)."""
    m = 5
    c = np.triu(np.ones((m + 1, m + 1)), 1)
    c[0, 1:m] = np.inf  # from point 0 only the single step to M is possible
    path, total = best_path(c, 1)
    assert path == [0, m] and total == 1.0  # the feasible count still works
    for k in (2, 4):
        with pytest.raises(InputError, match=rf"cannot choose {k} steps.*finite path: 1\b"):
            best_path(c, k)
    c[0, m] = np.inf
    with pytest.raises(InputError, match="cannot choose 1 steps.*finite path: none"):
        best_path(c, 1)
    everything = np.full((m + 1, m + 1), np.inf)
    with pytest.raises(InputError, match="cannot choose 4 steps"):
        best_path(everything, 4)
    c = np.triu(np.ones((m + 1, m + 1)), 1)
    c[2, 3] = -np.inf
    with pytest.raises(InputError, match="-inf"):
        best_path(c, 3)


def test_table_with_null_costs_refuses_infeasible_steps(tmp_path):
    """JSON null above the diagonal of a table file is a missing step: the table still gives
    its feasible grids and refuses the others by name, and a stored grid that is not strictly
    decreasing is refused on load. Mutant caught: a table that returns the grid
    [t0, t0, t0, t0, t5] (repeated times) for an infeasible count."""
    path = _table(k_max=5).save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    for j in range(1, 5):
        data["cost"][0][j] = None  # only the one-step path 0 -> 5 remains
    data["grids"] = {}
    path.write_text(json.dumps(data))
    table = load_table(path)
    assert table.times(1).tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match=r"BOSS table .*cannot choose 4 steps.*finite path: 1\b"):
        table.times(4)
    with pytest.raises(InputError, match="cannot choose 2 steps"):
        TimeGrid.parse(f"boss:{path}").build(2, LinearPath())
    data["grids"] = {"4": [1.0, 1.0, 1.0, 1.0, 0.0]}  # what the unfixed DP stored
    path.write_text(json.dumps(data))
    with pytest.raises(flowkit.errors.WeightsError, match="strictly decreasing"):
        load_table(path)


# -- costs on the analytic Gaussian world ------------------------------------------------------

def _problem(n: int, den=None) -> Problem:
    return Problem(den or analytic.denoiser(), GuidanceStack([]), {"cond": analytic.conds(n)["cond"]},
                   generators_for(0, range(n)))


def test_local_cost_identities_and_nfe():
    n, m = 4, 6
    prob = _problem(n)
    ts = LinearPath().uniform_grid(m)
    x = randn_per_sample((5,), generators_for(3, range(n)))
    tr = prob.euler(x, ts)
    c = local_cost(tr)
    assert prob.nfe == n * m  # one velocity per point, shared by every jump from it
    assert np.allclose(np.diag(c, 1), 0.0, atol=1e-10)  # one fine step is the trajectory itself
    assert np.isinf(c[np.tril_indices(m + 1)]).all()
    by_hand = ((tr.xs[0].double() - tr.vs[0].double() - tr.xs[m].double()) ** 2).sum(-1).mean()  # t: 1 -> 0
    assert c[0, m] == pytest.approx(float(by_hand), rel=1e-9)


def test_endpoint_cost_identities_and_nfe():
    n, m = 3, 5
    prob = _problem(n)
    tr = prob.euler(randn_per_sample((4,), generators_for(4, range(n))), LinearPath().uniform_grid(m))
    base = prob.nfe
    e = endpoint_cost(prob, tr, max_rows=2 * n)  # chunked rollouts
    assert prob.nfe - base == n * sum(j * (m - j) for j in range(1, m))  # one rollout per jump
    assert np.allclose(e[:, m][:m], local_cost(tr)[:, m][:m])  # a jump to the end lands at the end
    assert np.allclose(np.diag(e, 1), 0.0, atol=1e-9)


def test_boss_grid_beats_uniform_on_the_gaussian_world():
    """Euler's error against the exact ODE solution (mu + s z) is lower on the BOSS grid of a
    few steps than on the uniform grid of as many steps (data N(mu, 0.2^2): the flow bends
    late, and BOSS moves its steps there)."""
    s = 0.2
    den = FunctionDenoiser(functools.partial(analytic.gaussian_velocity, s=s), LinearPath(), "velocity")
    table = tune_table(_problem(8, den), (6,), k_max=48, steps=[3, 4])
    noise = randn_per_sample((6,), generators_for(9, range(16))).double()

    def err(ts):
        x, _ = integrate(Euler(), analytic.context(16, len(ts) - 1, den=den), noise, ts)
        return float((x - (analytic.MU + s * noise)).pow(2).mean())

    for k in (3, 4):
        boss, uniform = err(table.times(k)), err(LinearPath().uniform_grid(k))
        assert boss < 0.5 * uniform, (k, boss, uniform)
    mirrored = 1.0 - table.times(4).flip(0)  # control: the same steps, crowded at the noisy end instead
    assert err(mirrored) > err(LinearPath().uniform_grid(4))


def _gaussian_trajectories(n=8, m=12, s=0.2):
    den = FunctionDenoiser(functools.partial(analytic.gaussian_velocity, s=s), LinearPath(), "velocity")
    prob = _problem(n, den)
    ts = LinearPath().uniform_grid(m)
    return prob, prob.euler(randn_per_sample((6,), generators_for(1, range(n))) * float(ts[0]), ts)


def test_final_error_is_the_error_of_k_euler_steps_at_the_end():
    prob, tr = _gaussian_trajectories()
    path = [0, 5, 9, 12]
    x, _ = integrate(Euler(), analytic.context(8, 3, den=prob.denoiser), tr.xs[0].double(), tr.ts[path])
    by_hand = (x - tr.xs[-1].double()).pow(2).sum(-1).mean()
    assert final_error(prob, tr, path) == pytest.approx(float(by_hand), rel=1e-6)
    assert final_error(prob, tr, list(range(13))) == pytest.approx(0.0, abs=1e-10)  # the fine path itself


def test_final_error_search_finds_the_brute_force_optimum_the_local_cost_misses():
    """On the Gaussian world (M = 12, K = 3) the local cost's grid is not the grid of least
    final error; the search finds the brute-force optimum from it (mutant: a search that
    returns its start unchanged keeps the local grid, [0, 7, 10, 12])."""
    prob, tr = _gaussian_trajectories()
    local = best_path(local_cost(tr), 3)[0]
    path, err, evaluated = search_final(prob, tr, 3, local)
    brute = min(([0, *inner, 12] for inner in itertools.combinations(range(1, 12), 2)),
                key=lambda p: final_error(prob, tr, p))
    assert path == brute and err == pytest.approx(final_error(prob, tr, brute))
    assert err < 0.8 * final_error(prob, tr, local)
    assert evaluated < 55  # fewer grids than the exhaustive search
    with pytest.raises(InputError, match="takes 1 to 12 steps"):
        search_final(prob, tr, 13, list(range(13)))


def test_final_table_keeps_only_its_searched_grids(cache):
    """A `final` table gives the searched grids and refuses other step counts (its matrix is
    the local cost: the DP would hand out the local grid under the final label), and the
    lookup does not offer it for them (mutant: `has` ignoring the kind returns it for 2 steps)."""
    prob, _ = _gaussian_trajectories()
    table = tune_table(prob, (6,), k_max=12, cost="final", steps=[3], seed=1)
    prob2, tr = _gaussian_trajectories()
    path, _, _ = search_final(prob2, tr, 3, best_path(local_cost(tr), 3)[0])
    assert table.times(3).tolist() == tr.ts[path].tolist()
    assert np.array_equal(table.cost, local_cost(tr))
    with pytest.raises(InputError, match="searched on final error for \\[3\\] steps, not 2"):
        table.times(2)
    table.fingerprint = "f" * 24
    table.save_to_cache()
    assert find_table("f" * 24, (6,), "final", min_steps=3) is not None
    assert find_table("f" * 24, (6,), "final", min_steps=2) is None
    assert load_table(table.save(cache / "t.json")).times(3).tolist() == table.times(3).tolist()


def test_tune_cli_reports_the_cost_of_the_grid_it_stored(capsys):
    """`flowkit tune boss --cost final` reports the local cost of the searched grid, not of the
    DP's grid (mutant: the report's cost from best_path)."""
    from flowkit.cli import main

    assert main(["tune", "boss", "--model", "tiny", "--cost", "final", "--steps", "3", "--k-max", "6",
                 "--samples", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    path = report["files"][0]
    table = load_table(path)
    (grid,) = report["grids"]
    assert grid["times"] == [round(v, 6) for v in table.times(3).tolist()]
    assert grid["cost"] == pytest.approx(path_cost(table.cost, table.indices(3)))
    assert table.indices(3) != best_path(table.cost, 3)[0]  # on the tiny model the two grids differ


def test_tune_boss_refuses_trajectories_past_the_memory_limit_before_any_work(monkeypatch):
    """Audit of #22: every number within its limit, `tune_boss` (the library, and the command
    line on a model folder, whose latent size is known only once loaded) would keep 2.2 TB of
    trajectories. It refuses in one InputError before encoding a prompt. Mutant caught: no
    check_tune_memory in tune_boss (the encoder runs)."""
    from flowkit.adapters.shapes import ShapesAdapter
    from flowkit.tune import tune_boss

    def no_work(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(ShapesAdapter, "encode_sized", no_work)
    pipe = flowkit.load("tiny")
    with pytest.raises(InputError, match=r"--samples 100000 x --k-max 1000 would keep 2,291.1 GiB .* 8 GiB limit"):
        tune_boss(pipe, prompts=["a red circle"], samples=100_000, k_max=1000, steps=[4])
    with pytest.raises(InputError, match="8 GiB limit"):  # 256 px: 64 times the values of 32 px
        tune_boss(pipe, prompts=["a red circle"], samples=6, k_max=1000, height=256, width=256)
    with pytest.raises(AssertionError, match="tuning started"):  # within the limit: the work starts
        tune_boss(pipe, prompts=["a red circle"], samples=300, k_max=1000, height=32, width=32)


# -- tables: fingerprint, round trip, lookup ------------------------------------------------------

def test_fingerprint_follows_weights_and_config():
    from diffusers import UNet2DConditionModel

    from flowkit.worlds.shapes_pipeline import shapes_unet_config

    def unet(seed, **over):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**shapes_unet_config("tiny"), **over})

    a = unet(0)
    b = copy.deepcopy(a)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.conv_in.bias[0] += 1e-3  # one value of a tensor the strided sample reads
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(unet(1))  # another checkpoint of the architecture
    c = copy.deepcopy(a)
    c.register_to_config(sample_size=16)
    assert fingerprint(a) != fingerprint(c)  # same weights, another config


def _table(k_max=6) -> BossTable:
    rng = np.random.default_rng(0)
    c = np.triu(rng.random((k_max + 1, k_max + 1)), 1)
    c[np.tril_indices(k_max + 1)] = np.inf
    return BossTable(fingerprint="f" * 24, shape=(3, 8, 8), cost_kind="local",
                     fine=np.linspace(1, 0, k_max + 1).tolist(), cost=c, samples=4, prompts=["a"], guidance="none",
                     prompts_key="abc", model="test").choose([2, 3])


def test_table_round_trip(tmp_path):
    t = _table()
    path = t.save(tmp_path / "t.json")
    back = load_table(path)
    assert back.to_dict() == t.to_dict()
    assert np.array_equal(back.cost, t.cost)  # inf below the diagonal survives JSON (as null)
    for k in range(1, t.k_max + 1):
        assert torch.equal(back.times(k), t.times(k))
    assert torch.equal(TimeGrid.parse(f"boss:{path}").build(3, LinearPath()), t.times(3))
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(flowkit.errors.WeightsError, match="tune boss"):
        load_table(path)


def test_lookup_prefers_tuned_tables_and_checks_shape(cache):
    auto, tuned = _table(), _table()
    auto.prompts_key = "auto"
    auto.save_to_cache()
    assert find_table("f" * 24, (3, 8, 8), "local").prompts_key == "auto"
    tuned.save_to_cache()
    assert find_table("f" * 24, (3, 8, 8), "local").prompts_key == "abc"
    assert find_table("f" * 24, (3, 16, 16), "local") is None
    assert find_table("f" * 24, (3, 8, 8), "endpoint") is None
    assert find_table("f" * 24, (3, 8, 8), "local", min_steps=7) is None
    with pytest.raises(InputError, match="no BOSS table"):
        resolve_table("no-such-table")


def test_lookup_keeps_tables_to_the_guidance_they_were_tuned_under(cache):
    """A table tuned without guidance is not taken for a CFG run, nor the other way round
    (mutant: a lookup that ignores the guidance returns the unguided table)."""
    plain = _table()
    plain.guidance = "none"
    plain.save_to_cache()
    assert find_table("f" * 24, (3, 8, 8), "local", guidance="cfg:scale=4.0") is None
    assert find_table("f" * 24, (3, 8, 8), "local", guidance="none") is not None
    guided = _table()
    guided.guidance, guided.prompts_key = "cfg:scale=4.0", "guided"
    guided.save_to_cache()
    assert find_table("f" * 24, (3, 8, 8), "local", guidance="cfg:scale=4.0").prompts_key == "guided"


def test_on_the_fly_tuning_runs_under_the_runs_guidance(cache):
    """The boss sampler tunes under the run's stack (CFG: two evaluations per fine step) and
    stores the table under it; a run with another stack tunes again (mutant: the old unguided
    tuning records 'none' and one evaluation per step)."""
    from flowkit.boss import tuning

    pipe = flowkit.load("tiny")
    seen = []
    real = tuning.tune_table

    def spy(problem, *args, **kwargs):
        table = real(problem, *args, **kwargs)
        seen.append((kwargs["guidance"], table.nfe))
        return table

    with mock.patch("flowkit.boss.tuning.tune_table", side_effect=spy), \
            mock.patch("flowkit.boss.tune_table", side_effect=spy):
        for guidance in ("cfg:scale=3", "cfg:scale=3", "none"):
            flowkit.sample(pipe, ["a red circle"], sampler=Boss(k_max=4, samples=2), steps=2, guidance=guidance,
                           seed=0, output_type="latent")
    assert [g for g, _ in seen] == ["cfg:scale=3.0", "none"]  # the second CFG run reused its table
    assert seen[0][1] == 2 * 4 * 2 and seen[1][1] == 4 * 2  # samples x fine steps x branches


def test_boss_grid_spec_errors():
    with pytest.raises(SpecError, match="needs a table"):
        TimeGrid.parse("boss")
    with pytest.raises(InputError, match="no BOSS table"):
        TimeGrid.parse("boss:nothing-here").build(4, LinearPath())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_fuzz_steps_list_parses_or_says_what_to_change(text):
    try:
        steps = parse_steps_list(text)
    except InputError as e:
        assert str(e).startswith("--steps")
        return
    assert steps == sorted(set(steps)) and all(isinstance(k, int) and k >= 1 for k in steps)


# -- the sampler on each family's tiny pipeline ---------------------------------------------------

@pytest.mark.parametrize("family", ["shapes", "sd", "sd3", "flux"])
def test_boss_sampler_tunes_once_then_reuses(family):
    pipe = flowkit.load("tiny") if family == "shapes" else tiny_pipes.cached(family)
    smp = Boss(k_max=6, samples=2)
    out = flowkit.sample(pipe, ["a red circle", "two blue squares"], sampler=smp, steps=3, guidance="none",
                         seed=0, output_type="latent")
    assert out.stats.nfe == [3, 3]
    assert len(out.stats.grid) == 4 and out.stats.grid[-1] == 0.0
    table = find_table(smp_fp(pipe), tuple(out.latents.shape[1:]), "local")
    assert table is not None and table.prompts_key == "auto"
    assert out.stats.grid == table.times(3).tolist()
    assert [r.t for r in out.stats.steps] == out.stats.grid[:-1]
    with mock.patch("flowkit.boss.tuning.tune_table", side_effect=AssertionError("must reuse the cache")):
        again = flowkit.sample(pipe, ["a red circle", "two blue squares"], sampler=smp, steps=3, guidance="none",
                               seed=0, output_type="latent")
    assert torch.equal(again.latents, out.latents)


def smp_fp(pipe):
    from flowkit.adapters.base import adapt
    from flowkit.boss import model_fingerprint

    return model_fingerprint(adapt(pipe).denoiser)


def test_boss_sampler_refuses_a_table_of_another_model(tmp_path):
    path = _table().save(tmp_path / "other.json")
    with pytest.raises(InputError, match="another model"):
        flowkit.sample(flowkit.load("tiny"), "a red circle", sampler=f'boss:table="{path}"', steps=2,
                       guidance="none", output_type="latent")
    with pytest.raises(InputError, match="no BOSS table"):
        flowkit.sample(flowkit.load("tiny"), "a red circle", sampler="boss:auto=false", steps=2, guidance="none",
                       output_type="latent")


def test_shipped_table_belongs_to_the_shipped_shapes_model(cache):
    """flowkit/weights/boss/shapes.json was tuned on the shipped weights: with an empty cache
    and no on-the-fly tuning, `boss` on the shapes model samples on that table's grid."""
    pipe = flowkit.load("shapes")
    shipped = resolve_table("shapes")
    assert shipped.fingerprint == smp_fp(pipe) and tuple(shipped.shape) == (3, 32, 32)
    for k in (4, 6, 8):
        times = shipped.times(k)
        assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    with mock.patch("flowkit.boss.tuning.tune_table", side_effect=AssertionError("must use the shipped table")):
        out = flowkit.sample(pipe, "a red circle", sampler="boss:auto=false", steps=4, output_type="latent")
    assert out.stats.grid == shipped.times(4).tolist()
    assert out.stats.grid != TimeGrid.uniform().build(4, LinearPath()).tolist()  # not the uniform grid


# -- the straightening fine-tune ------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank", [0, 2])
def test_straightening_finetune_lowers_its_loss_and_exports_a_table(tmp_path, lora_rank):
    from flowkit.train import TrainConfig, targets, train
    from flowkit.train.boss import BossTask

    assert "boss" in targets()
    task = BossTask(model="tiny", steps=2, k_max=4, trajectories=4, lora_rank=lora_rank)
    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3 if lora_rank else 1e-3, warmup=1, ema_decay=0.0, ckpt_every=100)
    losses = train(task, cfg, tmp_path, progress=False)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    if lora_rank:  # only the adapters train
        model = task.build()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    table = load_table(tmp_path / "export" / "boss.json")
    pipe = flowkit.load(str(tmp_path / "export"))
    assert table.fingerprint == smp_fp(pipe)  # the table belongs to the exported weights
    assert table.times(2).tolist() == task.data()["fine"][best_path(task.data()["cost"], 2)[0]].tolist()
    out = flowkit.sample(pipe, "a red circle", sampler=f'boss:table="{tmp_path / "export" / "boss.json"}"', steps=2,
                         guidance="none", output_type="latent")
    assert out.stats.grid == table.times(2).tolist()
