"""rbf: inference-time scaling on the shapes world, reward and accuracy against NFE.

The claims of Kim et al. ("Inference-Time Scaling for Flow Models via Stochastic Generation
and Rollover Budget Forcing", 2025): at equal NFE, rollover budget forcing (RBF) on the
flow's SDE in the VP frame beats best-of-N and SMC; the VP frame beats the linear one;
rolling unused NFE over beats per-step best-of-N; more NFE buys accuracy.

Setup: the 48 two-group captions (cycled), 10 steps, CFG 4, the counter's `count` reward
(flowkit.rewards); every arm paired with every other (sample i: prompt i, image seed
`seed_for(bench.seed, i)`). NFE per image (CFG: 2 a step): Euler and the VP-frame `sde` at
20; best-of-N and SMC (both on the VP-frame SDE) with N = 2 / 4 / 8, i.e. 40 / 80 / 160;
RBF at budgets 40 / 80 / 160; ablations at 160: RBF in the linear frame, and RBF without
rollover (per-step best-of-N); and the linear frame's own baselines, `sde` at 20 and BoN at
160 (on the shapes model's 10 uniform steps the VP frame's first Euler-Maruyama step has
g^2 dr / 2 = 1.5 and over-noises: a 16-sample run put the VP `sde` at 0% whole caption);
and the VP frame on the official `rbf:linear` grid, uniform in its own time r (largest
g^2 dr / 2 = 0.45): Euler, `sde` at 20 and BoN and RBF at 160 there; and RBF at 160 in the
linear frame with the VP frame's c = 3 (the frame alone, as the official code's single
`diffusion_norm` would run it). What the arms are judged
on is the exact evaluator's whole caption and presence and the FSD, never the reward (which
is reported too, as what the methods optimise).

Rows: each arm against Euler at 20 NFE (reward, whole caption, presence, FSD, NFE); RBF
against BoN and SMC at each budget (reward, whole caption); RBF at 160 against its two
ablations and against `sde` at 20 (whole caption); on the r-uniform grid RBF against BoN
(reward, whole caption) and against linear-frame RBF, and `sde` against Euler (whole caption). Curves of reward and of whole caption
against NFE per method go to the docs and the gallery (`flowkit.gallery.curve`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.experiments._shapes_guidance import GALLERY_PROMPTS, ShapesBench, prompt_items
from flowkit.bench.shapes_world import metric_columns, shapes_arm
from flowkit.bench.verdict import Claim

SCALE = 4.0
STEPS = 10
REWARD = "count"
GUIDANCE = f"cfg:scale={SCALE}"
BUDGETS = (40, 80, 160)  # NFE per image above the 20 of one run (10 steps x CFG's 2)
VERSION = 1
RGRID = '"rbf:linear"'  # quoted: a spec value holding ':'
NO_WORSE_FSD = Claim("no_worse", margin=0.05, relative=True, better="lower")


def arms() -> dict[str, tuple[str, str, int]]:
    """name -> (sampler spec, method, NFE per image)."""
    out = {"euler": ("euler", "Euler", 2 * STEPS), "sde": ("sde:frame=vp", "SDE", 2 * STEPS)}
    for budget in BUDGETS:
        n = budget // (2 * STEPS)
        out[f"bon-{n}"] = (f"bon:n={n},reward={REWARD}", "BoN", budget)
        out[f"smc-{n}"] = (f"smc:n={n},reward={REWARD}", "SMC", budget)
        out[f"rbf-{budget}"] = (f"rbf:budget={budget},reward={REWARD}", "RBF", budget)
    top = BUDGETS[-1]
    # the linear frame's own baselines (the frame of the measurements the issue plans with)
    out["sde-linear"] = ("sde", "SDE (linear frame)", 2 * STEPS)
    out[f"bon-{top // (2 * STEPS)}-linear"] = (f"bon:n={top // (2 * STEPS)},reward={REWARD},frame=linear",
                                               "BoN (linear frame)", top)
    out[f"rbf-linear-{top}"] = (f"rbf:budget={top},reward={REWARD},frame=linear", "RBF (linear frame)", top)
    out[f"rbf-norollover-{top}"] = (f"rbf:budget={top},reward={REWARD},rollover=false", "RBF (no rollover)", top)
    # the frame alone: the linear frame with the VP frame's c = 3 (the official code has one
    # diffusion_norm for both frames; flowkit's linear default is c = 1)
    out[f"rbf-linear-c3-{top}"] = (f"rbf:budget={top},reward={REWARD},frame=linear,c=3", "RBF (linear frame, c=3)",
                                   top)
    # the VP frame on a grid uniform in its own time r (the official `rbf:linear` schedule), where
    # no step has g^2 dr / 2 above 0.45: the VP frame's claims without the first-step over-noising
    k = top // (2 * STEPS)
    out["euler-rgrid"] = (f"euler:grid={RGRID}", "Euler (r-uniform grid)", 2 * STEPS)
    out["sde-rgrid"] = (f"sde:frame=vp,grid={RGRID}", "SDE (r-uniform grid)", 2 * STEPS)
    out[f"bon-{k}-rgrid"] = (f"bon:n={k},reward={REWARD},grid={RGRID}", "BoN (r-uniform grid)", top)
    out[f"rbf-{top}-rgrid"] = (f"rbf:budget={top},reward={REWARD},grid={RGRID}", "RBF (r-uniform grid)", top)
    return out


class SamplerArms:
    """The shapes side of the bench, with arms that differ in their sampler (ShapesBench's
    differ in their guidance): the same prompts, seeds, steps, CFG and size."""

    def __init__(self, bench: BenchRun):
        self.shapes = ShapesBench(bench, prompt_items("two"), steps=STEPS, quick_steps=STEPS)
        self.bench = bench
        bench.info.update({"sampler": "per arm", "guidance": GUIDANCE, "reward": REWARD})

    def arm(self, name: str, sampler: str, n: int) -> list[dict[str, Any]]:
        s = self.shapes
        config = {**s.base, "sampler": sampler, "guidance": GUIDANCE, "rewards": [REWARD], "version": VERSION}
        fn = shapes_arm(s.pipe, s.items, seed=self.bench.seed, sampler=sampler, guidance=GUIDANCE, steps=s.steps,
                        size=s.size, rewards=(REWARD,))
        # smaller chunks for the many-particle arms: a chunk of BoN/SMC with N = 8 is 8 x chunk rows
        results = self.bench.arm(name, config, fn, n=n, chunk=8)
        self.bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results


def _reward(records: list[dict[str, Any]]) -> np.ndarray:
    return column(records, f"reward_{REWARD}")


@experiment("rbf", "RBF vs best-of-N and SMC at equal NFE (20-160 per image) on two-group shapes captions: "
                   "reward, whole caption, presence, FSD against NFE; VP vs linear frame, rollover vs per-step BoN")
def rbf(bench: BenchRun) -> None:
    n = bench.sample_count(full=64, quick=4)
    side = SamplerArms(bench)
    shapes = side.shapes
    spec = arms()
    got = {name: side.arm(name, sampler, n) for name, (sampler, _, _) in spec.items()}

    def label(name: str) -> str:
        _, method, nfe = spec[name]
        return f"{method} @{nfe}"

    def reward_row(name: str, base: str, claim: Claim) -> None:
        bench.compare(label(name), f"{REWARD} reward", claim=claim, treatment=_reward(got[name]),
                      baseline=_reward(got[base]), baseline_name=label(base),
                      notes="the reward the samplers optimise (final image, the counter)")

    def caption_row(name: str, base: str, claim: Claim) -> None:
        shapes.rate_row(label(name), "whole caption", "whole_caption", got[name], got[base], claim, label(base))

    # every arm against one Euler run (20 NFE): what the NFE buys
    for name in spec:
        if name == "euler":
            continue
        reward_row(name, "euler", Claim("higher"))
        caption_row(name, "euler", Claim("higher"))
        shapes.rate_row(label(name), "presence", "presence", got[name], got["euler"],
                        Claim("no_worse", margin=2.0, better="higher"), label("euler"))
        shapes.fsd_row(label(name), got[name], got["euler"], NO_WORSE_FSD, label("euler"))
        _, _, nfe = spec[name]
        shapes.nfe_row(label(name), got[name], got["euler"],
                       Claim("at_most", target=nfe / (2 * STEPS), stat="ratio_of_means"), label("euler"))
    # the paper's claims at equal NFE
    for budget in BUDGETS:
        k = budget // (2 * STEPS)
        for other in (f"bon-{k}", f"smc-{k}"):
            reward_row(f"rbf-{budget}", other, Claim("higher"))
            caption_row(f"rbf-{budget}", other, Claim("higher"))
    top = BUDGETS[-1]
    for ablation in (f"rbf-linear-{top}", f"rbf-norollover-{top}"):
        reward_row(f"rbf-{top}", ablation, Claim("higher"))
        caption_row(f"rbf-{top}", ablation, Claim("higher"))
    caption_row(f"rbf-{top}", "sde", Claim("higher"))
    # the same claims in the linear frame: RBF vs BoN at 160, and 160 vs 20
    reward_row(f"rbf-linear-{top}", f"bon-{top // (2 * STEPS)}-linear", Claim("higher"))
    caption_row(f"rbf-linear-{top}", f"bon-{top // (2 * STEPS)}-linear", Claim("higher"))
    caption_row(f"rbf-linear-{top}", "sde-linear", Claim("higher"))
    # and on the r-uniform grid: RBF vs BoN, the VP frame vs the linear one, SDE vs Euler on one grid
    k = top // (2 * STEPS)
    reward_row(f"rbf-{top}-rgrid", f"bon-{k}-rgrid", Claim("higher"))
    caption_row(f"rbf-{top}-rgrid", f"bon-{k}-rgrid", Claim("higher"))
    caption_row(f"rbf-{top}-rgrid", f"rbf-linear-{top}", Claim("higher"))
    caption_row(f"rbf-{top}-rgrid", f"rbf-linear-c3-{top}", Claim("higher"))
    caption_row(f"rbf-linear-{top}", f"rbf-linear-c3-{top}", Claim("higher"))
    caption_row("sde-rgrid", "euler-rgrid", Claim("higher"))

    _curves(bench, spec, got)
    _gallery(bench, shapes, spec)
    bench.info.update({"n": n, "steps": STEPS, "cfg_scale": SCALE, "budgets": [2 * STEPS, *BUDGETS],
                       "arms": {name: sampler for name, (sampler, _, _) in spec.items()},
                       "prompts": "two-group captions"})


def _curves(bench: BenchRun, spec: dict[str, tuple[str, str, int]], got: dict[str, list[dict[str, Any]]]) -> None:
    from flowkit.gallery import curve

    methods: dict[str, list[str]] = {"RBF": ["sde"], "BoN": ["sde"], "SMC": ["sde"], "Euler": []}
    for name, (_, method, _) in spec.items():
        if method in methods:
            methods[method].append(name)
    for title, value in (("reward", lambda rs: float(np.nanmean(_reward(rs)))),
                         ("whole caption (%)", lambda rs: float(np.nanmean(metric_columns(rs, "whole_caption"))))):
        series = {}
        for method, names in methods.items():
            if not names:
                continue
            xs = [spec[nm][2] for nm in names]
            series[method if method != "Euler" else "Euler (one run)"] = (xs, [value(got[nm]) for nm in names])
        for name, (_, method, nfe) in spec.items():
            if "(" in method:  # the single-budget arms: ablations, the linear frame, the r-uniform grid
                series[method] = ([nfe], [value(got[name])])
        curve(bench, f"RBF, best-of-N and SMC: {title} against NFE per image", x_label="NFE per image",
              y_label=title, series=series)


def _gallery(bench: BenchRun, shapes: ShapesBench, spec: dict[str, tuple[str, str, int]]) -> None:
    from flowkit.bench.shapes_world import model_spec
    from flowkit.gallery import show

    common = {"guidance": GUIDANCE, "steps": STEPS, "height": shapes.size, "width": shapes.size}
    top = BUDGETS[-1]
    for name in (f"rbf-{top}", f"bon-{top // (2 * STEPS)}"):
        sampler, method, nfe = spec[name]
        show(bench, f"{method} @{nfe}", {**common, "sampler": sampler}, baseline="Euler @20",
             baseline_settings={**common, "sampler": "euler"}, prompts=list(GALLERY_PROMPTS),
             model=model_spec(tiny=bench.quick))
