"""reward-guidance: CFG 4 + reward guidance vs CFG 4 alone on the two-group shapes captions.

The claim of reward (classifier-style) guidance (Dhariwal & Nichol, eq. 14 with log p = R;
the DPS / FreeDoM family): following a differentiable reward's gradient while sampling
raises what the reward measures, at inference time, with no training. Here the reward is
the shipped counter's `count` (the one `flowkit bench alignprop` trains on), followed on the
predicted clean image (`grad=x0`: no extra network evaluation, one backward through the
counter a step); the evaluation is the exact analytic evaluator, never the counter. On the
48 two-group captions (cycled), paired with CFG 4 (same prompts and seeds, 30 Euler steps):
whole caption higher, FSD no worse (5%), presence and exact count reported, NFE equal, and
the wall-time ratio of the loops.

The scale and the window's start are picked on seeds of their own (tuning samples per
candidate, the seed offset by 1), by whole-caption rate.
"""

from __future__ import annotations

from typing import Any

from flowkit.bench.core import BenchRun, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.shapes_world import metric_columns
from flowkit.bench.verdict import Claim

SCALE = 4.0
REWARD = "count"
CANDIDATES = ({"scale": 0.3, "start": 0.2}, {"scale": 1.0, "start": 0.2}, {"scale": 3.0, "start": 0.2},
              {"scale": 1.0, "start": 0.4})
TUNE_SEED_OFFSET = 1
NO_WORSE_FSD = Claim("no_worse", margin=0.05, relative=True, better="lower")
NO_WORSE_POINTS = Claim("no_worse", margin=2.0, better="higher")


def reward_spec(params: dict[str, Any]) -> str:
    return f"reward:reward={REWARD},scale={params['scale']},start={params['start']},grad=x0"


@experiment("reward-guidance", "CFG + reward guidance (the counter's reward on x0) vs CFG on two-group shapes "
                               "captions: whole caption, FSD, wall time")
def reward_guidance(bench: BenchRun) -> None:
    n, n_tune = bench.sample_count(full=256, quick=8), bench.n(full=48, quick=4)
    shapes = ShapesBench(bench, prompt_items("two"))
    scores = []
    for params in CANDIDATES:
        spec = f"cfg:scale={SCALE}+{reward_spec(params)}"
        config = {**shapes.base, "guidance": spec, "seed_offset": TUNE_SEED_OFFSET}
        name = f"tune-s{params['scale']:g}-start{params['start']:g}"
        rows = bench.arm(name, config, shapes.run_fn(spec, seed=bench.seed + TUNE_SEED_OFFSET), n=n_tune)
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in rows]
        scores.append(float(metric_columns(rows, "whole_caption").mean()))
    best = CANDIDATES[max(range(len(CANDIDATES)), key=lambda i: (scores[i], -i))]
    spec = f"cfg:scale={SCALE}+{reward_spec(best)}"
    bench.info["tuning"] = {reward_spec(c): s for c, s in zip(CANDIDATES, scores)}
    base = f"CFG w={SCALE:g}"
    cfg = shapes.arm("cfg", f"cfg:scale={SCALE}", n)
    arm = shapes.arm("reward", spec, n)
    name = "reward guidance"
    shapes.rate_row(name, "whole caption", "whole_caption", arm, cfg, Claim("higher"), base)
    shapes.fsd_row(name, arm, cfg, NO_WORSE_FSD, base)
    shapes.rate_row(name, "presence", "presence", arm, cfg, NO_WORSE_POINTS, base)
    shapes.rate_row(name, "exact count", "exact_count", arm, cfg, NO_WORSE_POINTS, base)
    shapes.nfe_row(name, arm, cfg, Claim("equivalent", margin=0.001, stat="ratio_of_means"), base)
    timed = shapes.time_row(name, spec, f"cfg:scale={SCALE}", Claim("at_most", target=2.0, stat="ratio_of_means"),
                            base)
    bench.info["wall_time_ratio"] = float(timed.estimate)
    shapes.show(name, spec, base, f"cfg:scale={SCALE}")
    bench.info.update({"n": n, "n_tune": n_tune, "cfg_scale": SCALE, "reward_guidance": spec, "reward": REWARD})
