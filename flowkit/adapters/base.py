"""Model-family adapters: what flowkit needs from a pipeline to sample with it.

An adapter maps a diffusers pipeline to: its denoiser (network + path + prediction type),
prompt encoding into branch conditionings, the latent shape for an image size, the
default time grid and guidance, and decoding of final latents into images.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.denoiser import Denoiser, latent_multiple  # noqa: F401  (re-exported)
from flowkit.errors import InputError, UnsupportedError
from flowkit.kit import ModelKit
from flowkit.registry import MODEL_FAMILIES
from flowkit.schedulers import frame_scale
from flowkit.timegrid import TimeGrid
from flowkit.tokens import Positions, TokenGroup, Words, check_positions, word_span

__all__ = ["ModelAdapter", "adapt", "latent_multiple", "check_multiple"]


def _word_group(group: Any) -> list[tuple[str, int]]:
    """A words= group (object word, *modifiers), each a word or (word, occurrence) -> [(word, occurrence)]."""
    items = [group] if isinstance(group, str) else group
    if not isinstance(items, Sequence) or not items:
        raise InputError(f"each group in words= is (object word, *modifier words), got {group!r}")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, 0))
        elif (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)
              and not isinstance(item[1], bool)):
            out.append(item)
        else:
            raise InputError(f"a word in words= is a string or (word, occurrence from 0), got {item!r}")
    return out


class ModelAdapter(ABC):
    """Base of model-family adapters. A family registers its adapter with
    `@MODEL_FAMILIES.register` and says which pipelines it takes in `matches`."""

    family: str = ""
    title: str = ""  # e.g. "SDXL (StableDiffusionXLPipeline)", for messages

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name, cls.description = cls.family, cls.title  # the registry's name and description

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether this family's adapter takes `pipe`."""
        return False
    default_guidance_scale: float = 7.5
    pass_sigmas: bool = False  # the pipeline calls set_timesteps(sigmas=linspace(1, 1/N, N)) (FLUX)

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @property
    def scheduler(self) -> Any:
        """The pipeline's diffusers scheduler, or None."""
        return getattr(self.pipe, "scheduler", None)

    def scheduler_grid(self, *, sigmas: Sequence[float] | None = None, mu: float | None = None) -> TimeGrid | None:
        """The pipeline scheduler's grid, set as the pipeline sets it (None without a scheduler)."""
        sch = self.scheduler
        if sch is None or not hasattr(sch, "set_timesteps"):
            return None
        return TimeGrid.from_scheduler(sch, pass_sigmas=self.pass_sigmas, sigmas=sigmas, mu=mu)

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

    def encode_sized(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, need_uncond: bool,
                     height: int, width: int) -> dict[str, Conditioning]:
        """`encode` for an image size (SDXL's conditioning depends on it)."""
        return self.encode(prompts, negative_prompts, need_uncond)

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

    def kit(self) -> ModelKit:
        """What this model family (and its world) hands methods: `to_pixels` and
        `token_groups` for every family; a world's classifier, counter, ... where it has them."""
        return ModelKit(family=self.family, to_pixels=self.to_pixels, token_groups=self.token_groups,
                        text_tokens=self._text_tokens)

    def _text_tokens(self, prompt: str) -> tuple[int, ...]:
        return self.word_tokens(prompt, (0, len(prompt)))

    @abstractmethod
    def decode(self, x: Tensor, output_type: str) -> Any:
        """Final latents -> images ('pil' list, 'np' array, 'pt' tensor in [0, 1], or 'latent')."""

    def to_pixels(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Final latents [B, *latent_shape] (what `decode` receives) -> images [B, 3, H, W] in the
        model's [-1, 1], unclamped, keeping the autograd graph (for gradient guidance and rewards).
        `generator`: passed to a VAE decoder that samples (diffusers' `vae.decode(generator=)`)."""
        raise UnsupportedError(f"{self.title or type(self.pipe).__name__} has no differentiable decode to pixels")

    # -- words of a prompt as token positions (attention guidance) ---------------------------
    def token_groups(self, prompts: Sequence[str] | None, words: Words | None = None,
                     positions: Positions | None = None, *,
                     max_sequence_length: int | None = None) -> list[list[TokenGroup]]:
        """One list of `TokenGroup`s per prompt: positions into the text sequence the network
        attends to (the rows of the conditioning's `encoder_hidden_states`).

        `words`: groups as (object word, *modifier words), the same for every prompt, found with
        the pipeline's own tokenizer(s) as its `encode_prompt` tokenizes `prompt` (SDXL's and
        SD3's `prompt_2`/`prompt_3` taken equal to it); a word may be `(word, k)` for its k-th
        occurrence (from 0; default the first). `positions`: per prompt, per group, per word
        (object first) one position or a list of them (`[[[5, 2]]]`, `[[[[5, 6], [2]]]]`), the
        only way when `prompts` is None (prompt embeddings). Neither: the family's own parser
        where it has one (shapes captions). `max_sequence_length`: the T5 length of the
        pipeline call (SD3, FLUX), when not the pipeline's default."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        length = self.text_length(max_sequence_length)
        if positions is not None:
            if words is not None:
                raise InputError("give words= or positions=, not both")
            return check_positions(positions, length, None if prompts is None else len(prompts))
        if prompts is None:
            raise InputError("prompt embeddings carry no words: pass positions=[...] (per prompt, per group, "
                             "per word, object first, e.g. [[[5, 2]]])")
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be strings, got {prompts!r}")
        if words is None:
            return self.parsed_token_groups(prompts, max_sequence_length)
        groups = [_word_group(g) for g in ([words] if isinstance(words, str) else words)]
        out = []
        for text in prompts:
            row = []
            for group in groups:
                found = [self.word_tokens(text, word_span(text, w, k), max_sequence_length) for w, k in group]
                names = tuple(w for w, _ in group)
                row.append(TokenGroup(object=found[0], modifiers=tuple(found[1:]), words=names))
            out.append(row)
        return out

    def text_length(self, max_sequence_length: int | None = None) -> int:
        """Length of the text-token sequence the network attends to (`encoder_hidden_states`)."""
        raise UnsupportedError(f"{self.title or type(self.pipe).__name__} has no text tokens to find words in")

    def word_tokens(self, text: str, span: tuple[int, int], max_sequence_length: int | None = None) -> tuple[int, ...]:
        """Positions in the attended text sequence of the tokens of `text[span[0]:span[1]]`."""
        raise UnsupportedError(f"{self.title or type(self.pipe).__name__} has no text tokens to find words in")

    def parsed_token_groups(self, prompts: Sequence[str],
                            max_sequence_length: int | None = None) -> list[list[TokenGroup]]:
        """Groups read from the prompts themselves (`token_groups(words=None)`); this family has no parser."""
        raise InputError(f"{self.title or type(self.pipe).__name__} cannot find a prompt's objects by itself: "
                         "pass words=[(object, *modifiers), ...] or positions=[...]")

    # -- the drop-in protocol (FlowKitPipeline): a pipeline call's keywords -------------------
    # keyword of the pipeline call that carries attention extras (the LoRA scale)
    attention_kwargs_name: str = "cross_attention_kwargs"

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int) -> dict[str, Conditioning]:
        """Branch conditionings from a pipeline call's keywords, as its `encode_prompt` makes them."""
        raise UnsupportedError(f"{type(self.pipe).__name__} cannot be wrapped by FlowKitPipeline")

    def output(self, x: Tensor, output_type: str, return_dict: bool, generator: Any = None) -> Any:
        """The pipeline's own output (its output class, or its tuple form)."""
        raise UnsupportedError(f"{type(self.pipe).__name__} cannot be wrapped by FlowKitPipeline")

    def check_call(self, kw: Mapping[str, Any]) -> None:
        """The pipeline's own `check_inputs` on a call's keywords (diffusers' messages)."""
        check = getattr(self.pipe, "check_inputs", None)
        if check is None:
            return
        args = {}
        for name, p in inspect.signature(check).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name in kw:
                args[name] = kw[name]
            elif p.default is inspect.Parameter.empty:
                args[name] = None
        check(**args)

    # -- attention extras (LoRA scale) -----------------------------------------------------
    def set_attention_kwargs(self, kwargs: dict | None) -> None:
        """The pipeline call's cross/joint attention kwargs (e.g. {"scale": 0.5}) for the network."""
        setattr(self.denoiser, self.attention_kwargs_name, kwargs)

    @staticmethod
    def lora_scale(kw: Mapping[str, Any], name: str) -> float | None:
        extra = kw.get(name)
        return None if not extra else extra.get("scale")

    # -- latents ---------------------------------------------------------------------------
    def draw_noise(self, batch: int, height: int, width: int, generator: Any, dtype: torch.dtype) -> Tensor:
        """Unit noise [batch, *latent_shape] as the pipeline draws it (`randn_tensor`)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch,) + self.latent_shape(height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def noise_from_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """A call's `latents=` (the pipeline's unit starting noise) in flowkit's latent layout."""
        shape = self.latent_shape(height, width)
        if tuple(latents.shape[1:]) != shape:
            raise InputError(f"latents must have shape [batch, {', '.join(map(str, shape))}] for "
                             f"{height}x{width}, got {list(latents.shape)}")
        return latents

    def to_pipeline_latents(self, x: Tensor, t: float, frame: str) -> Tensor:
        """The flow-frame state as the pipeline's `latents` at flowkit time t (its scheduler's frame)."""
        return x * frame_scale(frame, t)

    def from_pipeline_latents(self, latents: Tensor, like: Tensor, t: float, frame: str) -> Tensor:
        """The inverse of `to_pipeline_latents` (`like`: a flow-frame state of the right shape)."""
        return latents / frame_scale(frame, t)



def adapt(pipe: Any) -> ModelAdapter:
    """The adapter for `pipe` (from the model-family registry), or an UnsupportedError naming
    the supported families."""
    if isinstance(pipe, ModelAdapter):
        return pipe
    inner = getattr(pipe, "pipe", None)
    if inner is not None and type(pipe).__name__ == "FlowKitPipeline":
        pipe = inner
    families = [cls for _, cls in MODEL_FAMILIES.items()]
    for cls in families:
        if cls.matches(pipe):
            return cls(pipe)
    names = "; ".join(cls.title or cls.family for cls in families)
    kind = _pipeline_kind(type(pipe).__name__)
    what = f" ({kind})" if kind else ""
    raise UnsupportedError(f"flowkit cannot sample with a {type(pipe).__name__}{what}; it supports text-to-image "
                           f"pipelines of these families: {names}")


_KINDS = (("Img2Img", "an image-to-image pipeline"), ("Inpaint", "an inpainting pipeline"),
          ("ControlNet", "a ControlNet pipeline"), ("Refiner", "a refiner"), ("Depth2Img", "an image-to-image pipeline"),
          ("Upscale", "an upscaler"), ("InstructPix2Pix", "an image-editing pipeline"), ("Fill", "an inpainting pipeline"),
          ("Kontext", "an image-editing pipeline"), ("Redux", "an image-variation pipeline"),
          ("Control", "a control pipeline"), ("Adapter", "an adapter pipeline"))


def _pipeline_kind(name: str) -> str:
    for key, kind in _KINDS:
        if key.lower() in name.lower():
            return kind
    return ""


def check_multiple(height: int, width: int, factor: int, family: str) -> None:
    if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive integers, got {height!r}x{width!r}")
    if height % factor or width % factor:
        raise InputError(f"{family} needs height and width that are multiples of {factor}, got {height}x{width}")
