"""Cross-attention maps as attention-based guidance reads them (FRAP, counting guidance).

Helpers shared by the methods of this folder (a module whose name starts with '_' registers
nothing): the per-token maps of chosen layers laid out on the image grid, Attend-and-Excite's
normalisation, its Gaussian smoothing, and the token groups of a run's prompts.

Attend-and-Excite (Chefer et al., SIGGRAPH 2023, Sec. 3): per token s, the map A_s [h, w] is
the attention of every image patch to s averaged over heads and the chosen layers; their
normalisation softmaxes 100 * A over the prompt's word tokens (start and padding tokens left
out), and the presence of s is measured on the map smoothed by a 3x3 Gaussian (sigma 0.5).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit.errors import InputError, UnsupportedError
from flowkit.tokens import check_positions

__all__ = ["named_layers", "layer_maps", "normalize_maps", "smooth", "prompt_groups", "finest_layers", "groups_reason",
           "sqrt_decay", "given_positions"]


def named_layers(store: Any, patterns: Sequence[str]) -> list[str]:
    """The capturable layer names that `patterns` (exact names or globs, as `layers=` takes
    them) match: maps are stored under names, so a module reads them by these."""
    return store.resolve(patterns)


def layer_maps(store: Any, layers: Sequence[str], step: int, branch: str, batch: int) -> Tensor:
    """Token maps [B, Lk, h, w] of `branch` at global `step`, averaged over `layers` (maps of
    coarser layers are upsampled bilinearly to the finest one's grid). Rows of the batch that
    the branch did not evaluate stay 0."""
    maps = [store.get(layer, step, branch) for layer in layers]
    h = max(m.spatial().shape[-2] for m in maps)
    w = max(m.spatial().shape[-1] for m in maps)
    total = None
    for m in maps:
        sp = m.spatial()  # [n, Lk, h', w']
        if sp.shape[-2:] != (h, w):
            sp = F.interpolate(sp, size=(h, w), mode="bilinear", align_corners=False)
        full = sp.new_zeros((batch,) + tuple(sp.shape[1:]))
        full = full.index_copy(0, m.samples.to(full.device), sp)
        total = full if total is None else total + full
    return total / len(maps)


def finest_layers(store: Any, step: int, branch: str) -> list[str]:
    """The captured layers of `branch` at `step` whose maps have the most image tokens."""
    seen = {m.layer: m.probs.shape[-2] for m in store.maps if m.step == step and m.branch == branch}
    if not seen:
        raise UnsupportedError("no cross-attention layer was captured: this model has none to guide with")
    most = max(seen.values())
    return [name for name in store.layers if seen.get(name) == most]


def normalize_maps(maps: Tensor, text: Sequence[Sequence[int]], norm: str) -> Tensor:
    """maps [B, Lk, h, w] -> per-token maps to measure. norm="ae": Attend-and-Excite's softmax
    of 100 * A over each row's word tokens `text[b]` (other tokens get 0); norm="raw": the
    attention probabilities themselves."""
    if norm == "raw":
        return maps
    if norm != "ae":
        raise InputError(f"norm must be 'ae' or 'raw', got {norm!r}")
    out = torch.zeros_like(maps)
    for b, positions in enumerate(text):
        idx = torch.as_tensor(list(positions), dtype=torch.long, device=maps.device)
        out[b, idx] = torch.softmax(100.0 * maps[b, idx], dim=0)
    return out


def gaussian_kernel(size: int = 3, sigma: float = 0.5, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """A normalised 2-D Gaussian [size, size] (exp(-x^2 / (2 sigma^2)) per axis)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def smooth(maps: Tensor, size: int = 3, sigma: float = 0.5) -> Tensor:
    """Gaussian smoothing of maps [..., h, w] with reflect padding (Attend-and-Excite's)."""
    if size <= 1 or sigma <= 0:
        return maps
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    pad = size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect" if min(shape[-2:]) > pad else "replicate")
    k = gaussian_kernel(size, sigma, dtype=maps.dtype).to(maps.device)[None, None]
    return F.conv2d(flat, k).reshape(shape)


def prompt_groups(ctx: Any, words: Any, positions: Any) -> list[list[Any]]:
    """The token groups of each row's prompt (see ModelAdapter.token_groups): from `words` or
    `positions` when given, else parsed by the model's world (shapes captions)."""
    kit = ctx.kit
    if kit is None or kit.token_groups is None:
        raise UnsupportedError("this model hands no token groups (its family has no text tokens to guide)")
    if ctx.prompts is None and positions is None:
        raise InputError("these prompts were given as embeddings, which carry no words: pass positions=[...] "
                         "(per prompt, per group, the token positions of the object and its modifiers)")
    return kit.token_groups(ctx.prompts, words=words, positions=positions)


def given_positions(positions: Any, name: str) -> Any:
    """`positions=` of a module checked for its shape (per prompt, per group, per word; the
    sequence length is checked at the run), or ValueError. A spec (the CLI) holds only flat
    lists, so positions cannot come from one: the module shows them as "custom"."""
    if positions is None:
        return None
    nested = isinstance(positions, Sequence) and not isinstance(positions, (str, bytes)) and positions and all(
        isinstance(row, Sequence) and not isinstance(row, (str, bytes)) for row in positions)
    if not nested:
        raise ValueError(f"{name}: positions={positions!r:.40} is not per prompt, per group, per word (object first), "
                         "e.g. [[[5, 2]]]; a spec cannot hold nested lists: pass them from Python or use words=")
    check_positions(positions, sys.maxsize, None)  # its shape (InputError, a ValueError, names the entry)
    return positions


def groups_reason(ctx: Any, words: Any, positions: Any, name: str) -> str | None:
    """Why the token groups of this run's prompts cannot be found (a refusal), or None."""
    kit = ctx.kit
    if kit is None or kit.token_groups is None:
        return f"{name} needs a model whose text tokens it can find (its family hands no token groups)"
    if ctx.prompts is None:
        return None if positions is not None else \
            f"{name}: prompts given as embeddings carry no words; pass positions=[...]"
    try:
        kit.token_groups(ctx.prompts, words=None if words is None else [tuple(w.split()) for w in words],
                         positions=positions)
    except (InputError, UnsupportedError) as e:
        return f"{name} cannot find the objects of these prompts ({e})"
    return None


def sqrt_decay(step: int, steps: int) -> float:
    """Attend-and-Excite's step-size schedule: sqrt of a linear ramp from 1 to 0.5 over the run."""
    return math.sqrt(1.0 - 0.5 * step / max(steps, 1))
