"""boss: Bellman optimal step sizes vs uniform and shifted grids of the same length.

The claim of Nguyen et al. ("Bellman Optimal Step-size Straightening of Flow-Matching
Models"): at few steps (4-6 NFE) Euler on the BOSS grid gives a much lower FID than on a
uniform grid. Here on the shapes world, at 4, 6 and 8 Euler steps under CFG at the model's
scale, paired with the uniform grid and the SD3-style shifted grid (shift 3) of the same
length (same prompts and seeds): FSD (to renders of the same captions) lower, the paired
distance to a 64-step reference image of the same seed (classifier features) lower, and
caption accuracy no worse (2 points). Every row names the table its grid comes from:

- the bench table: the paper's local cost, tuned here on the bench's model, prompts and
  guidance (`flowkit.boss.tune_table`, cached under $FLOWKIT_CACHE/boss; 32 trajectories);
- the shipped table (flowkit/weights/boss/shapes.json, 64 trajectories, CFG 4), its grids
  walked as explicit sigmas;
- the tuning-seed spread: the bench table tuned again from other noise seeds; each seed's
  grids and their local costs under every seed's matrix go to bench.info, and a grid that
  differs from the bench table's, the shipped one and uniform gets arms and rows of its own;
- flowkit's variants, labelled so: the end-point cost (each jump rolled out to the end, small
  fine grid) against the local cost, and the grid searched directly on the final error
  (`flowkit.boss.search`, cost kind `final`) against uniform and the local cost.

Not here: the paper's second half, the straightening fine-tune (`flowkit train boss`); see
docs/benchmarks.md for why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.verdict import Claim
from flowkit.boss import BossTable, load_table, path_cost, resolve_table

STEPS = (4, 6, 8)
REFERENCE_STEPS = 64
SHIFT = 3.0
NO_WORSE = Claim("no_worse", margin=2.0, better="higher")
VERSION = 1
SEED_STRIDE = 101  # tuning seed j (j = 0 is the bench's own seed): bench.seed + SEED_STRIDE * j


def boss_table_file(shapes: ShapesBench, cost: str, k_max: int, samples: int, seed: int | None = None) -> str:
    """The BOSS table of the bench's model, prompts and guidance (tuned once, then cached) from
    the noise of `seed` (default: the bench's seed, whose tables keep their cache key)."""
    import torch

    from flowkit.adapters.base import adapt
    from flowkit.api import build_guidance
    from flowkit.boss import Problem, cache_root, model_fingerprint, tune_table
    from flowkit.boss.cost import prompts_key
    from flowkit.seeding import generators_for

    adapter = adapt(shapes.pipe)
    stack = build_guidance(None, adapter.default_guidance_scale)
    prompts = [t for t, _ in shapes.items]
    shape = adapter.latent_shape(shapes.size, shapes.size)
    seed = shapes.bench.seed if seed is None else seed
    key = prompts_key(prompts, stack.describe()) + ("" if seed == shapes.bench.seed else f"-seed{seed}")
    dims = "x".join(str(v) for v in shape)
    path = cache_root() / model_fingerprint(adapter.denoiser) / f"{dims}-{cost}-k{k_max}-n{samples}-{key}.json"
    if not path.is_file():
        rows = [prompts[i % len(prompts)] for i in range(samples)]
        with torch.no_grad():
            conds = adapter.encode_sized(rows, None, True, shapes.size, shapes.size)
            problem = Problem(adapter.denoiser, stack, conds, generators_for(seed, range(samples)),
                              adapter.device, adapter.encoder())
            table = tune_table(problem, shape, k_max=k_max, cost=cost, seed=seed, prompts=prompts,
                               guidance=stack.describe(), key=key, model=shapes.base["model"], steps=STEPS)
        assert table.save_to_cache() == path
    return str(path)


def sigmas(times: Any) -> str:
    """A grid as an explicit `sigmas:` spec (portable: no cache path; the arm's cache key is the
    grid itself)."""
    return "sigmas:" + ";".join(repr(float(v)) for v in times)


def grid_costs(tables: dict[str, BossTable], grids: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """The local cost of each named grid under each named table's cost matrix: grid -> table ->
    cost (None where the grid's times are not all points of that table's fine grid)."""
    out: dict[str, dict[str, float | None]] = {}
    for g, times in grids.items():
        out[g] = {}
        for name, table in tables.items():
            fine = np.asarray(table.fine)
            hits = [np.flatnonzero(np.isclose(fine, t, rtol=0, atol=1e-9)) for t in times]
            out[g][name] = (float(path_cost(table.cost, [int(h[0]) for h in hits]))
                            if all(len(h) == 1 for h in hits) else None)
    return out


def new_grids(grids: dict[str, list[float]], known: list[list[float]]) -> dict[str, list[float]]:
    """The named grids that are none of `known` nor an earlier one of `grids` (by value, to 1e-9):
    only those need arms of their own."""
    seen = [np.asarray(g, dtype=np.float64) for g in known]
    out = {}
    for name, g in grids.items():
        a = np.asarray(g, dtype=np.float64)
        if not any(a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-9) for b in seen):
            out[name] = list(g)
            seen.append(a)
    return out


def reference_distance(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> np.ndarray:
    """Per sample: the classifier-feature distance to the reference image of the same seed."""
    a = np.asarray([r["features"] for r in records])
    b = np.asarray([r["features"] for r in reference])
    return np.linalg.norm(a - b, axis=1)

def equal_groups(grids: dict[str, list[float]]) -> list[list[str]]:
    """The names of grids that are the same grid (by value, to 1e-9), in groups of two or more:
    a row between two of them compares a grid with itself."""
    groups: list[list[str]] = []
    for name, g in grids.items():
        for group in groups:
            if not new_grids({name: g}, [grids[group[0]]]):
                group.append(name)
                break
        else:
            groups.append([name])
    return [group for group in groups if len(group) > 1]


def seed_spread(seed_tables: dict[str, BossTable], others: dict[str, list[float]], k: int) -> dict[str, Any]:
    """What several tuning seeds say at `k` steps: each seed's grid, how many distinct grids
    they chose, and the local cost of every grid (theirs and `others`, e.g. shipped, uniform)
    under every seed's cost matrix (the spread shows how flat the optimum is)."""
    grids = {name: t.times(k).tolist() for name, t in seed_tables.items()}
    return {"grids": grids, "distinct": len(new_grids(grids, [])),
            "local_cost": grid_costs(seed_tables, {**grids, **others})}


@experiment("boss", "BOSS step sizes vs uniform and shifted grids at 4, 6, 8 Euler steps: FSD, distance to a "
                    "64-step reference, caption accuracy; the bench's table, the shipped one and other tuning "
                    "seeds; flowkit's end-point and final-error variants")
def boss(bench: BenchRun) -> None:
    from flowkit.adapters.base import adapt

    reference_steps = bench.n(full=REFERENCE_STEPS, quick=16)
    shapes = ShapesBench(bench, prompt_items("single", "two"), steps=reference_steps, quick_steps=reference_steps)
    n = bench.sample_count(full=256, quick=4)
    steps_list = STEPS[:1] if bench.quick else STEPS
    local_size = (bench.n(full=64, quick=8), bench.n(full=32, quick=2))  # fine steps, trajectories
    tables = {
        "local": boss_table_file(shapes, "local", *local_size),
        "endpoint": boss_table_file(shapes, "endpoint", bench.n(full=16, quick=4), bench.n(full=16, quick=2)),
        "final": boss_table_file(shapes, "final", bench.n(full=32, quick=8), bench.n(full=16, quick=2)),
    }
    seeds = [bench.seed + SEED_STRIDE * j for j in range(bench.n(full=3, quick=2))]
    seed_tables = {f"seed {s}": load_table(boss_table_file(shapes, "local", *local_size, seed=s)) for s in seeds}
    shipped = resolve_table("shapes")
    path = adapt(shapes.pipe).denoiser.path

    def arm(name: str, steps: int, grid: str | None, label: str) -> list[dict[str, Any]]:
        from flowkit.bench.shapes_world import shapes_arm

        fn = shapes_arm(shapes.pipe, shapes.items, seed=bench.seed, steps=steps, size=shapes.size, grid=grid)
        results = bench.arm(name, {**shapes.base, "steps": steps, "grid": label, "boss_version": VERSION}, fn, n=n)
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results

    reference = arm(f"euler-{reference_steps}", reference_steps, None, "uniform")

    def rows(method: str, treatment: list[dict], base: list[dict], base_name: str) -> None:
        """FSD and the distance to the reference image, both lower than the baseline's."""
        shapes.fsd_row(method, treatment, base, Claim("lower"), base_name)
        bench.compare(method, f"distance to {reference_steps}-step image", claim=Claim("lower"),
                      treatment=reference_distance(treatment, reference),
                      baseline=reference_distance(base, reference), baseline_name=base_name)

    loaded = {cost: load_table(p) for cost, p in tables.items()}
    labels = {cost: f"boss:{Path(p).parent.name}/{Path(p).name}" for cost, p in tables.items()}  # cache keys
    bench_name = f"bench table ({loaded['local'].samples} trajectories)"
    shipped_name = f"shipped table ({shipped.samples} trajectories)"
    spread, same = {}, {}
    for k in steps_list:
        uniform = arm(f"uniform-{k}", k, "uniform", "uniform")
        shifted = arm(f"shift{SHIFT:g}-{k}", k, f"shift:{SHIFT}", f"shift:{SHIFT}")
        local = arm(f"boss-{k}", k, f"boss:{tables['local']}", labels["local"])
        method = f"BOSS {k} steps, {bench_name}"
        for base, base_name in ((uniform, f"uniform {k}"), (shifted, f"shift {SHIFT:g}, {k}")):
            rows(method, local, base, base_name)
        shapes.rate_row(method, "caption accuracy", "whole_caption", local, uniform, NO_WORSE, f"uniform {k}")

        grid = sigmas(shipped.times(k).tolist())
        on_shipped = arm(f"boss-shipped-{k}", k, grid, grid)
        method = f"BOSS {k} steps, {shipped_name}"
        rows(method, on_shipped, uniform, f"uniform {k}")
        shapes.rate_row(method, "caption accuracy", "whole_caption", on_shipped, uniform, NO_WORSE, f"uniform {k}")

        others = {"bench table": loaded["local"].times(k).tolist(), "shipped": shipped.times(k).tolist(),
                  "uniform": path.uniform_grid(k).tolist()}
        spread[str(k)] = seed_spread(seed_tables, others, k)
        for name, times in new_grids(spread[str(k)]["grids"], list(others.values())).items():
            grid = sigmas(times)
            treated = arm(f"boss-{name.replace(' ', '')}-{k}", k, grid, grid)
            rows(f"BOSS {k} steps, bench table from tuning {name}", treated, uniform, f"uniform {k}")

        named = {**others, **{f"{cost} table": t.times(k).tolist() for cost, t in loaded.items()
                              if cost != "local" and t.has(k)}}  # local: the bench table
        same[str(k)] = equal_groups(named)
        if loaded["endpoint"].has(k):
            endpoint = arm(f"boss-endpoint-{k}", k, f"boss:{tables['endpoint']}", labels["endpoint"])
            rows(f"BOSS end-point cost {k} steps (flowkit variant)", endpoint, local, f"BOSS local {k}")
        if loaded["final"].has(k):
            final = arm(f"boss-final-{k}", k, f"boss:{tables['final']}", labels["final"])
            method = f"final-error grid {k} steps (flowkit variant)"
            rows(method, final, uniform, f"uniform {k}")
            rows(method, final, local, f"BOSS local {k}")
            shapes.rate_row(method, "caption accuracy", "whole_caption", final, uniform, NO_WORSE, f"uniform {k}")
    k = STEPS[0]
    shapes.show(f"BOSS {k} steps", None, f"uniform {k}", None, steps=k,
                grid=sigmas(loaded["local"].times(k).tolist()), baseline_extra={"steps": k, "grid": "uniform"})
    grids = {cost: {str(k): t.times(k).tolist() for k in STEPS if t.has(k)} for cost, t in loaded.items()}
    grids["shipped"] = {str(k): shipped.times(k).tolist() for k in STEPS}
    bench.info.update({"n": n, "steps": list(steps_list), "reference_steps": reference_steps, "shift": SHIFT,
                       "grids": grids, "tuning_seeds": spread, "same_grid": same,
                       "tables": {cost: {"k_max": t.k_max, "samples": t.samples, "nfe": t.nfe}
                                  for cost, t in {**loaded, "shipped": shipped}.items()}})
