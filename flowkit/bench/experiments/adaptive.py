"""adaptive: Adaptive Guidance and LinearAG vs CFG on the shapes world.

The claim of Castillo et al. ("Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models"): stopping the unconditional branch once cond and uncond
agree saves 25% of CFG's NFEs at CFG's quality, better than a fixed cutoff; LinearAG
replaces further unconditional evaluations by an affine map of past outputs, cheaper
still at some cost in fidelity to CFG.

Design (paired: same prompts and seeds, CFG w = 4, 30 Euler steps):
- calibration, on other seeds: CFG's per-step x0 cosines give, exactly, the NFE AG would
  spend at any gamma (AG follows CFG until it fires), and gamma is the largest threshold
  whose mean saving reaches the paper's 25%; LinearAG's coefficients are fitted on the
  same kind of run (`fit_linear_ag`, cached);
- AG vs CFG: NFE at least 20% lower (the ratio's interval below 0.8), caption accuracy
  (whole caption) and presence within 2 points, FSD within 5% (n >= 1,000 in the full run);
- AG vs a fixed cutoff (CFG for the first k steps, conditional after: `cfg:stop=k/S`, the
  run diffusers' `SDCFGCutoffCallback(cutoff_step_index=k-1)` gives, tested in
  test_dropin_cfg_cutoff.py) with k chosen so that it spends AG's mean NFE: caption
  accuracy higher and FSD lower;
- LinearAG (every other unconditional evaluation of the first half predicted) vs CFG:
  NFE lower, caption accuracy within 2 points and FSD within 5%;
- LinearAG on top of AG (`cfg+adaptive+linear-ag`, the paper's combination) vs AG alone:
  NFE lower, caption accuracy within 2 points;
- AG on the paper's literal statistic (cosine of the noise predictions, `space=epsilon`,
  its gamma calibrated to the same 25% on its own cosines) vs AG on x0 cosines: caption
  accuracy and FSD (flowkit's default is x0: on noise predictions the cosine is near 1
  from the first step).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.cache import config_hash, hold_claim
from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.experiments._shapes_guidance import (
    ShapesBench,
    ag_nfe,
    calibrate_gamma,
    cosine_recorder,
    prompt_items,
)
from flowkit.bench.verdict import Claim

SCALE = 4.0  # the shapes model's default CFG scale
SAVING = 0.25  # the paper's saving, the calibration target
MIN_GUIDED = 1  # AdaptiveGuidance's default
CAL_SEED_OFFSET = 1  # calibration runs use seed + 1: other noise than the evaluation
EQUAL_POINTS = Claim("equivalent", margin=2.0)
EQUAL_FSD = Claim("equivalent", margin=0.05, relative=True)


def _calibration(shapes: ShapesBench, n: int, space: str = "x0") -> np.ndarray:
    """CFG's per-step cosines of cond and uncond in `space` [n, S] on the calibration seeds."""
    from flowkit.guidance import CFG

    bench = shapes.bench

    def fn(indices: list[int]) -> list[dict[str, Any]]:
        rec = cosine_recorder(space)
        rows = shapes.run_fn([CFG(scale=SCALE), rec], seed=bench.seed + CAL_SEED_OFFSET)(indices)
        return [{"index": r["index"], "prompt": r["prompt"], "cosines": c.tolist()} for r, c in zip(rows, rec.cosines)]

    config = {**shapes.base, "guidance": f"cfg:scale={SCALE}", "record": f"{space} cosine",
              "seed_offset": CAL_SEED_OFFSET}
    results = bench.arm("calibration" if space == "x0" else f"calibration-{space}", config, fn, n=n)
    return np.asarray([r["cosines"] for r in results])


def _linear_ag(shapes: ShapesBench, n: int) -> str:
    """The path of LinearAG coefficients fitted on n calibration images (cached)."""
    from flowkit.calibration import fit_linear_ag

    bench = shapes.bench
    texts = [shapes.items[i % len(shapes.items)][0] for i in range(n)]
    history = bench.n(full=2, quick=1)  # quick runs are short: one step of history
    settings = {**shapes.base, "scale": SCALE, "n": n, "history": history, "seed": bench.seed + CAL_SEED_OFFSET}
    path = bench.cache.root / bench.name / f"linear_ag-{config_hash(settings)}.json"
    with hold_claim(path):  # a second bench process waits for this fit and reads it back
        fit_linear_ag(shapes.pipe, texts, steps=shapes.steps, scale=SCALE, sampler="euler",
                      seed=bench.seed + CAL_SEED_OFFSET, history=history, cache=path, model_id=shapes.base["model"])
    return str(path)


@experiment("adaptive", "Adaptive Guidance and LinearAG vs CFG and a fixed cutoff on the shapes world: NFE at equal quality")
def adaptive(bench: BenchRun) -> None:
    shapes = ShapesBench(bench, prompt_items("single", "two"))
    n, n_cal = bench.sample_count(full=1000, quick=8), bench.n(full=128, quick=4)
    S = shapes.steps
    cosines = _calibration(shapes, n_cal)
    gamma = calibrate_gamma(cosines, SAVING, MIN_GUIDED)

    cfg = shapes.arm("cfg", f"cfg:scale={SCALE}", n)
    ag = shapes.arm("adaptive", f"cfg:scale={SCALE}+adaptive:gamma={gamma!r},min_guided_steps={MIN_GUIDED}", n)
    k = int(np.clip(round(float(column(ag, "nfe").mean()) - S), 1, S))  # guided steps of the same mean NFE
    cutoff = shapes.arm("cutoff", f"cfg:scale={SCALE},stop={k / S!r}", n)
    lag_path = _linear_ag(shapes, n_cal)
    digest = hashlib.sha256(Path(lag_path).read_bytes()).hexdigest()[:16]
    lag = shapes.arm("linear-ag", f"cfg:scale={SCALE}+linear-ag:coefficients={json.dumps(lag_path)}", n,
                     label=f"cfg:scale={SCALE}+linear-ag:coefficients=sha256:{digest}")

    base = f"CFG w={SCALE:g}"
    shapes.nfe_row("AG", ag, cfg, Claim("lower", margin=0.2, stat="ratio_of_means"), base)
    shapes.rate_row("AG", "caption accuracy", "whole_caption", ag, cfg, EQUAL_POINTS, base)
    shapes.rate_row("AG", "presence", "presence", ag, cfg, EQUAL_POINTS, base)
    shapes.fsd_row("AG", ag, cfg, EQUAL_FSD, base)

    cut = f"cutoff after {k} of {S} steps"
    shapes.nfe_row("AG", ag, cutoff, Claim("equivalent", margin=0.02, stat="ratio_of_means"), cut)
    shapes.rate_row("AG", "caption accuracy", "whole_caption", ag, cutoff, Claim("higher"), cut)
    shapes.fsd_row("AG", ag, cutoff, Claim("lower"), cut)

    shapes.nfe_row("LinearAG", lag, cfg, Claim("lower", stat="ratio_of_means"), base)
    shapes.rate_row("LinearAG", "caption accuracy", "whole_caption", lag, cfg, EQUAL_POINTS, base)
    shapes.fsd_row("LinearAG", lag, cfg, EQUAL_FSD, base)

    # the paper's combination: LinearAG on top of AG
    ag_spec = f"adaptive:gamma={gamma!r},min_guided_steps={MIN_GUIDED}"
    both = shapes.arm("adaptive+linear-ag", f"cfg:scale={SCALE}+{ag_spec}+linear-ag:coefficients={json.dumps(lag_path)}",
                      n, label=f"cfg:scale={SCALE}+{ag_spec}+linear-ag:coefficients=sha256:{digest}")
    shapes.nfe_row("AG+LinearAG", both, ag, Claim("lower", stat="ratio_of_means"), "AG")
    shapes.rate_row("AG+LinearAG", "caption accuracy", "whole_caption", both, ag, EQUAL_POINTS, "AG")
    shapes.rate_row("AG+LinearAG", "caption accuracy", "whole_caption", both, cfg, EQUAL_POINTS, base)

    # the paper's literal statistic: cosines of the noise predictions
    eps_cosines = _calibration(shapes, n_cal, "epsilon")
    gamma_eps = calibrate_gamma(eps_cosines, SAVING, MIN_GUIDED)
    ag_eps = shapes.arm("adaptive-eps", f"cfg:scale={SCALE}+adaptive:gamma={gamma_eps!r},"
                        f"min_guided_steps={MIN_GUIDED},space=epsilon", n)
    shapes.nfe_row("AG (noise cosine)", ag_eps, ag, Claim("equivalent", margin=0.05, stat="ratio_of_means"),
                   "AG (x0 cosine)")
    shapes.rate_row("AG (noise cosine)", "caption accuracy", "whole_caption", ag_eps, ag, EQUAL_POINTS,
                    "AG (x0 cosine)")
    shapes.fsd_row("AG (noise cosine)", ag_eps, ag, EQUAL_FSD, "AG (x0 cosine)")

    cal_nfe = ag_nfe(cosines, gamma, MIN_GUIDED)
    shapes.show("AG", f"cfg:scale={SCALE}+adaptive:gamma={gamma!r},min_guided_steps={MIN_GUIDED}",
                base, f"cfg:scale={SCALE}")
    bench.info.update({"n": n, "n_calibration": n_cal, "cfg_scale": SCALE, "gamma": gamma,
                       "calibration_saving": float(1 - cal_nfe.mean() / (2 * S)), "cutoff_steps": k,
                       "linear-ag": f"every=2, first half, history {bench.n(full=2, quick=1)}",
                       "gamma_epsilon": gamma_eps,
                       "calibration_saving_epsilon": float(1 - ag_nfe(eps_cosines, gamma_eps, MIN_GUIDED).mean() / (2 * S)),
                       "guided_steps_quartiles": [float(v) for v in np.percentile(column(ag, "nfe") - S, [25, 50, 75])]})
