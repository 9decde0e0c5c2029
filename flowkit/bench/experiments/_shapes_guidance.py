"""Shared parts of the guidance experiments on the shapes world (apg, adaptive, gfcg).

`ShapesBench` binds an experiment to the shapes model and a prompt set, on top of the
shared shapes bench parts (`flowkit.bench.shapes_world`): sample i of every arm uses prompt
i (cycling) and seed `seed_for(bench.seed, i)`, so arms differ only in their guidance;
each record holds the caption metrics, the pre-clamp saturation statistics, the NFE and
the classifier features of the image and of a fresh render of its caption (FSD). Full
runs use the shipped shapes model (`bench_model`); --quick runs always use the tiny
random model, so that they prove the code in about a minute. The features stay in the
cache and are left out of the written JSON.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from flowkit.bench.core import BenchRun, Row, column
from flowkit.bench.shapes_world import (
    bench_model,
    fsd_statistic,
    metric_columns,
    model_spec,
    shapes_arm,
)
from flowkit.bench.verdict import Claim

__all__ = ["ShapesBench", "prompt_items", "cosine_recorder", "ag_nfe", "calibrate_gamma", "SAMPLER"]

SAMPLER = "euler"
VERSION = 1


def prompt_items(*names: str) -> list[tuple[str, Any]]:
    """[(text, caption)] of the named `shapes_eval` prompt sets, concatenated."""
    from flowkit.worlds.shapes_eval import prompt_set

    return [item for name in names for item in prompt_set(name)]


GALLERY_PROMPTS = ("a red circle", "three blue squares", "two yellow triangles and a green circle")


class ShapesBench:
    """The shapes-world side of a guidance experiment (see the module docstring)."""

    def __init__(self, bench: BenchRun, items: Sequence[tuple[str, Any]], *, steps: int = 30, quick_steps: int = 6):
        import flowkit

        self.bench = bench
        self.items = list(items)
        if bench.quick:
            self.pipe, model = flowkit.load("tiny"), "tiny:0"
            bench.info["model"] = "tiny (random weights: a quick run proves the code, not the claims)"
        else:
            self.pipe, model = bench_model(bench)
        self.steps = quick_steps if bench.quick else steps
        self.size = int(self.pipe.unet.config.sample_size)
        self.base = {"model": model, "steps": self.steps, "sampler": SAMPLER, "size": self.size,
                     "prompts": [t for t, _ in self.items], "version": VERSION}
        bench.info.update({"steps": self.steps, "sampler": SAMPLER, "prompts": len(self.items)})

    def run_fn(self, guidance: Any, seed: int | None = None):
        """The chunk function of an arm with `guidance` (a spec or a list of modules)."""
        return shapes_arm(self.pipe, self.items, seed=self.bench.seed if seed is None else seed, sampler=SAMPLER,
                          guidance=guidance, steps=self.steps, size=self.size)

    def arm(self, name: str, guidance: str, n: int, *, label: str | None = None) -> list[dict[str, Any]]:
        """The cached per-sample records of the guidance spec `guidance` on samples 0..n-1
        (`label`: what identifies the guidance in the cache key, when the spec holds a path)."""
        results = self.bench.arm(name, {**self.base, "guidance": label or guidance}, self.run_fn(guidance), n=n)
        self.bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results

    def show(self, method: str, guidance: str | None, baseline: str, baseline_guidance: str | None,
             baseline_extra: dict[str, Any] | None = None, **extra: Any) -> None:
        """Record a `flowkit gallery` entry: `method` beside `baseline` on GALLERY_PROMPTS, with
        this bench's steps, size and sampler (`extra` / `baseline_extra`: more flowkit.sample
        options of each arm); a guidance of None is the model's default CFG."""
        from flowkit.gallery import show

        common = {"sampler": SAMPLER, "steps": self.steps, "height": self.size, "width": self.size}
        model = model_spec(tiny=self.bench.quick)
        arm = {**common, **({} if guidance is None else {"guidance": guidance}), **extra}
        base = {**common, **({} if baseline_guidance is None else {"guidance": baseline_guidance}),
                **(baseline_extra or {})}
        show(self.bench, method, arm, baseline=baseline, baseline_settings=base, prompts=list(GALLERY_PROMPTS),
             model=model)

    # -- rows -------------------------------------------------------------------------------
    def fsd_row(self, method: str, treatment: list[dict], baseline: list[dict], claim: Claim,
                baseline_name: str) -> Row:
        """FSD(treatment) vs FSD(baseline), each against the renders of the same captions. An arm
        taken over from committed results has no features (they stay in the cache): the row is
        then the committed run's, or none."""
        if any("features" not in r for r in [*treatment, *baseline]):
            return self.bench.carry_over(method, "FSD", baseline_name, "features of committed arms are not stored")
        return self.bench.compare_set(method, "FSD", claim=claim, statistic=fsd_statistic(treatment, baseline),
                                      n=len(treatment), baseline_name=baseline_name,
                                      notes="Frechet distance to renders of the same captions")

    def rate_row(self, method: str, metric: str, key: str, treatment: list[dict], baseline: list[dict],
                 claim: Claim, baseline_name: str) -> Row:
        """A paired row of a per-sample caption metric, in percent (differences in points)."""
        return self.bench.compare(method, metric, claim=claim, treatment=metric_columns(treatment, key),
                                  baseline=metric_columns(baseline, key), baseline_name=baseline_name, units="%",
                                  per_sample={"prompt": [r["prompt"] for r in treatment],
                                              "seed": [r["seed"] for r in treatment]})

    def value_row(self, method: str, metric: str, key: str, treatment: list[dict], baseline: list[dict],
                  claim: Claim, baseline_name: str) -> Row | None:
        """A paired row of a per-sample value over the pairs where both are finite (None if none)."""
        t, b = column(treatment, key), column(baseline, key)
        ok = np.isfinite(t) & np.isfinite(b)
        if not ok.any():
            return None
        dropped = int((~ok).sum())
        return self.bench.compare(method, metric, claim=claim, treatment=t[ok], baseline=b[ok],
                                  baseline_name=baseline_name,
                                  notes=f"{dropped} samples without coloured pixels left out" if dropped else "")

    def time_row(self, method: str, guidance: str, baseline_guidance: str, claim: Claim,
                 baseline_name: str) -> Row:
        """Wall-time ratio of the sampling loop (`stats.seconds`: no text encoding, no decoding)
        with `guidance` over `baseline_guidance`, both timed now on the same batch of prompts and
        seeds in alternating rounds (`flowkit.bench.timing`), never from cached arms' seconds."""
        import flowkit
        from flowkit.bench.timing import alternating_seconds

        prompts = [t for t, _ in self.items[: self.bench.n(full=8, quick=2)]]
        repeats = self.bench.n(full=6, quick=2)

        def run(spec: str):
            def timed(r: int) -> float:
                out = flowkit.sample(self.pipe, prompts, sampler=SAMPLER, guidance=spec, steps=self.steps,
                                     seed=self.bench.seed + r, height=self.size, width=self.size,
                                     output_type="latent")
                return float(out.stats.seconds)
            return timed

        t, b = alternating_seconds(run(guidance), run(baseline_guidance), repeats)
        return self.bench.compare(method, "wall-time ratio", claim=claim, treatment=t, baseline=b,
                                  baseline_name=baseline_name, units="s",
                                  notes=f"ratio of mean loop seconds over {repeats} alternating rounds of a batch "
                                        f"of {len(prompts)}, timed in this run")

    def nfe_row(self, method: str, treatment: list[dict], baseline: list[dict], claim: Claim,
                baseline_name: str) -> Row:
        return self.bench.compare(method, "NFE", claim=claim, treatment=column(treatment, "nfe"),
                                  baseline=column(baseline, "nfe"), baseline_name=baseline_name)


def cosine_recorder(space: str = "x0"):
    """A guidance module that records, per step, the cosine of cond and uncond in `space`
    (x0: flowkit's Adaptive Guidance statistic; epsilon: the paper's literal one) under plain
    CFG; `.cosines` [N, S] after a run."""
    from flowkit.guidance.adaptive import cosine
    from flowkit.guidance_base import Guidance

    class CosineRecorder(Guidance):
        name = "cosine_recorder"
        description = "records the x0 cosine of cond and uncond per step"

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[torch.Tensor] = []

        def after_step(self, ctx, x, pred, preds) -> None:
            c, u = preds["cond"], preds["uncond"]
            self.rows.append((cosine(c.x0, u.x0) if space == "x0" else cosine(c.eps, u.eps)).cpu())

        @property
        def cosines(self) -> np.ndarray:
            return torch.stack(self.rows, dim=1).numpy()

    return CosineRecorder()


def ag_nfe(cosines: np.ndarray, gamma: float, min_guided_steps: int) -> np.ndarray:
    """Per-sample NFE of Adaptive Guidance with threshold gamma, from CFG's cosines [N, S]:
    AG follows CFG exactly until it fires, after the first step k (0-based) with k + 1 >=
    min_guided_steps and cosine > gamma, so its NFE is S + k + 1 (2 S if it never fires)."""
    N, S = cosines.shape
    k = np.arange(S)
    fire = (cosines > gamma) & (k + 1 >= max(min_guided_steps, 1))
    first = np.where(fire.any(axis=1), fire.argmax(axis=1), S - 1)
    return np.where(fire.any(axis=1), S + first + 1, 2 * S)


def calibrate_gamma(cosines: np.ndarray, saving: float, min_guided_steps: int) -> float:
    """The largest gamma whose mean AG NFE saves at least `saving` (a fraction) of CFG's 2 S
    on the calibration cosines (gamma = -1 when no threshold saves that much)."""
    S = cosines.shape[1]
    target = (1.0 - saving) * 2 * S
    for value in np.unique(cosines)[::-1]:
        g = float(np.nextafter(value, -np.inf))  # fires on cosines >= this observed value
        if ag_nfe(cosines, g, min_guided_steps).mean() <= target:
            return g
    return -1.0
