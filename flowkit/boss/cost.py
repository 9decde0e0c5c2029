"""BOSS cost matrices from fine Euler trajectories (Nguyen et al., "Bellman Optimal Step-size
Straightening of Flow-Matching Models", Sec. 3.2, eq. 7).

N trajectories of fine Euler steps on times t_0 > ... > t_M (flowkit time, t_0 = noise) give
states x_i and velocities v_i = v(x_i, t_i). The cost of jumping from point i to j > i in
one Euler step is

    local:    c_ij = mean_n || x_i + v_i (t_j - t_i) - x_j ||^2                    (eq. 7)

and uses the velocity at i for every jump from i, so the matrix costs the N*M evaluations of
the trajectories themselves. The local cost ignores how an early error grows later; the
`endpoint` variant measures the jump by where it lands at the end instead:

    endpoint: e_ij = mean_n || Phi_{t_j -> 0}(x_i + v_i (t_j - t_i)) - x_M ||^2

with Phi the fine Euler flow on t_j..t_M (one rollout per jump: about N M^3 / 6 evaluations,
so keep M small). Trajectories run through flowkit's own loop (`flowkit.sampling_loop.run`), so
a guidance stack applies exactly as when sampling. The `final` kind has no cost matrix of its
own: its grids come from a direct search on the final error (flowkit.boss.search), and its
table keeps the local cost beside them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.sampler_base import Sampler, euler_walk

__all__ = ["Problem", "Trajectories", "local_cost", "endpoint_cost", "fingerprint", "COST_KINDS"]

COST_KINDS = ("local", "endpoint", "final")  # final: flowkit.boss.search (grids, no matrix of its own)


class _Recorder(Sampler):
    """Euler steps that keep every state and velocity (not registered: BOSS's own tool)."""

    name = "boss-recorder"
    description = "Euler steps recording states and velocities"

    def __init__(self) -> None:
        super().__init__()
        self.xs: list[Tensor] = []
        self.vs: list[Tensor] = []

    def initial_state(self, noise: Tensor, ts: Tensor, ctx: Any) -> Tensor:
        return noise  # the recorder is handed the state itself

    def sample(self, model, x, ts):
        self.xs = [x]

        def keep(x_next: Tensor, pred: Any) -> None:
            self.vs.append(pred.velocity.to(x_next.dtype))
            self.xs.append(x_next)

        return euler_walk(model, x, ts, on_step=keep)[0]


@dataclass
class Trajectories:
    """xs [M+1, N, ...] states, vs [M, N, ...] velocities (CPU float32) on times ts [M+1]."""

    xs: Tensor
    vs: Tensor
    ts: Tensor
    nfe: int


@dataclass
class Problem:
    """What a trajectory needs: the denoiser, a guidance stack, branch conditionings for N
    rows, their generators (one per row) and the device."""

    denoiser: Any
    stack: Any
    conds: dict[str, Conditioning]
    generators: list[torch.Generator]
    device: torch.device = torch.device("cpu")
    encode: Callable | None = None
    prompts: list[str] | None = None  # the rows' captions (modules that read them: GFCG, counting)
    kit: Any = None  # the model's ModelKit (FRAP, counting, reward guidance, GFCG)
    attention: Any = None  # the run's attention store (FRAP, counting's region masks)
    nfe: int = field(default=0)

    @property
    def rows(self) -> int:
        return len(self.generators)

    def euler(self, x: Tensor, ts: Tensor, repeat: int = 1) -> Trajectories:
        """Fine Euler from state x [repeat*N, ...] at ts[0] along ts, through flowkit's loop."""
        from flowkit.context import Context
        from flowkit.sampling_loop import integrate

        conds = {k: (Conditioning.cat([v] * repeat) if repeat > 1 else v) for k, v in self.conds.items()}
        ctx = Context(self.denoiser, self.stack, conds, list(self.generators) * repeat, len(ts) - 1,
                      device=self.device, encode=self.encode, kit=self.kit,
                      prompts=(list(self.prompts) * repeat if self.prompts else None))
        ctx.attention = self.attention
        ctx.grid = ts
        rec = _Recorder()
        integrate(rec, ctx, x.to(self.device), ts)
        nfe = int(ctx.nfe.sum())
        self.nfe += nfe
        return Trajectories(torch.stack([s.float().cpu() for s in rec.xs]),
                            torch.stack([v.float().cpu() for v in rec.vs]), ts.cpu(), nfe)


def _sq_norm(d: Tensor) -> Tensor:
    """||d||^2 over all but the first two dims [A, N, ...] -> [A, N] (float64)."""
    return d.double().flatten(2).pow(2).sum(-1)


def local_cost(tr: Trajectories) -> np.ndarray:
    """c [M+1, M+1]: c_ij = mean_n ||x_i + v_i (t_j - t_i) - x_j||^2 for j > i, inf elsewhere."""
    m = len(tr.ts) - 1
    c = np.full((m + 1, m + 1), np.inf)
    ts = tr.ts.double()
    for i in range(m):
        dt = (ts[i + 1:] - ts[i]).view(-1, *([1] * tr.xs[i].ndim))  # [M-i, 1, ...]
        jump = tr.xs[i].double()[None] + tr.vs[i].double()[None] * dt  # [M-i, N, ...]
        c[i, i + 1:] = _sq_norm(jump - tr.xs[i + 1:].double()).mean(dim=1).numpy()
    return c


def endpoint_cost(problem: Problem, tr: Trajectories, max_rows: int = 256) -> np.ndarray:
    """e [M+1, M+1]: e_ij = mean_n ||Phi_{t_j -> 0}(x_i + v_i (t_j - t_i)) - x_M||^2, by rolling
    every jump out along the rest of the fine grid (jumps landing at j batched together,
    at most `max_rows` rows per rollout)."""
    m = len(tr.ts) - 1
    n = tr.xs.shape[1]
    e = np.full((m + 1, m + 1), np.inf)
    ts = tr.ts.double()
    target = tr.xs[m]
    per = max(1, max_rows // n)  # jump origins per rollout
    for j in range(1, m + 1):
        for start in range(0, j, per):
            origins = list(range(start, min(j, start + per)))
            jumps = torch.cat([tr.xs[i] + tr.vs[i] * float(ts[j] - ts[i]) for i in origins])  # [len*N, ...]
            final = jumps if j == m else problem.euler(jumps, tr.ts[j:], repeat=len(origins)).xs[-1]
            err = _sq_norm((final - target.repeat(len(origins), *([1] * (target.ndim - 1))))[None])[0]
            e[origins, j] = err.view(len(origins), n).mean(dim=1).numpy()
    return e


def fingerprint(network: Any) -> str:
    """A model fingerprint: sha256 of the network's config and, per tensor of its state dict,
    the name, dtype, shape and a strided sample of 64 values (cheap, and different for two
    checkpoints of one architecture). 24 hex digits."""
    h = hashlib.sha256()
    config = getattr(network, "config", None)
    if config is not None:
        h.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                            sort_keys=True, default=str).encode())
    h.update(type(network).__name__.encode())
    for name, t in network.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:24]


def prompts_key(prompts: Sequence[str], guidance: str) -> str:
    """A short hash of a prompt set and guidance description (part of a cost matrix's key)."""
    return hashlib.sha256(json.dumps([list(prompts), guidance]).encode()).hexdigest()[:12]
