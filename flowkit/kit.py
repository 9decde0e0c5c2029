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
    """classifier: images [B, 3, H, W] in [-1, 1] -> class logits [B, K] (inference mode,
    on the images' device); num_classes: K; asked_classes: prompts -> the classes each
    prompt asks for, long [B, G] with -1 where it asks for none or is not the world's;
    reference_prompt: (prompt, target class, reference class) -> the prompt with the target
    class asked as the reference class instead."""

    classifier: Callable[[Tensor], Tensor] | None = None
    num_classes: int | None = None
    class_kind: str = "classes"  # what the classes are, for messages ("(shape, colour) groups")
    asked_classes: Callable[[Sequence[str]], Tensor] | None = None
    reference_prompt: Callable[[str, int, int], str] | None = None
