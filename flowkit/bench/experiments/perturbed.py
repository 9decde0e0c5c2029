"""perturbed: CFG 4 + PAG and CFG 4 + SEG (diffusers' guiders run by flowkit) vs CFG 4, on the shapes world.

The claims: perturbed-attention guidance (Ahn et al., "Self-Rectifying Diffusion Sampling
with Perturbed-Attention Guidance") and smoothed energy guidance (Hong, "Smoothed Energy
Guidance: Guiding Diffusion Models with Reduced Energy Curvature of Attention") improve
sample quality on top of CFG by guiding away from a prediction made with the self-attention
degraded (identity attention maps; queries blurred, here the paper's infinite blur: the mean
query), at one more network evaluation per guided step. Here, paired with CFG 4 (same
prompts and seeds, 30 Euler steps, one- and two-group captions cycled): FSD lower, whole
caption no worse (2 points), and the NFE ratio (3/2 for PAG, which perturbs every step as
the PAG pipelines do; SEG skips step 0, as diffusers' guider counts its window).

Both run through `DiffusersGuider` on diffusers' own guider classes, perturbing the UNet's
mid-block self-attention (`mid_block.attentions.0.transformer_blocks`, index 0; "mid", the
PAG pipelines' usual choice). The perturbed scale of each is picked on seeds of their own
(the seed offset by 1), by FSD, before the main arms run.
"""

from __future__ import annotations

import json

from flowkit.bench.core import BenchRun, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.shapes_world import fsd_statistic
from flowkit.bench.verdict import Claim

SCALE = 4.0  # the shapes model's default CFG scale
LAYERS = json.dumps({"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks"})
CANDIDATES = {"pag": (1.0, 2.0, 3.0, 5.0, 8.0), "seg": (1.0, 2.0, 3.0, 5.0, 8.0)}  # 1-3 first; 3 won both, so wider
TUNE_SEED_OFFSET = 1
NO_WORSE_POINTS = Claim("no_worse", margin=2.0, better="higher")


def spec(method: str, scale: float) -> str:
    """The guidance spec of `method` ("pag" or "seg") at perturbed scale `scale`, on top of CFG 4."""
    if method == "pag":
        # every step, as the PAG pipelines: the guider's perturbed window is start * N < step
        return (f"diffusers:name=PerturbedAttentionGuidance,guidance_scale={SCALE},perturbed_guidance_scale={scale},"
                f"perturbed_guidance_start=-1,perturbed_guidance_stop=1,perturbed_guidance_config={json.dumps(LAYERS)}")
    return (f"diffusers:name=SmoothedEnergyGuidance,guidance_scale={SCALE},seg_guidance_scale={scale},"
            f"seg_guidance_config={json.dumps(LAYERS)}")


def pick(shapes: ShapesBench, method: str, n: int) -> float:
    """The candidate scale with the lowest FSD on the tuning seeds (ties: the first)."""
    bench = shapes.bench
    scores = []
    for scale in CANDIDATES[method]:
        s = spec(method, scale)
        name = f"tune-{method}-{scale:g}"
        rows = bench.arm(name, {**shapes.base, "guidance": s, "seed_offset": TUNE_SEED_OFFSET},
                         shapes.run_fn(s, seed=bench.seed + TUNE_SEED_OFFSET), n=n)
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in rows]
        if any("features" not in r for r in rows):
            scores.append(float("inf"))
            continue
        import numpy as np

        scores.append(float(fsd_statistic(rows)(np.arange(len(rows)))[0]))
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    bench.info[f"tuning_{method}"] = {f"{c:g}": s for c, s in zip(CANDIDATES[method], scores)}
    return CANDIDATES[method][best]


@experiment("perturbed", "CFG + PAG and CFG + SEG (diffusers' guiders through flowkit) vs CFG on the shapes world: "
            "FSD, caption accuracy, NFE")
def perturbed(bench: BenchRun) -> None:
    shapes = ShapesBench(bench, prompt_items("single", "two"))
    n, n_tune = bench.sample_count(full=256, quick=8), bench.n(full=64, quick=4)
    base = f"CFG w={SCALE:g}"
    cfg = shapes.arm("cfg", f"cfg:scale={SCALE}", n)
    for method, label in (("pag", "PAG"), ("seg", "SEG")):
        scale = pick(shapes, method, n_tune)
        s = spec(method, scale)
        arm = shapes.arm(method, s, n)
        name = f"{label} (scale {scale:g})"
        shapes.fsd_row(name, arm, cfg, Claim("lower"), base)
        shapes.rate_row(name, "caption accuracy", "whole_caption", arm, cfg, NO_WORSE_POINTS, base)
        shapes.rate_row(name, "presence", "presence", arm, cfg, NO_WORSE_POINTS, base)
        shapes.nfe_row(name, arm, cfg, Claim("at_most", target=1.5, stat="ratio_of_means"), base)
        shapes.time_row(name, s, f"cfg:scale={SCALE}", Claim("at_most", target=2.0, stat="ratio_of_means"), base)
        bench.info[method] = s
        shapes.show(label, s, base, f"cfg:scale={SCALE}")
    bench.info.update({"n": n, "n_tune": n_tune, "cfg_scale": SCALE, "layers": LAYERS,
                       "prompts": "one- and two-group captions"})
