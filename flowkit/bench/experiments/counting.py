"""counting: counting guidance on top of CFG vs CFG alone, on the shapes world.

The claim of Kang et al. ("Counting Guidance for High Fidelity Text-to-Image Synthesis"):
guiding with a differentiable counter's gradient on the predicted clean image raises the
rate of images with the asked number of objects, at no extra network evaluation. Here the
counter is the shapes world's shipped per-group counter (its counts drive the guidance; the
evaluation is the exact analytic evaluator, never the counter), on the 36 counting captions
and on the 48 two-group captions (each cycled), paired with CFG 4 (same prompts and seeds,
30 Euler steps): exact count higher; presence, FSD and saturation no worse; NFE ratio 1.0.

The scale and the window's start are picked on seeds of their own (tuning samples per
candidate, the seed offset by 1), by exact-count rate on both sets together.
"""

from __future__ import annotations

from typing import Any

from flowkit.bench.core import BenchRun, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.shapes_world import metric_columns
from flowkit.bench.verdict import Claim

SCALE = 4.0
CANDIDATES = ({"scale": 1.0, "start": 0.2}, {"scale": 3.0, "start": 0.2}, {"scale": 10.0, "start": 0.2},
              {"scale": 3.0, "start": 0.4})
TUNE_SEED_OFFSET = 1
NO_WORSE_POINTS = Claim("no_worse", margin=2.0, better="higher")
NO_WORSE_FSD = Claim("no_worse", margin=0.05, relative=True, better="lower")


def counting_spec(params: dict[str, Any]) -> str:
    return f"counting:scale={params['scale']},start={params['start']}"


@experiment("counting", "counting guidance + CFG vs CFG on counting and two-group shapes captions: exact count")
def counting(bench: BenchRun) -> None:
    n, n_tune = bench.sample_count(full=512, quick=8), bench.n(full=36, quick=4)
    sets = {name: ShapesBench(bench, prompt_items(name)) for name in ("counting", "two")}
    scores = []
    for params in CANDIDATES:
        spec = f"cfg:scale={SCALE}+{counting_spec(params)}"
        rate = []
        for set_name, shapes in sets.items():
            config = {**shapes.base, "guidance": spec, "seed_offset": TUNE_SEED_OFFSET}
            name = f"tune-{set_name}-s{params['scale']:g}-start{params['start']:g}"
            rows = bench.arm(name, config, shapes.run_fn(spec, seed=bench.seed + TUNE_SEED_OFFSET), n=n_tune)
            bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in rows]
            rate.append(float(metric_columns(rows, "exact_count").mean()))
        scores.append(sum(rate) / len(rate))
    best = CANDIDATES[max(range(len(CANDIDATES)), key=lambda i: (scores[i], -i))]
    spec = f"cfg:scale={SCALE}+{counting_spec(best)}"
    bench.info["tuning"] = {counting_spec(c): s for c, s in zip(CANDIDATES, scores)}
    base = f"CFG w={SCALE:g}"
    for set_name, shapes in sets.items():
        cfg = shapes.arm(f"cfg-{set_name}", f"cfg:scale={SCALE}", n)
        arm = shapes.arm(f"counting-{set_name}", spec, n)
        name = f"counting ({set_name})"
        shapes.rate_row(name, "exact count", "exact_count", arm, cfg, Claim("higher"), base)
        shapes.rate_row(name, "presence", "presence", arm, cfg, NO_WORSE_POINTS, base)
        shapes.fsd_row(name, arm, cfg, NO_WORSE_FSD, base)
        shapes.value_row(name, "saturation", "rel_saturation", arm, cfg, Claim("no_worse", margin=0.02,
                                                                                 better="lower"), base)
        shapes.nfe_row(name, arm, cfg, Claim("equivalent", margin=0.001, stat="ratio_of_means"), base)
        shapes.time_row(name, spec, f"cfg:scale={SCALE}", Claim("at_most", target=2.0, stat="ratio_of_means"), base)
        if set_name == "counting":
            shapes.show(name, spec, base, f"cfg:scale={SCALE}")
    bench.info.update({"n": n, "n_tune": n_tune, "cfg_scale": SCALE, "counting": spec})
