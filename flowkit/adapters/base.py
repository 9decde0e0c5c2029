"""Model-family adapters: what flowkit needs from a pipeline to sample with it.

An adapter maps a diffusers pipeline to: its denoiser (network + path + prediction type),
prompt encoding into branch conditionings, the latent shape for an image size, the
default time grid and guidance, and decoding of final latents into images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.denoiser import Denoiser
from flowkit.errors import InputError, UnsupportedError
from flowkit.timegrid import TimeGrid

__all__ = ["ModelAdapter", "adapt", "ADAPTERS"]


class ModelAdapter(ABC):
    family: str = ""
    default_guidance_scale: float = 7.5

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @property
    @abstractmethod
    def denoiser(self) -> Denoiser: ...

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @abstractmethod
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
               need_uncond: bool) -> dict[str, Conditioning]:
        """Branch conditionings ('cond' and, if asked, 'uncond') for the prompts."""

    def encoder(self):
        """A function prompts -> Conditioning, for modules that add branches (GFCG)."""
        return lambda texts: self.encode(list(texts), None, False)["cond"]

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The per-sample latent shape for an image size (validating the size)."""

    def default_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def image_seq_len(self, height: int, width: int) -> int | None:
        return None

    def default_grid(self) -> TimeGrid:
        return TimeGrid.uniform()

    @abstractmethod
    def decode(self, x: Tensor, output_type: str) -> Any:
        """Final latents -> images ('pil' list, 'np' array, 'pt' tensor in [0, 1], or 'latent')."""


ADAPTERS: list[tuple[Any, type[ModelAdapter]]] = []  # (predicate(pipe) -> bool, adapter class)


def adapt(pipe: Any) -> ModelAdapter:
    """The adapter for `pipe`, or an UnsupportedError naming the supported families."""
    if isinstance(pipe, ModelAdapter):
        return pipe
    from flowkit.adapters import shapes  # noqa: F401  (registers)

    for pred, cls in ADAPTERS:
        if pred(pipe):
            return cls(pipe)
    names = ", ".join(cls.family for _, cls in ADAPTERS)
    raise UnsupportedError(f"flowkit cannot sample with a {type(pipe).__name__}; supported families: {names}")


def check_multiple(height: int, width: int, factor: int, family: str) -> None:
    if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive integers, got {height!r}x{width!r}")
    if height % factor or width % factor:
        raise InputError(f"{family} needs height and width that are multiples of {factor}, got {height}x{width}")
