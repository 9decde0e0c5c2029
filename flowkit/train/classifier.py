"""`flowkit train classifier`: the shapes world's two-headed classifier (presence + softmax).

Loss: binary cross-entropy of the 12 presence logits against presence, plus the
cross-entropy of the softmax head against a soft target proportional to the group counts
(empty scenes have no softmax target and are left out of that term), plus the mean squared
error of the degradation head against the augmentation's own parameters (in units of
`shapes_nets.DEGRADATION_SCALE`).
Data and augmentation from `shapes_nets.training_batch`, drawn from the step's generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget
from flowkit.worlds import shapes_nets as nets

__all__ = ["ClassifierTask"]


@dataclass
class ClassifierTask:
    name: str = "classifier"
    p64: float = 0.2  # share of 64 px batches
    class_weight: float = 1.0  # weight of the softmax term
    degradation_weight: float = 0.5  # weight of the degradation term

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nets.ShapesClassifier()

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        # images [B, 3, H, W], counts [B, 12], the augmentation's parameters [B, 5]
        x, counts, degradation = nets.training_batch(batch_size, rng, gen, p64=self.p64)
        out = model(x)
        presence = F.binary_cross_entropy_with_logits(out.presence_logits, (counts > 0).float())
        total = counts.sum(dim=1)  # [B]
        some = total > 0
        target = counts[some] / total[some, None]  # soft target, proportional to counts
        soft_ce = -(target * F.log_softmax(out.class_logits[some], dim=1)).sum(dim=1)
        soft_ce = soft_ce.sum() / max(int(some.sum()), 1)
        quality = torch.mean(((out.degradation - degradation) / nets.DEGRADATION_SCALE) ** 2)
        return presence + self.class_weight * soft_ce + self.degradation_weight * quality

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """fp16 safetensors, config.json and manifest.json in `out_dir/export/`."""
        return nets.export_net(model, Path(out_dir) / "export")


def _classifier_target() -> tuple[Any, TrainConfig]:
    return ClassifierTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                         ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('classifier', "the shapes world's classifier (presence, class and features)", _classifier_target))
