"""What a model's world hands the methods of a run: `ModelKit`, the run's `ctx.kit`.

A method never fetches a world's networks or rules itself (GFCG does not import the shapes
world): the model family's adapter builds a kit from its world, the API puts it in the
run's context, and a method reads the typed fields it needs, preferring what its user
passed it. A field is None where the world does not provide it; a method that needs it
then refuses the run and says what to pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

__all__ = ["ModelKit"]


@dataclass(frozen=True)
class ModelKit:
    """What a model family and its world provide.

    Every family: to_pixels: final latents -> images [B, 3, H, W] in [-1, 1], differentiable
    (the adapter's `to_pixels`); token_groups: (prompts, words=, positions=) -> per prompt
    a list of `flowkit.tokens.TokenGroup` (positions in the text sequence the network
    attends to; the adapter's `token_groups`); text_tokens: prompt -> the positions of all its
    word tokens in that sequence (special and padding tokens left out).

    A world's (None elsewhere): classifier: images -> class logits [B, K] (inference mode,
    on the images' device); num_classes: K; asked_classes: prompts -> the classes each
    prompt asks for, long [B, G] with -1 where it asks for none or is not the world's;
    reference_prompt: (prompt, target class, reference class) -> the prompt with the target
    class asked as the reference class instead; counter: images -> counts per class [B, K]
    (differentiable); asked_counts: prompts -> the count each prompt asks of each class,
    [B, K] (0 where not asked).
    """

    family: str | None = None  # the model family's name (rewards say which family's images they score)
    to_pixels: Callable[[Tensor], Tensor] | None = None
    token_groups: Callable[..., list] | None = None
    text_tokens: Callable[[str], tuple[int, ...]] | None = None
    classifier: Callable[[Tensor], Tensor] | None = None
    num_classes: int | None = None
    class_kind: str = "classes"  # what the classes are, for messages ("(shape, colour) groups")
    asked_classes: Callable[[Sequence[str]], Tensor] | None = None
    reference_prompt: Callable[[str, int, int], str] | None = None
    counter: Callable[[Tensor], Tensor] | None = None
    asked_counts: Callable[[Sequence[str]], Tensor] | None = None
