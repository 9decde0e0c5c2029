"""Precomputed sampler data: BOSS step-size tables (`tune_boss`), and the prompt sets they
are tuned on (`load_prompts`).

N = `samples` fine Euler trajectories of `k_max` steps (prompts cycled, image i seeded
with seed_for(seed, i), under the guidance stack as sampling would run it) give the BOSS
cost matrix; the table (cost matrix, fine grid, the best grid for each step count) is what
`flowkit tune boss` writes to the cache ($FLOWKIT_CACHE/boss/FINGERPRINT/...), where the
`boss` sampler finds it by the model's fingerprint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from flowkit.errors import InputError, clip
from flowkit.limits import check_tune_memory, read_bounded

__all__ = ["load_prompts", "tune_boss"]


def load_prompts(spec: str | None) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or a shapes prompt set name."""
    from flowkit.worlds.shapes_eval import PROMPT_SETS, prompt_set

    name = spec or "single"
    if name in PROMPT_SETS:
        return [text for text, _ in prompt_set(name)]
    try:
        path = Path(name).expanduser()
        lines = read_bounded(path, "--prompts").decode("utf-8").splitlines() if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"--prompts: cannot read {clip(name)!r}: {clip(str(e), 200)}") from None
    if lines is None:
        raise InputError(f"--prompts: {clip(name)!r} is neither a file nor a prompt set ({', '.join(PROMPT_SETS)})")
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise InputError(f"--prompts: {clip(name)!r} holds no prompts")
    return prompts


def tune_boss(pipe: Any, *, prompts: Sequence[str], samples: int, k_max: int, cost: str = "local",
              guidance: Any = None, seed: int = 0, height: int | None = None, width: int | None = None,
              steps: Sequence[int] = (), model: str = "") -> tuple[Any, tuple[int, ...]]:
    """(BossTable, latent shape) of `pipe` from `samples` fine trajectories of `k_max` steps
    under `guidance` (None: CFG at the model's scale); nothing is written. InputError, before
    any work, when the trajectories would need more than `flowkit.limits.MAX_TUNE_BYTES`."""
    import torch

    from flowkit.adapters.base import adapt
    from flowkit.api import build_guidance, wants_uncond
    from flowkit.boss import Problem, tune_table
    from flowkit.seeding import generators_for

    adapter = adapt(pipe)
    stack = build_guidance(guidance, adapter.default_guidance_scale)
    h, w = adapter.default_size() if height is None else (height, width)
    shape = adapter.latent_shape(h, w)
    check_tune_memory(samples, k_max, math.prod(shape))  # before any work: BOSS keeps every step in memory
    rows = [prompts[i % len(prompts)] for i in range(samples)]
    with torch.no_grad():
        conds = adapter.encode_sized(rows, None, wants_uncond(stack), h, w)
        problem = Problem(adapter.denoiser, stack, conds, generators_for(seed, range(samples)),
                          adapter.device, adapter.encoder())
        table = tune_table(problem, shape, k_max=k_max, cost=cost, seed=seed, prompts=list(prompts),
                           guidance=stack.describe(), model=model, steps=list(steps))
    return table, shape
