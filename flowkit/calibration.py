"""Calibration runs: fit a method's data on a model by sampling it (LinearAG's coefficients)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from flowkit.errors import InputError
from flowkit.guidance.linear_ag import (
    LinearAGCoefficients,
    NormalEquations,
    TrajectoryRecorder,
)

__all__ = ["fit_linear_ag"]


def fit_linear_ag(pipe: Any, prompts: Sequence[str], *, steps: int, scale: float | None = None,
                  sampler: str = "euler", seed: int = 0, history: int = 2, ridge: float = 0.0,
                  batch_size: int = 16, negative_prompt: str | None = None,
                  cache: str | os.PathLike[str] | None = None, model_id: str = "") -> LinearAGCoefficients:
    """Fit LinearAG coefficients for `pipe` from CFG runs on `prompts` (one image each, seeded
    `seed_for(seed, i)` as `flowkit.sample` seeds them), at `steps` steps and CFG `scale`
    (default: the model's). With `cache`, a file there made with the same settings is read
    back instead of fitting again, and a new fit is written there.
    """
    from flowkit.adapters.base import adapt
    from flowkit.api import sample
    from flowkit.guidance.cfg import CFG

    prompts = list(prompts)
    if not prompts:
        raise InputError("give at least one calibration prompt")
    adapter = adapt(pipe)
    scale = float(adapter.default_guidance_scale if scale is None else scale)
    meta = {"model": model_id or type(getattr(adapter, "pipe", pipe)).__name__, "prompts": prompts,
            "steps": steps, "scale": scale, "sampler": sampler, "seed": seed, "history": history, "ridge": ridge,
            "negative_prompt": negative_prompt}
    if cache is not None and Path(cache).is_file():
        try:
            found = LinearAGCoefficients.load(cache)
        except InputError:
            found = None
        if found is not None and found.meta == json.loads(json.dumps(meta)):
            return found
    acc = NormalEquations(history)
    ts: list[float] | None = None
    for start in range(0, len(prompts), batch_size):
        rec = TrajectoryRecorder()
        chunk = prompts[start:start + batch_size]
        out = sample(pipe, chunk, sampler=sampler, steps=steps, guidance=[CFG(scale=scale), rec], seed=seed,
                    start_index=start, negative_prompt=negative_prompt, output_type="latent")
        acc.add(*rec.trajectories())
        ts = out.stats.grid
    fitted = acc.solve(ridge)
    fitted.ts, fitted.meta = ts, meta
    if cache is not None:
        fitted.save(cache)
    return fitted
