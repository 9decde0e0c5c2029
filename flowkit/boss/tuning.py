"""Computing BOSS tables: trajectories, cost matrix, grids (Nguyen et al., Algorithm 1).

`tune_table` runs N fine Euler trajectories from seeded noise on a fine grid of M steps,
builds the cost matrix (local or end-point, see flowkit.boss.cost) and stores the best
grids for the asked step counts; the `final` kind searches each asked grid on the final
error instead (flowkit.boss.search, flowkit's variant). `auto_problem` makes the small
problem the `boss` sampler tunes on when a model has no table yet: under the run's own
guidance, on a fixed prompt set and fixed seeds, so the grid never depends on the run's own
prompts or batch partners.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from flowkit.boss.cost import (
    COST_KINDS,
    Problem,
    endpoint_cost,
    fingerprint,
    local_cost,
    prompts_key,
)
from flowkit.boss.dp import best_path
from flowkit.boss.search import search_final
from flowkit.boss.table import BossTable
from flowkit.errors import InputError, UnsupportedError
from flowkit.seeding import generators_for, randn_per_sample

__all__ = ["tune_table", "auto_problem", "model_fingerprint", "fine_grid", "AUTO_PROMPTS", "TUNE_SEED"]

TUNE_SEED = 20240611  # base seed of the tuning trajectories (image i: seed_for(TUNE_SEED, i))
# the fixed prompt set of on-the-fly tuning: shapes-world captions and a few general ones
AUTO_PROMPTS = ("one red circle", "two blue squares", "three green triangles", "a yellow circle and a red square",
                "a photo of a cat", "a mountain landscape at sunset", "a bowl of fruit on a table",
                "a portrait of an old man")


def model_fingerprint(denoiser: Any) -> str | None:
    """The fingerprint of a denoiser's network (None for networks-free denoisers, which are
    tuned afresh each time and never cached)."""
    net = getattr(denoiser, "network", None)
    if net is None:
        return None
    kind = getattr(denoiser, "prediction_type", "")
    return fingerprint(net) + ("" if kind in ("velocity", "flow") else f"-{kind}")


def fine_grid(denoiser: Any, k_max: int) -> torch.Tensor:
    """The fine grid: `k_max` steps uniform in the path's native time (t_max .. 0)."""
    if not isinstance(k_max, int) or k_max < 2:
        raise InputError(f"k_max must be an integer >= 2, got {k_max!r}")
    return denoiser.path.uniform_grid(k_max)


def tune_table(problem: Problem, shape: Sequence[int], *, k_max: int, cost: str = "local", seed: int = TUNE_SEED,
               prompts: Sequence[str] = (), guidance: str = "none", key: str | None = None, model: str = "",
               steps: Sequence[int] = (), max_rows: int = 256) -> BossTable:
    """A BOSS table from `problem.rows` trajectories of `k_max` fine Euler steps.

    shape: the per-sample latent shape; noise row i is drawn from seed_for(seed, i).
    key: the prompt-set key of the table (default: a hash of prompts and guidance).
    steps: the step counts whose grids are stored in the table (cost "final": the only
        step counts the table gives, each found by a search on the final error).
    """
    if cost not in COST_KINDS:
        raise InputError(f"BOSS cost must be one of {', '.join(COST_KINDS)}, got {cost!r}")
    den = problem.denoiser
    if den.path.kind != "gaussian":
        raise UnsupportedError(f"BOSS works on Gaussian paths, not on {den.path.kind} ones")
    fp = model_fingerprint(den) or "unfingerprinted"
    ts = fine_grid(den, k_max)
    noise = randn_per_sample(tuple(shape), generators_for(seed, range(problem.rows)), problem.device)
    tr = problem.euler(noise * float(ts[0]), ts)
    matrix = endpoint_cost(problem, tr, max_rows=max_rows) if cost == "endpoint" else local_cost(tr)
    table = BossTable(fingerprint=fp, shape=tuple(shape), cost_kind=cost, fine=[float(v) for v in ts.tolist()],
                      cost=matrix, samples=problem.rows, prompts=list(prompts), guidance=guidance,
                      prompts_key=key or prompts_key(prompts, guidance), model=model, nfe=problem.nfe)
    wanted = [k for k in steps if k <= k_max]
    if cost != "final":
        return table.choose(wanted)
    for k in wanted:  # from the local cost's grid (the search also tries the uniform one)
        path, _, _ = search_final(problem, tr, k, best_path(matrix, k)[0])
        table.grids[k] = [float(ts[i]) for i in path]
    table.nfe = problem.nfe
    return table


def auto_problem(ctx: Any, samples: int) -> Problem:
    """The on-the-fly tuning problem of a run: its denoiser under the run's own guidance stack
    (the best step sizes depend on it: CFG bends the trajectories), `samples` rows of
    AUTO_PROMPTS (cycled) encoded with the run's encoder (the unconditional branch: the empty
    prompt), generators from TUNE_SEED. Without an encoder (analytic denoisers), the run's
    first row of each branch is repeated. The run's model kit and attention store come along
    (FRAP, counting, reward guidance and GFCG read them); a module that refuses the tuning
    prompts (GFCG on a caption outside its classes, say) is left out of the tuning, with a
    line in the run's log."""
    from flowkit.conditioning import Conditioning
    from flowkit.context import Context
    from flowkit.guidance_base import GuidanceStack

    def repeat(c: Conditioning) -> Conditioning:
        first = c.select([0])
        return Conditioning.cat([first] * samples) if samples > 1 else first

    conds: dict[str, Conditioning] = {}
    prompts: list[str] | None = None
    if ctx.encode is not None:
        prompts = [AUTO_PROMPTS[i % len(AUTO_PROMPTS)] for i in range(samples)]
        conds["cond"] = ctx.encode(prompts)
        if "uncond" in ctx.conds:
            conds["uncond"] = ctx.encode([""] * samples)
    else:
        conds = {k: repeat(v) for k, v in ctx.conds.items()}
        prompts = [ctx.prompts[0]] * samples if ctx.prompts else None
    generators = generators_for(TUNE_SEED, range(samples))
    probe = Context(ctx.denoiser, ctx.stack, conds, generators, ctx.num_steps, device=ctx.device,
                    encode=ctx.encode, prompts=prompts, kit=ctx.kit)
    probe.attention = ctx.attention
    kept = []
    for m in ctx.stack.modules:
        reason = m.refuse(probe)
        if reason:
            ctx.log.append(f"boss: tuning without {m.name} ({reason})")
        else:
            kept.append(m)
    return Problem(ctx.denoiser, GuidanceStack(kept), conds, generators, ctx.device, ctx.encode,
                   prompts=prompts, kit=ctx.kit, attention=ctx.attention)
