"""`flowkit train dna | dna-classifier | dna-distilled`: the dna world's sequence models.

- `dna`: a class-conditional Dirichlet FM denoiser (Stark et al., eq. 15: cross-entropy of
  the clean letters at x_t ~ Dir(1 + (alpha - 1) e_x), t ~ U[0, 1]), the class dropped to
  the null class with probability `class_dropout` for classifier-free guidance; each step's
  batch has one length drawn from 64 to 200 and one class per sequence.
- `dna-classifier`: the noisy classifier of classifier guidance: class cross-entropy on x_t
  of the same path (Sec. 3.4).
- `dna-distilled`: the one-step student (Sec. 5.2): the teacher (the shipped dna model)
  samples tokens from flat Dirichlet draws with `teacher_steps` Euler steps in alpha; the
  student learns those tokens from the draw itself at t = 1 (cross-entropy), so one
  evaluation replaces the teacher's run. The pairs are made once (`pairs` of them, seeded)
  and cached beside the checkpoints.
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
from flowkit.seqmodels import (
    SequenceClassifier,
    SequenceNet,
    export_model,
    make_path,
    path_config,
)
from flowkit.train.loop import TrainConfig, TrainTarget
from flowkit.train.simplex import conditional_batch
from flowkit.worlds import dna

__all__ = ["DnaTask", "DnaClassifierTask", "DnaDistillTask", "DNA_PATH", "dna_meta"]

DNA_PATH = {"name": "dirichlet", "num_categories": 4, "alpha_max": 8.0}
DEFAULT_LENGTH = 128


def dna_meta(path) -> dict:
    return {"world": "dna", "path": path_config(path), "classes": list(dna.CLASSES), "alphabet": dna.ALPHABET,
            "lengths": [dna.MIN_LENGTH, dna.MAX_LENGTH], "default_length": DEFAULT_LENGTH,
            "default_guidance_scale": 1.0}


def _batch(batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    length = int(rng.integers(dna.MIN_LENGTH, dna.MAX_LENGTH + 1))
    classes = rng.integers(0, len(dna.CLASSES), size=batch_size)
    return dna.sample(batch_size, classes, length, rng), torch.from_numpy(classes)


@dataclass
class DnaTask:
    name: str = "dna"
    width: int = 64  # the shipped model of session 2 had width 32, depth 4: it learned few motifs
    depth: int = 8
    class_dropout: float = 0.2

    def __post_init__(self) -> None:
        self._path = make_path(DNA_PATH)

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SequenceNet(4, 4, len(dna.CLASSES), width=self.width, depth=self.depth, kernel=5)

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        tokens, classes = _batch(batch_size, rng)
        x, timestep = conditional_batch(self._path, tokens, gen)
        drop = torch.rand(batch_size, generator=gen) < self.class_dropout
        labels = torch.where(drop, len(dna.CLASSES), classes)
        logits = model(x, timestep, labels)
        return F.cross_entropy(logits.reshape(-1, 4), tokens.reshape(-1))

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        return export_model(model, Path(out_dir) / "export", dna_meta(self._path))


@dataclass
class DnaClassifierTask:
    name: str = "dna-classifier"
    width: int = 32
    depth: int = 3

    def __post_init__(self) -> None:
        self._path = make_path(DNA_PATH)

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SequenceClassifier(4, len(dna.CLASSES), width=self.width, depth=self.depth)

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        tokens, classes = _batch(batch_size, rng)
        x, timestep = conditional_batch(self._path, tokens, gen)
        return F.cross_entropy(model(x, timestep), classes)

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        return export_model(model, Path(out_dir) / "export", dna_meta(self._path))


@dataclass
class DnaDistillTask:
    name: str = "dna-distilled"
    width: int = 32
    depth: int = 4
    pairs: int = 8192
    teacher_steps: int = 20
    length: int = DEFAULT_LENGTH
    cache: Path | None = None  # where the teacher's pairs are kept (set by the trainer)

    def __post_init__(self) -> None:
        self._path = make_path(DNA_PATH)
        self._pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return SequenceNet(4, 4, len(dna.CLASSES), width=self.width, depth=self.depth, kernel=5)

    def teacher_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source draws x [N, L, 4], classes [N], teacher tokens [N, L]), made once and cached."""
        if self._pairs is not None:
            return self._pairs
        file = None if self.cache is None else Path(self.cache) / "teacher_pairs.pt"
        if file is not None and file.is_file():
            self._pairs = torch.load(file, weights_only=True)
            return self._pairs
        import flowkit
        from flowkit.loading import load

        teacher = load("dna")
        xs, ys, toks = [], [], []
        for start in range(0, self.pairs, 256):
            n = min(256, self.pairs - start)
            classes = [dna.CLASSES[(start + i) % len(dna.CLASSES)] for i in range(n)]
            out = flowkit.sample(teacher, classes, sampler="dirichlet", steps=self.teacher_steps, guidance="none",
                                 seed=7, start_index=start, length=self.length, output_type="latent")
            gens = flowkit.seeding.generators_for(7, range(start, start + n))
            noise = flowkit.seeding.randn_per_sample((self.length, 4), gens)
            xs.append(self._path.source(noise))
            ys.append(torch.tensor([dna.CLASSES.index(c) for c in classes]))
            toks.append(out.latents.argmax(-1))
        self._pairs = (torch.cat(xs), torch.cat(ys), torch.cat(toks))
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self._pairs, file)
        return self._pairs

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        x, y, tokens = self.teacher_pairs()
        idx = torch.from_numpy(rng.integers(0, len(x), size=batch_size))
        timestep = self._path.at(torch.ones(batch_size, dtype=torch.float64)).timestep.float()
        logits = model(x[idx], timestep, y[idx])
        return F.cross_entropy(logits.reshape(-1, 4), tokens[idx].reshape(-1))

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        return export_model(model, Path(out_dir) / "export", {**dna_meta(self._path), "one_step": True,
                                                              "teacher_steps": self.teacher_steps})


def _dna_target() -> tuple[Any, TrainConfig]:
    return DnaTask(), TrainConfig(steps=5000, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995, ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('dna', "the dna world's class-conditional Dirichlet FM model", _dna_target))


def _dna_classifier_target() -> tuple[Any, TrainConfig]:
    return DnaClassifierTask(), TrainConfig(steps=1500, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995,
                                            ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('dna-classifier', "the dna model's noisy classifier (classifier guidance)", _dna_classifier_target))


def _dna_distilled_target() -> tuple[Any, TrainConfig]:
    return DnaDistillTask(), TrainConfig(steps=2000, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995,
                                         ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('dna-distilled', 'the dna model distilled into a one-step sampler', _dna_distilled_target))
