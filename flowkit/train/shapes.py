"""`flowkit train shapes`: the shapes world's text-to-image flow-matching UNet.

Flow matching on the linear path (x_t = (1 - t) x0 + t noise, target v = noise - x0),
logit-normal t, caption dropout for classifier-free guidance, multi-resolution batches:
mostly 16 px early with 32 px mixed in, and 32 px only for the final `finish` fraction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowkit.registry import TRAIN_TARGETS
from flowkit.storage import cache_root
from flowkit.text import MAX_LENGTH, encode_texts, load_minilm
from flowkit.train.loop import TrainConfig, TrainTarget
from flowkit.worlds import shapes as world

__all__ = ["ShapesTask", "caption_embeddings", "caption_embeddings_file"]


def _caption_texts() -> list[str]:
    return [world.caption_text(c) for c in world.all_captions()] + [""]


def caption_embeddings_file() -> Path:
    """The cache file of the captions' MiniLM embeddings, named by a hash of the caption list
    (so a change of the world's captions cannot reuse a stale file). Copy it to a machine
    without the text encoder (a GPU box) to train there."""
    digest = hashlib.sha256(json.dumps([MAX_LENGTH, _caption_texts()]).encode()).hexdigest()[:16]
    return cache_root("shapes") / f"caption-embeddings-{digest}.safetensors"


def caption_embeddings() -> dict[str, torch.Tensor]:
    """{caption text: MiniLM token embeddings [MAX_LENGTH, 384]} for every caption of the
    world and the empty caption; computed once, then read from `caption_embeddings_file()`."""
    from safetensors.torch import load_file, save_file

    texts, path = _caption_texts(), caption_embeddings_file()
    if path.is_file():
        emb = load_file(str(path))["embeddings"]
    else:
        tok, enc = load_minilm()
        emb = torch.cat([encode_texts(tok, enc, texts[i:i + 128]) for i in range(0, len(texts), 128)]).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": emb}, str(tmp))
        tmp.replace(path)
    return dict(zip(texts, emb))


@dataclass
class ShapesTask:
    name: str = "shapes"
    size: str = "base"
    total_steps: int = 20000
    p32: float = 0.25  # share of 32 px steps before the finish
    finish: float = 0.3  # final fraction of steps at 32 px only
    caption_dropout: float = 0.1
    p_two: float = 0.5

    def __post_init__(self) -> None:
        self._embeddings: dict[str, torch.Tensor] | None = None

    def embeddings(self) -> dict[str, torch.Tensor]:
        """MiniLM token embeddings of every caption of the world, and of the empty caption."""
        if self._embeddings is None:
            self._embeddings = caption_embeddings()
        return self._embeddings

    def build(self) -> nn.Module:
        from diffusers import UNet2DConditionModel

        from flowkit.worlds.shapes_pipeline import shapes_unet_config

        torch.manual_seed(0)
        return UNet2DConditionModel(**shapes_unet_config(self.size))

    def resolution(self, step: int, rng: np.random.Generator) -> int:
        if step >= self.total_steps * (1 - self.finish):
            return 32
        return 32 if rng.random() < self.p32 else 16

    def batch(self, step: int, batch_size: int, rng: np.random.Generator):
        res = self.resolution(step, rng)
        emb = self.embeddings()
        images, conds = [], []
        for _ in range(batch_size):
            cap = world.random_caption(rng, self.p_two)
            _, img = world.render_caption(cap, res, rng)
            images.append(img)
            text = "" if rng.random() < self.caption_dropout else world.caption_text(cap)
            conds.append(emb[text])
        x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
        return x0, torch.stack(conds)

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        x0, cond = self.batch(step, batch_size, rng)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch_size, generator=gen))  # logit-normal(0, 1)
        device = next(model.parameters()).device  # data and noise are drawn on the CPU, then moved
        x0, cond, noise, t = (v.to(device) for v in (x0, cond, noise, t))
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        v = model(xt, t * 1000, encoder_hidden_states=cond).sample
        return torch.mean((v - (noise - x0)) ** 2)

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """The EMA weights as a shapes model folder (`out_dir/export`: fp16 safetensors, the
        diffusers config, sha256 manifest); `flowkit.load(out_dir/export)` samples from it."""
        from flowkit.loading import save_shapes

        return save_shapes(model, Path(out_dir) / "export")


def _shapes_target() -> tuple[Any, TrainConfig]:
    task = ShapesTask(total_steps=16000)
    return task, TrainConfig(steps=16000, batch_size=32, lr=3e-4, warmup=500, ema_decay=0.999, ckpt_every=200)


TRAIN_TARGETS.register(TrainTarget('shapes', "the shapes world's text-to-image flow model (the shipped `shapes`)", _shapes_target))
