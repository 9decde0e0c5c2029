"""Adapter for the shapes pipeline (pixel-space UNet2DConditionModel on MiniLM tokens)."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from flowkit.adapters.base import ModelAdapter, check_multiple
from flowkit.conditioning import Conditioning
from flowkit.denoiser import UNetDenoiser
from flowkit.errors import InputError
from flowkit.kit import ModelKit
from flowkit.paths.linear import LinearPath
from flowkit.registry import MODEL_FAMILIES
from flowkit.text import MAX_LENGTH
from flowkit.timegrid import TimeGrid
from flowkit.tokens import TokenGroup, word_positions

__all__ = ["ShapesAdapter", "to_images", "shapes_kit"]

def to_images(x: Tensor, output_type: str) -> Any:
    """Pixel tensors in [-1, 1] [B, 3, H, W] -> images of `output_type`."""
    if output_type == "latent":
        return x
    img = ((x.float().clamp(-1, 1) + 1) / 2)
    if output_type == "pt":
        return img
    arr = img.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise InputError(f"output_type must be pil, np, pt or latent, got {output_type!r}")


@MODEL_FAMILIES.register
class ShapesAdapter(ModelAdapter):
    family = "shapes"
    title = "shapes (flowkit's ShapesPipeline)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from flowkit.worlds.shapes_pipeline import ShapesPipeline

        return isinstance(pipe, ShapesPipeline)
    default_guidance_scale = 4.0
    pass_sigmas = True  # ShapesPipeline sets its scheduler with sigmas = linspace(1, 1/N, N)

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        n = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        self._denoiser = UNetDenoiser(pipe.unet, LinearPath(n), "velocity")

    @property
    def denoiser(self) -> UNetDenoiser:
        return self._denoiser

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, need_uncond: bool):
        pos, neg = self.pipe.encode_prompt(list(prompts), list(negative_prompts) if negative_prompts else None,
                                           need_uncond, 1, self.device)
        out = {"cond": Conditioning({"encoder_hidden_states": pos})}
        if need_uncond:
            out["uncond"] = Conditioning({"encoder_hidden_states": neg})
        return out

    def factor(self) -> int:
        return 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        s = int(self.pipe.unet.config.sample_size)
        return s, s

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        check_multiple(height, width, self.factor(), self.family)
        if height < 8 or width < 8 or height > 256 or width > 256:
            raise InputError(f"the shapes model takes sizes from 8 to 256 px, got {height}x{width}")
        return (int(self.pipe.unet.config.in_channels), height, width)

    def default_grid(self) -> TimeGrid:
        shift = float(self.pipe.scheduler.config.get("shift", 1.0))
        return TimeGrid.uniform() if shift == 1.0 else TimeGrid.shifted(shift)

    def to_pixels(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The identity: the shapes model works in pixel space, [B, 3, H, W] in [-1, 1]."""
        return x

    def decode(self, x: Tensor, output_type: str) -> Any:
        return to_images(x if output_type == "latent" else self.to_pixels(x), output_type)

    # -- words as token positions: MiniLM wordpieces, [CLS] first, MAX_LENGTH slots -----------
    def text_length(self, max_sequence_length: int | None = None) -> int:
        if max_sequence_length is not None:
            raise InputError("max_sequence_length is the T5 length of SD3 and FLUX; the shapes model has no T5 "
                             "encoder: leave it out")
        return MAX_LENGTH

    def word_tokens(self, text: str, span: tuple[int, int], max_sequence_length: int | None = None) -> tuple[int, ...]:
        return word_positions(self.pipe.tokenizer, text, span, self.text_length(max_sequence_length))

    def parsed_token_groups(self, prompts: Sequence[str],
                            max_sequence_length: int | None = None) -> list[list[TokenGroup]]:
        """Each caption's groups as the shapes world parses them: object = the shape noun as
        written, modifiers = (colour word, number word), count = the group's count."""
        from flowkit.worlds import shapes as world

        out = []
        for text in prompts:
            try:
                groups = world.parse_caption(text)
            except ValueError as e:
                raise InputError(f"{text!r} is not a shapes caption ({e}): pass words=[(object, *modifiers)] "
                                 "or positions=[...]") from None
            # a parsed caption is `<number> <colour> <shape>` groups joined by "and": 4 words a group, less one
            spans = [m.span() for m in re.finditer(r"\w+", text)]
            assert len(spans) == 4 * len(groups) - 1, (text, spans)
            row = []
            for j, g in enumerate(groups):
                number, colour, noun = spans[4 * j:4 * j + 3]
                assert text[colour[0]:colour[1]].lower() == g.colour, (text, g)
                found = [self.word_tokens(text, s, max_sequence_length) for s in (noun, colour, number)]
                row.append(TokenGroup(object=found[0], modifiers=(found[1], found[2]),
                                      words=tuple(text[a:b] for a, b in (noun, colour, number)), count=g.count))
            out.append(row)
        return out

    def kit(self) -> ModelKit:
        return dataclasses.replace(super().kit(), **_shapes_world_kit())

    # -- the drop-in protocol -------------------------------------------------------------
    def encode_call(self, kw, need_uncond: bool, num_images_per_prompt: int):
        pos, neg = kw.get("prompt_embeds"), kw.get("negative_prompt_embeds")
        if pos is None:
            prompt = kw.get("prompt")
            if prompt is None:
                raise InputError("give a prompt or prompt_embeds")
            pos, neg = self.pipe.encode_prompt(prompt, kw.get("negative_prompt"), need_uncond,
                                               num_images_per_prompt, self.device)
        elif need_uncond and neg is None:
            n = pos.shape[0] // num_images_per_prompt
            neg = self.pipe.encode_prompt([""] * n, None, False, num_images_per_prompt, self.device)[0]
        out = {"cond": Conditioning({"encoder_hidden_states": pos})}
        if need_uncond:
            out["uncond"] = Conditioning({"encoder_hidden_states": neg})
        return out

    def output(self, x: Tensor, output_type: str, return_dict: bool, generator: Any = None) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        images = self.decode(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def shapes_kit() -> ModelKit:
    """The shapes world's part of a kit (without a model: no to_pixels or token groups)."""
    return ModelKit(**_shapes_world_kit())


@functools.lru_cache(maxsize=1)
def _shapes_world_kit() -> dict[str, Any]:
    """The shapes world's classifier over the 12 (shape, colour) groups, the groups a caption
    asks for, a caption with one group asked as another, and the counter of each group."""
    from flowkit.worlds import shapes as world

    def asked(prompts: Sequence[str]) -> Tensor:
        return torch.tensor(world.asked_groups(prompts), dtype=torch.long).reshape(len(prompts), -1)

    def counts(prompts: Sequence[str]) -> Tensor:
        return torch.tensor(world.asked_counts(prompts), dtype=torch.float32).reshape(len(prompts), -1)

    # the classifier and the counter are the ones the world's rewards (flowkit.rewards) read
    from flowkit.worlds.shapes_rewards import class_logits, group_counts

    def classifier(images: Tensor) -> Tensor:  # inference only (GFCG reads probabilities)
        with torch.no_grad():
            return class_logits(images)

    return dict(classifier=classifier, num_classes=len(world.GROUPS), class_kind="(shape, colour) groups",
                asked_classes=asked, reference_prompt=world.swap_group, counter=group_counts, asked_counts=counts)
