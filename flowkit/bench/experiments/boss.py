"""boss: Bellman optimal step sizes vs uniform and shifted grids of the same length.

The claim of Nguyen et al. ("Bellman Optimal Step-size Straightening of Flow-Matching
Models"): at few steps (4-6 NFE) Euler on the BOSS grid gives a much lower FID than on a
uniform grid. Here on the shapes world, at 4, 6 and 8 Euler steps under CFG at the model's
scale, paired with the uniform grid and the SD3-style shifted grid (shift 3) of the same
length (same prompts and seeds): FSD (to renders of the same captions) lower, the paired
distance to a 64-step reference image of the same seed (classifier features) lower, and
caption accuracy no worse (2 points). BOSS tables are tuned on the same model, prompts and
guidance (`flowkit.boss.tune_table`, cached under $FLOWKIT_CACHE/boss): the paper's local
cost and the end-point variant (each jump rolled out to the end, small fine grid), whose
rows test whether accounting for error growth does better than the local cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.verdict import Claim
from flowkit.boss import load_table

STEPS = (4, 6, 8)
REFERENCE_STEPS = 64
SHIFT = 3.0
NO_WORSE = Claim("no_worse", margin=2.0, better="higher")
VERSION = 1


def boss_table_file(shapes: ShapesBench, cost: str, k_max: int, samples: int) -> str:
    """The BOSS table of the bench's model, prompts and guidance (tuned once, then cached)."""
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
    key = prompts_key(prompts, stack.describe())
    dims = "x".join(str(v) for v in shape)
    path = cache_root() / model_fingerprint(adapter.denoiser) / f"{dims}-{cost}-k{k_max}-n{samples}-{key}.json"
    if not path.is_file():
        rows = [prompts[i % len(prompts)] for i in range(samples)]
        with torch.no_grad():
            conds = adapter.encode_sized(rows, None, True, shapes.size, shapes.size)
            problem = Problem(adapter.denoiser, stack, conds, generators_for(shapes.bench.seed, range(samples)),
                              adapter.device, adapter.encoder())
            table = tune_table(problem, shape, k_max=k_max, cost=cost, seed=shapes.bench.seed, prompts=prompts,
                               guidance=stack.describe(), key=key, model=shapes.base["model"], steps=STEPS)
        assert table.save_to_cache() == path
    return str(path)


def reference_distance(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> np.ndarray:
    """Per sample: the classifier-feature distance to the reference image of the same seed."""
    a = np.asarray([r["features"] for r in records])
    b = np.asarray([r["features"] for r in reference])
    return np.linalg.norm(a - b, axis=1)


@experiment("boss", "BOSS step sizes vs uniform and shifted grids at 4, 6, 8 Euler steps: FSD, distance to a "
                    "64-step reference, caption accuracy; local vs end-point cost")
def boss(bench: BenchRun) -> None:
    reference_steps = bench.n(full=REFERENCE_STEPS, quick=16)
    shapes = ShapesBench(bench, prompt_items("single", "two"), steps=reference_steps, quick_steps=reference_steps)
    n = bench.sample_count(full=256, quick=4)
    tables = {
        "local": boss_table_file(shapes, "local", bench.n(full=64, quick=8), bench.n(full=32, quick=2)),
        "endpoint": boss_table_file(shapes, "endpoint", bench.n(full=16, quick=4), bench.n(full=16, quick=2)),
    }

    def arm(name: str, steps: int, grid: str | None, label: str) -> list[dict[str, Any]]:
        from flowkit.bench.shapes_world import shapes_arm

        fn = shapes_arm(shapes.pipe, shapes.items, seed=bench.seed, steps=steps, size=shapes.size, grid=grid)
        results = bench.arm(name, {**shapes.base, "steps": steps, "grid": label, "boss_version": VERSION}, fn, n=n)
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results

    reference = arm(f"euler-{reference_steps}", reference_steps, None, "uniform")
    loaded = {cost: load_table(path) for cost, path in tables.items()}
    labels = {cost: f"boss:{Path(path).parent.name}/{Path(path).name}" for cost, path in tables.items()}  # cache keys
    for k in (STEPS[:1] if bench.quick else STEPS):
        uniform = arm(f"uniform-{k}", k, "uniform", "uniform")
        shifted = arm(f"shift{SHIFT:g}-{k}", k, f"shift:{SHIFT}", f"shift:{SHIFT}")
        local = arm(f"boss-{k}", k, f"boss:{tables['local']}", labels["local"])
        for base, base_name in ((uniform, f"uniform {k}"), (shifted, f"shift {SHIFT:g}, {k}")):
            shapes.fsd_row(f"BOSS {k} steps", local, base, Claim("lower"), base_name)
            bench.compare(f"BOSS {k} steps", f"distance to {reference_steps}-step image", claim=Claim("lower"),
                          treatment=reference_distance(local, reference),
                          baseline=reference_distance(base, reference), baseline_name=base_name)
        shapes.rate_row(f"BOSS {k} steps", "caption accuracy", "whole_caption", local, uniform, NO_WORSE,
                        f"uniform {k}")
        if k <= loaded["endpoint"].k_max:
            endpoint = arm(f"boss-endpoint-{k}", k, f"boss:{tables['endpoint']}", labels["endpoint"])
            shapes.fsd_row(f"BOSS end-point {k} steps", endpoint, local, Claim("lower"), f"BOSS local {k}")
            bench.compare(f"BOSS end-point {k} steps", f"distance to {reference_steps}-step image",
                          claim=Claim("lower"), treatment=reference_distance(endpoint, reference),
                          baseline=reference_distance(local, reference), baseline_name=f"BOSS local {k}")
    k = STEPS[0]
    times = ";".join(repr(v) for v in loaded["local"].times(k).tolist())  # portable: no cache path
    shapes.show(f"BOSS {k} steps", None, f"uniform {k}", None, steps=k, grid=f"sigmas:{times}",
                baseline_extra={"steps": k, "grid": "uniform"})
    bench.info.update({"n": n, "steps": list((STEPS[:1] if bench.quick else STEPS)), "reference_steps": reference_steps,
                       "shift": SHIFT,
                       "grids": {cost: {str(k): t.times(k).tolist() for k in STEPS if k <= t.k_max}
                                 for cost, t in loaded.items()},
                       "tables": {cost: {"k_max": t.k_max, "samples": t.samples, "nfe": t.nfe}
                                  for cost, t in loaded.items()}})
