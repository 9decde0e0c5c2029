"""`flowkit train alignprop`: reward backpropagation (AlignProp, Prabhudesai et al.; DRaFT,
Clark et al.) on a shapes model, through `flowkit.finetune`.

`flowkit train alignprop:reward=count,truncation=fixed,k=2` fine-tunes a rank-4 LoRA of the
shapes model on the training part of a shapes prompt set (by default the 48 two-group
captions: the single-object rewards are saturated) and scores the held-out part at every
checkpoint with the training reward and the exact evaluator (`oracle`, never a training
reward). The split is `split_prompts`: fixed, so every run holds out the same captions. The
output folder holds `latest.pt` (resumable), `checkpoints/step-N/` and `lora/` (diffusers'
LoRA format: `pipe.load_lora_weights(folder)`), and `export/`, a shapes model folder with the
LoRA merged into its weights (`flowkit.load(folder)`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from flowkit.errors import InputError
from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget

__all__ = ["AlignPropTask", "split_prompts", "SPLIT_SEED"]

SPLIT_SEED = 20_240_417  # the held-out split's permutation seed (never change it: results name it)


def split_prompts(name: str = "two", held_out: int = 16) -> tuple[list[str], list[str]]:
    """(training, held-out) captions of the shapes prompt set `name`: a fixed permutation's
    first `held_out` captions are held out; both lists keep the set's order."""
    from flowkit.worlds.shapes_eval import prompt_set

    texts = [t for t, _ in prompt_set(name)]
    if not isinstance(held_out, int) or not 1 <= held_out < len(texts):
        raise InputError(f"held_out must be an integer from 1 to {len(texts) - 1} (the {name!r} set has "
                         f"{len(texts)} captions), got {held_out!r}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    held = set(order[:held_out].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


@dataclass
class AlignPropTask:
    """The options of `flowkit train alignprop:...` (see `flowkit.finetune` for each)."""

    model: str = "shapes"  # a shapes-family model: shapes, tiny, or a shapes model folder
    reward: str = "count"
    prompts: str = "two"  # a shapes prompt set
    held_out: int = 16
    truncation: str = "random"  # fixed (DRaFT-K, with k), uniform, random (the official scheme)
    k: int = 1
    sample_steps: int = 10
    scale: float = 4.0  # CFG scale of the training and held-out samples
    checkpoint: bool = True
    rank: int = 4
    eval_samples: int = 32
    name: ClassVar[str] = "alignprop"

    def __post_init__(self) -> None:
        split_prompts(self.prompts, self.held_out)  # checks the set and the split

    def finetune_kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """`flowkit.finetune` keywords of this task under `cfg`."""
        train, held = split_prompts(self.prompts, self.held_out)
        return dict(reward=self.reward, prompts=train, held_out=held, eval_rewards={"oracle": "oracle"},
                    steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    grad_clip=cfg.grad_clip, sample_steps=self.sample_steps, guidance=f"cfg:scale={self.scale}",
                    truncation=self.truncation, k=self.k, checkpoint=self.checkpoint, rank=self.rank,
                    ckpt_every=cfg.ckpt_every, eval_samples=self.eval_samples, seed=cfg.seed)

    def _pipe(self, device: str = "cpu") -> Any:
        import flowkit

        return flowkit.load(self.model).to(device)

    def run(self, cfg: TrainConfig, out_dir: Any, *, resume: bool = True, progress: bool = True) -> list[float]:
        """Fine-tune to `cfg.steps` (resuming from out_dir/latest.pt), then export; returns the
        losses of the steps run in this call."""
        import torch

        import flowkit

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        (out / "config.json").write_text(json.dumps({"task": self.name, **asdict(self), **asdict(cfg)}, indent=2))
        pipe = self._pipe(cfg.device)
        done = len(_history(out)) if resume else 0
        result = flowkit.finetune(pipe, **self.finetune_kwargs(cfg), out_dir=out, resume=resume, progress=progress)
        self._export(pipe, out)
        return [h["loss"] for h in result.history[done:]]

    def export_saved(self, out_dir: Any) -> list[Path]:
        """Export the LoRA of out_dir/latest.pt (a run in progress, say) merged into the model."""
        import torch

        from flowkit.finetune import CHECKPOINT_FILE, add_lora

        out = Path(out_dir)
        ckpt = out / CHECKPOINT_FILE
        if not ckpt.is_file():
            raise InputError(f"no checkpoint {ckpt} to export; train first")
        pipe = self._pipe()
        params = add_lora(pipe, rank=self.rank)  # A's init is overwritten by the checkpoint's
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["lora"]
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        return self._export(pipe, out)

    def _export(self, pipe: Any, out: Path) -> list[Path]:
        from flowkit.loading import save_shapes
        from flowkit.train.loop import merged_copy

        return save_shapes(merged_copy(pipe.unet), out / "export")


def _history(out: Path) -> list[Any]:
    import torch

    from flowkit.finetune import CHECKPOINT_FILE

    path = out / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)["history"] if path.is_file() else []


def _alignprop_target(**options: Any) -> tuple[Any, TrainConfig]:
    return AlignPropTask(**options), TrainConfig(steps=200, batch_size=4, lr=1e-3, warmup=1, weight_decay=1e-4,
                                                 ema_decay=0.0, grad_clip=1.0, ckpt_every=50)


TRAIN_TARGETS.register(TrainTarget("alignprop", "reward backpropagation (AlignProp / DRaFT-K): a LoRA of the shapes "
                                   "model fine-tuned on a differentiable reward", _alignprop_target,
                                   options=AlignPropTask))
