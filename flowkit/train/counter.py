"""`flowkit train counter`: the shapes world's differentiable per-group counter.

Loss: mean squared error of the 12 predicted counts (softplus density maps summed over the
grid) against the true counts 0..4. Data and augmentation from
`shapes_nets.training_batch`, drawn from the step's generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget
from flowkit.worlds import shapes_nets as nets

__all__ = ["CounterTask"]


@dataclass
class CounterTask:
    name: str = "counter"
    p64: float = 0.2  # share of 64 px batches

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nets.ShapesCounter()

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        x, counts, _ = nets.training_batch(batch_size, rng, gen, p64=self.p64)  # [B, 3, H, W], [B, 12]
        return torch.mean((model(x) - counts) ** 2)

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """fp16 safetensors, config.json and manifest.json in `out_dir/export/`."""
        return nets.export_net(model, Path(out_dir) / "export")


def _counter_target() -> tuple[Any, TrainConfig]:
    return CounterTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                      ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('counter', "the shapes world's per-group object counter", _counter_target))
