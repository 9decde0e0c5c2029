"""Quality claims of the guidance modules on the shipped shapes model (skipped while its
weights are not installed: `flowkit.load("shapes")` raises WeightsError)."""

import numpy as np
import pytest
import torch

import flowkit
from flowkit.errors import WeightsError
from flowkit.worlds.shapes_eval import prompt_set, saturation_stats

STEPS = 10
N = 8


@pytest.fixture(scope="module")
def shapes():
    try:
        return flowkit.load("shapes")
    except WeightsError as e:
        pytest.skip(f"the shipped shapes model is not installed yet (flowkit/weights/shapes): {e}")


def saturation_rise(pipe, guidance: str, prompts: list[str]) -> tuple[float, float]:
    """(rise of the mean relative saturation, rise of the mean excess beyond [-1, 1]) of the
    pre-clamp output under `guidance`, over conditional sampling on the same seeds."""

    def stats(spec: str) -> np.ndarray:
        out = flowkit.sample(pipe, prompts, steps=STEPS, guidance=spec, seed=0, output_type="latent")
        s = [saturation_stats(x) for x in out.latents]
        return np.array([np.nanmean([v["rel_saturation"] for v in s]), np.mean([v["mean_excess"] for v in s])])

    rise = stats(guidance) - stats("none")
    return float(rise[0]), float(rise[1])


def test_apg_at_15_raises_saturation_less_than_cfg_at_15(shapes):
    prompts = [text for text, _ in prompt_set("single", N)]
    apg = saturation_rise(shapes, "apg:scale=15", prompts)
    cfg = saturation_rise(shapes, "cfg:scale=15", prompts)
    assert np.isfinite(apg[0]) and np.isfinite(cfg[0]), "no coloured pixels: the model draws no objects"
    assert apg[0] < cfg[0], f"saturation rise: APG {apg[0]:.4f} vs CFG {cfg[0]:.4f} (excess: {apg[1]:.4f} vs {cfg[1]:.4f})"


def test_adaptive_bench_calibration_predicts_ag_nfe_exactly():
    """AG follows CFG until it fires, so CFG's per-step cosines give AG's NFE at any gamma
    (what `flowkit bench adaptive` calibrates gamma with)."""
    from analytic import context
    from flowkit.bench.experiments._shapes_guidance import ag_nfe, calibrate_gamma, cosine_recorder
    from flowkit.guidance import CFG, AdaptiveGuidance
    from flowkit.paths import LinearPath
    from flowkit.samplers import Euler
    from flowkit.sampling_loop import integrate
    from flowkit.timegrid import TimeGrid

    steps = 10

    def sample(modules):
        ctx = context(4, steps, modules, cond_shift=0.3, uncond_shift=-0.2)
        ctx.conds["uncond"].tensors["shift"][:] = torch.tensor([-0.2, 0.1, 0.25, -1.0], dtype=torch.float64)
        return integrate(Euler(), ctx, ctx.randn((5,)).double(), TimeGrid.uniform().build(steps, LinearPath()))[1]

    rec = cosine_recorder()
    sample([CFG(scale=3.0), rec])
    cos = rec.cosines  # [4, steps]
    gammas = np.unique(np.round(cos, 6))
    for gamma in list((gammas[1:] + gammas[:-1]) / 2)[::7] + [-1.0, 1.0]:  # 1: never fires (cos > 1 is never true)
        for k in (1, 3):
            stats = sample([CFG(scale=3.0), AdaptiveGuidance(gamma=float(gamma), min_guided_steps=k)])
            assert ag_nfe(cos, float(gamma), k).tolist() == stats.nfe, (gamma, k)
    seen = {tuple(ag_nfe(cos, float(g), 1)) for g in gammas}
    assert len(seen) >= 4  # the thresholds above exercise several firing steps
    # the calibrated gamma saves 25%, and no larger observed threshold does
    g = calibrate_gamma(cos, 0.25, 1)
    assert g > -1.0 and ag_nfe(cos, g, 1).mean() <= 0.75 * 2 * steps
    larger = [float(np.nextafter(v, -np.inf)) for v in np.unique(cos) if np.nextafter(v, -np.inf) > g]
    assert all(ag_nfe(cos, h, 1).mean() > 0.75 * 2 * steps for h in larger)
