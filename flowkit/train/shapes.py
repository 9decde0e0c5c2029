"""`flowkit train shapes`: the shapes world's text-to-image flow-matching UNet.

Flow matching on the linear path (x_t = (1 - t) x0 + t noise, target v = noise - x0),
logit-normal t, caption dropout for classifier-free guidance, multi-resolution batches:
mostly 16 px early with 32 px mixed in, and 32 px only for the final `finish` fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowkit.text import encode_texts, load_minilm
from flowkit.worlds import shapes as world

__all__ = ["ShapesTask"]


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
            tok, enc = load_minilm()
            texts = [world.caption_text(c) for c in world.all_captions()] + [""]
            emb = torch.cat([encode_texts(tok, enc, texts[i:i + 128]) for i in range(0, len(texts), 128)])
            self._embeddings = dict(zip(texts, emb))
        return self._embeddings

    def build(self) -> nn.Module:
        from diffusers import UNet2DConditionModel

        from flowkit.pipelines.shapes import shapes_unet_config

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
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        v = model(xt, t * 1000, encoder_hidden_states=cond).sample
        return torch.mean((v - (noise - x0)) ** 2)

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """The EMA weights as a shapes model folder (`out_dir/export`: fp16 safetensors, the
        diffusers config, sha256 manifest); `flowkit.load(out_dir/export)` samples from it."""
        from flowkit.loading import save_shapes

        return save_shapes(model, Path(out_dir) / "export")
