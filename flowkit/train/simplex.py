"""`flowkit train simplex`: a denoiser of the toy simplex task (Stark et al., Sec. 5.1).

Cross-entropy of the clean letters under the net's p(x1 | x_t) (the flow matching loss of
Dirichlet FM, eq. 15, and of discrete FM), with t ~ U[0, 1] in flowkit time and x_t drawn
from the path's conditional law. The same task trains the three paths of the simplex bench
(`path="dirichlet" | "simplex-linear" | "mixture"`) with the same budget; the shipped model
is Dirichlet FM for K = 20.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowkit.registry import TRAIN_TARGETS
from flowkit.seqmodels import SequenceNet, export_model, make_path, path_config
from flowkit.train.loop import TrainConfig, TrainTarget
from flowkit.worlds.simplex import ToyTask

__all__ = ["SimplexTask", "SIMPLEX_PATHS"]

SIMPLEX_PATHS = {
    "dirichlet": {"name": "dirichlet", "alpha_max": 8.0},
    "simplex-linear": {"name": "simplex-linear"},
    "mixture": {"name": "mixture", "source": "mask"},
}


def conditional_batch(path, tokens: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t [B, L, V], timestep [B]) for clean tokens [B, L] at t ~ U[0, 1] (shared by the train tasks)."""
    B, L = tokens.shape
    t = torch.rand(B, generator=gen, dtype=torch.float64)
    noise = torch.randn(B, L, path.state_size, generator=gen)
    if path.name == "dirichlet":
        x = path.sample(tokens, t, generator=gen)
    else:
        x = path.sample(tokens, t, noise)
    return x, path.at(t).timestep.float()


@dataclass
class SimplexTask:
    name: str = "simplex"
    num_categories: int = 20
    path: str = "dirichlet"
    width: int = 64
    depth: int = 2
    seed: int = 0
    _task: ToyTask = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._task = ToyTask(self.num_categories, seed=self.seed)
        self._path = make_path({**SIMPLEX_PATHS[self.path], "num_categories": self.num_categories})

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SequenceNet(self._path.state_size, self.num_categories, 0, width=self.width, depth=self.depth,
                               kernel=3, positions=self._task.length)

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        tokens = self._task.sample(batch_size, rng)
        x, timestep = conditional_batch(self._path, tokens, gen)
        logits = model(x, timestep, None)
        return F.cross_entropy(logits.reshape(-1, self.num_categories), tokens.reshape(-1))

    def meta(self) -> dict:
        return {"world": "simplex", "path": path_config(self._path), "classes": [], "alphabet": None,
                "lengths": [self._task.length, self._task.length], "default_length": self._task.length,
                "default_guidance_scale": 1.0, "task_seed": self.seed}

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        return export_model(model, Path(out_dir) / "export", self.meta())


def _simplex_target() -> tuple[Any, TrainConfig]:
    return SimplexTask(num_categories=20, path="dirichlet"), TrainConfig(steps=2000, batch_size=128, lr=2e-3,
                                                                          warmup=100, ema_decay=0.995, ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('simplex', "the toy simplex task's Dirichlet FM model (K = 20)", _simplex_target))
