"""A small resumable training loop shared by every `flowkit train` target.

Each step draws its data from generators seeded by (seed, step), so a run resumed from a
checkpoint reproduces the uninterrupted run exactly. Checkpoints (model, EMA, optimizer,
step) are written atomically to `out_dir/latest.pt`; a JSONL log records every step's loss.

A task that brings its own loop (the AlignProp fine-tune runs `flowkit.finetune`, a library
function below this layer) defines `run(cfg, out_dir, *, resume, progress) -> losses` and
`export_saved(out_dir) -> files`; `train` and `export_checkpoint` hand over to them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from flowkit.errors import InputError

__all__ = ["TrainConfig", "TrainTarget", "TrainTask", "step_generators", "train", "export_checkpoint", "merged_copy"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    ckpt_every: int = 250
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # where the model trains; data and noise are drawn on the CPU either way


@dataclass(frozen=True)
class TrainTarget:
    """A registered training target: `make()` builds (task, default config). A target with
    `options` (a class whose constructor's keyword options a spec may set, as in
    `flowkit train alignprop:reward=count,k=2`) is built with `make(**options)`."""

    name: str
    description: str
    make: Callable[..., tuple[Any, "TrainConfig"]]
    options: type | None = None


class TrainTask(Protocol):
    name: str

    def build(self) -> nn.Module: ...

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor: ...

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]: ...


def step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one training step (a pure function of seed, step)."""
    rng = np.random.default_rng([seed, step])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gen


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def export_checkpoint(task: TrainTask, out_dir: str | os.PathLike) -> list[Path]:
    """Export the EMA weights of `out_dir/latest.pt` (say, of a run still in progress)."""
    out = Path(out_dir)
    if hasattr(task, "export_saved"):
        return task.export_saved(out)
    ckpt_path = out / "latest.pt"
    if not ckpt_path.is_file():
        raise InputError(f"no checkpoint {ckpt_path} to export; train first")
    ema = task.build()
    try:
        ema.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["ema"])
    except (RuntimeError, KeyError) as e:
        raise InputError(f"checkpoint {ckpt_path} does not fit the {task.name} model: "
                         f"{str(e).strip().splitlines()[0]}") from None
    return task.export(ema.eval(), out)


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(task: TrainTask, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = True,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `task` to `cfg.steps`, resuming from `out_dir/latest.pt` if present.

    Returns the losses of the steps run in this call. A task with its own loop (`run`) runs it.
    """
    if hasattr(task, "run"):
        return task.run(cfg, out_dir, resume=resume, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = task.build().to(cfg.device)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    ckpt_path = out / "latest.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log.info("resumed %s from step %d", task.name, start)
    (out / "config.json").write_text(json.dumps({"task": task.name, **asdict(cfg)}, indent=2))

    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.name}", dynamic_ncols=True)
    logf = open(out / "log.jsonl", "a")
    t0 = time.time()
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            rng, gen = step_generators(cfg.seed, step)
            loss = task.loss(model, step, cfg.batch_size, rng, gen)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
            value = float(loss.item())
            losses.append(value)
            logf.write(json.dumps({"step": step, "loss": value, "lr": _lr_at(cfg, step),
                                   "seconds": round(time.time() - t0, 3)}) + "\n")
            logf.flush()
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                _atomic_save({"model": _cpu(model.state_dict()), "ema": _cpu(ema.state_dict()),
                              "opt": opt.state_dict(), "step": step + 1}, ckpt_path)
    finally:
        logf.close()
        if bar is not None:
            bar.close()
    if start < cfg.steps or not (out / "exported").exists():
        task.export(ema.cpu(), out)
        (out / "exported").write_text(str(cfg.steps))
    return losses


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a UNet `model` with its active LoRA adapters merged into its weights (what
    an export writes)."""
    import copy

    from diffusers import UNet2DConditionModel

    m = copy.deepcopy(model).eval()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters either
        return m
    if not any(isinstance(mod, BaseTunerLayer) for mod in m.modules()):
        return m
    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    state = {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k}
    plain = UNet2DConditionModel.from_config(m.config)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
