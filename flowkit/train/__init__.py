"""Training targets of `flowkit train`: the small models this project trains and ships."""

from __future__ import annotations

from typing import Callable

from flowkit.train.loop import TrainConfig, TrainTask, train

__all__ = ["TARGETS", "TrainConfig", "TrainTask", "train", "target"]


def _shapes() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.shapes import ShapesTask

    task = ShapesTask(total_steps=16000)
    return task, TrainConfig(steps=16000, batch_size=32, lr=3e-4, warmup=500, ema_decay=0.999, ckpt_every=200)


def _classifier() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.classifier import ClassifierTask

    return ClassifierTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                         ckpt_every=250)


def _counter() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.counter import CounterTask

    return CounterTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                      ckpt_every=250)


def _dna() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.dna import DnaTask

    return DnaTask(), TrainConfig(steps=5000, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995, ckpt_every=250)


def _dna_classifier() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.dna import DnaClassifierTask

    return DnaClassifierTask(), TrainConfig(steps=1500, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995,
                                            ckpt_every=250)


def _dna_distilled() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.dna import DnaDistillTask

    return DnaDistillTask(), TrainConfig(steps=2000, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995,
                                         ckpt_every=250)


def _simplex() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.simplex import SimplexTask

    return SimplexTask(num_categories=20, path="dirichlet"), TrainConfig(steps=2000, batch_size=128, lr=2e-3,
                                                                          warmup=100, ema_decay=0.995, ckpt_every=250)


def _boss() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.boss import BossTask

    return BossTask(), TrainConfig(steps=2000, batch_size=32, lr=2e-5, warmup=100, ema_decay=0.99, ckpt_every=250)


# name -> factory of (task, default config)
TARGETS: dict[str, Callable[[], tuple[TrainTask, TrainConfig]]] = {
    "shapes": _shapes,
    "classifier": _classifier,
    "counter": _counter,
    "boss": _boss,
    "dna": _dna,
    "dna-classifier": _dna_classifier,
    "dna-distilled": _dna_distilled,
    "simplex": _simplex,
}


def target(name: str) -> tuple[TrainTask, TrainConfig]:
    if name not in TARGETS:
        raise ValueError(f"unknown training target {name!r}; known: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]()
