"""What the latent diffusers pipelines (SD 1.x/2.x, SDXL, SD3, FLUX) share in flowkit.

Each family's adapter (sd.py, sdxl.py, sd3.py, flux.py) names its pipeline class, its
denoiser and its prompt encoding; this base gives them the pipeline's scheduler grid,
device and dtype, the initial noise as the pipeline draws it (`randn_tensor`, diffusers'
generator semantics), the latents a pipeline callback sees, and decoding through the
pipeline's VAE into the pipeline's own output class.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from flowkit.adapters.base import ModelAdapter, check_multiple
from flowkit.conditioning import Conditioning
from flowkit.errors import InputError, UnsupportedError
from flowkit.timegrid import TimeGrid
from flowkit.tokens import word_positions

__all__ = ["LatentAdapter"]


class LatentAdapter(ModelAdapter):
    """Base of the adapters of diffusers' latent text-to-image pipelines."""

    # the network attribute of the pipeline ("unet" or "transformer")
    network: str = "unet"
    # the pipeline call's default T5 length (SD3, FLUX); None: the network attends to no T5 tokens
    max_sequence_length: int | None = None

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        if getattr(pipe, "vae", None) is None:
            raise UnsupportedError(f"this {type(pipe).__name__} has no VAE; flowkit needs the full pipeline")
        net = getattr(pipe, self.network, None)
        if net is None:
            raise UnsupportedError(f"this {type(pipe).__name__} has no {self.network}")
        if getattr(net, "encoder_hid_proj", None) is not None:
            raise UnsupportedError(
                "IP-Adapter weights are loaded into this pipeline; flowkit samples text-to-image without them: "
                "call pipe.unload_ip_adapter() first")

    # -- the pipeline ----------------------------------------------------------------------
    @property
    def net(self) -> Any:
        return getattr(self.pipe, self.network)

    @property
    def device(self) -> torch.device:
        # diffusers' `_execution_device` walks every component (~10 ms on an SD-sized UNet) and a
        # call asks for it several times; an adapter lives for one call, where it cannot change
        if getattr(self, "_device", None) is None:
            self._device = self.pipe._execution_device
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_grid(self) -> TimeGrid:
        grid = self.scheduler_grid()
        if grid is None:
            raise UnsupportedError(f"this {type(self.pipe).__name__} has no scheduler; give flowkit a grid")
        return grid

    def factor(self) -> int:
        """Height and width must be multiples of this."""
        return self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        check_multiple(height, width, self.factor(), self.family)
        f = self.vae_scale_factor
        return (self.latent_channels(), height // f, width // f)

    def latent_channels(self) -> int:
        return int(self.net.config.in_channels)

    # -- prompts ---------------------------------------------------------------------------
    @abstractmethod
    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int) -> dict[str, Conditioning]:
        """Branch conditionings from a pipeline call's keywords (prompt, prompt_2, negative_prompt,
        prompt_embeds, ..., height, width), as the pipeline's own `encode_prompt` makes them."""

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, need_uncond: bool):
        h, w = self.default_size()
        return self.encode_sized(prompts, negative_prompts, need_uncond, h, w)

    def encode_sized(self, prompts, negative_prompts, need_uncond, height, width):
        kw = {"prompt": list(prompts), "negative_prompt": list(negative_prompts) if negative_prompts else None,
              "height": height, "width": width}
        return self.encode_call(kw, need_uncond, 1)

    def t5_length(self, max_sequence_length: int | None = None) -> int:
        """The T5 length of a call: its `max_sequence_length`, else the pipeline's default."""
        if self.max_sequence_length is None:
            if max_sequence_length is not None:
                raise InputError(f"max_sequence_length is the T5 length of SD3 and FLUX; {self.family} has no T5 "
                                 "encoder: leave it out")
            return 0
        t5 = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        if isinstance(t5, bool) or not isinstance(t5, int) or t5 < 1:
            raise InputError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        return t5

    # -- decoding --------------------------------------------------------------------------
    def vae_input(self, x: Tensor) -> Tensor:
        """Final flow-frame latents [B, C, h, w] -> the VAE decoder's input (the pipeline's
        un-scaling: `x / scaling_factor` here; families with a shift or mean/std override it)."""
        return x / self.pipe.vae.config.scaling_factor

    def to_pixels(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Final latents [B, C, h, w] -> images [B, 3, H, W] in the VAE's [-1, 1], unclamped and
        differentiable: `vae.decode(vae_input(x))` in the VAE's dtype, before postprocessing
        (safety checker, watermark, denormalisation)."""
        return vae_decode(self.pipe, self.vae_input(x), generator)

    @abstractmethod
    def decode_full(self, x: Tensor, output_type: str, generator: Any = None) -> tuple[Any, dict]:
        """Final latents -> (images, other fields of the pipeline's output)."""

    def decode(self, x: Tensor, output_type: str) -> Any:
        return self.decode_full(x, output_type)[0]

    @property
    @abstractmethod
    def output_class(self) -> type: ...

    def output(self, x: Tensor, output_type: str, return_dict: bool, generator: Any = None) -> Any:
        """The pipeline's own output (its output class, or its tuple form)."""
        images, extra = self.decode_full(x, output_type, generator)
        if not return_dict:
            return (images, *extra.values())
        return self.output_class(images=images, **extra)

    def _postprocess(self, image: Tensor, output_type: str, **kw: Any) -> Any:
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        return self.pipe.image_processor.postprocess(image, output_type=output_type, **kw)


def agreed_positions(tokenizers: Sequence[Any], text: str, span: tuple[int, int], max_length: int,
                     required: bool = True) -> tuple[int, ...]:
    """A word's token positions under each of `tokenizers` (the CLIP pair of SDXL and SD3, whose
    embeddings are joined feature-wise, so their positions must agree), or UnsupportedError."""
    found = [word_positions(tok, text, span, max_length, required) for tok in tokenizers]
    if any(f != found[0] for f in found[1:]):
        raise UnsupportedError(f"this pipeline's tokenizers put {text[span[0]:span[1]]!r} of {text!r} at different "
                               f"positions {found}; pass positions= for the sequence the network attends to")
    return found[0]


def vae_decode(pipe: Any, latents: Tensor, generator: Any = None) -> Tensor:
    """`pipe.vae.decode` of scaled latents on the VAE's device and dtype."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    params = inspect.signature(vae.decode).parameters
    if "generator" in params and generator is not None:
        return vae.decode(latents, return_dict=False, generator=generator)[0]
    return vae.decode(latents, return_dict=False)[0]
