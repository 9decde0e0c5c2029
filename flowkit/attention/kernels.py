"""Attention kernels: softmax(q k^T * scale + mask) v under one signature.

Every kernel takes q [B, H, Lq, D], k and v [B, H, Lk, D], an optional mask (boolean,
True = attend, or an additive float bias, broadcastable to [B, H, Lq, Lk]) and an optional
scale (default 1/sqrt(D)), and returns [B, H, Lq, D].

- "sdpa": PyTorch's `scaled_dot_product_attention`, which picks its fused backend (flash /
  memory-efficient / cuDNN on a GPU, the fused flash kernel on CPU). The default.
- "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn": SDPA restricted to one
  backend (`torch.nn.attention.sdpa_kernel`); an unusable backend is an UnsupportedError.
- "xformers": `xformers.ops.memory_efficient_attention`, when xformers imports, on CUDA.
- "reference": the plain matmul-softmax, accumulated in float32 (float64 stays float64);
  `reference(..., probs=True)` also returns the attention probabilities, which is how
  attention maps are captured.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit.errors import UnknownNameError, UnsupportedError, closest

__all__ = ["KERNELS", "Kernel", "reference", "unavailable", "check_kernel", "DEFAULT_KERNEL"]

DEFAULT_KERNEL = "sdpa"


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
              *, probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v by matmuls; with probs=True also the probabilities [B, H, Lq, Lk]."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(acc)
    p = scores.softmax(dim=-1)
    out = (p @ v.to(acc)).to(q.dtype)
    return (out, p) if probs else out


def _sdpa(backend: str | None) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        except RuntimeError as e:
            raise UnsupportedError(f"attention kernel 'sdpa-{_SHORT[backend]}' cannot run on {q.device.type} "
                                   f"{q.dtype} inputs of shape {list(q.shape)}: {str(e).splitlines()[0]}; "
                                   "use kernel 'sdpa'") from e

    return run


def _xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    import xformers.ops as xops

    if mask is not None:
        raise UnsupportedError("flowkit's xformers kernel takes no attention mask; use kernel 'sdpa'")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers: [B, L, H, D]
    return xops.memory_efficient_attention(q, k, v, scale=scale).transpose(1, 2)


_SHORT = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn"}


@dataclass(frozen=True)
class Kernel:
    """A named kernel: fn(q, k, v, mask=None, scale=None) -> out, and where it can run."""

    name: str
    description: str
    fn: Callable[..., Tensor]
    cuda_only: bool = False
    module: str | None = None  # a package it needs


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("sdpa", "PyTorch SDPA, fused backend chosen by torch (default)", _sdpa(None)),
    Kernel("sdpa-math", "PyTorch SDPA, math backend only", _sdpa("MATH")),
    Kernel("sdpa-flash", "PyTorch SDPA, flash-attention backend only", _sdpa("FLASH_ATTENTION")),
    Kernel("sdpa-efficient", "PyTorch SDPA, memory-efficient backend only (CUDA)", _sdpa("EFFICIENT_ATTENTION"), True),
    Kernel("sdpa-cudnn", "PyTorch SDPA, cuDNN backend only (CUDA)", _sdpa("CUDNN_ATTENTION"), True),
    Kernel("xformers", "xformers memory-efficient attention (CUDA)", _xformers, True, "xformers"),
    Kernel("reference", "plain matmul-softmax (float32 accumulation), for tests", reference),
)}


def check_kernel(name: object) -> str:
    """`name` if it is a known kernel, else an UnknownNameError listing the kernels."""
    if not isinstance(name, str) or name not in KERNELS:
        hint = closest(name, KERNELS) if isinstance(name, str) else ""
        raise UnknownNameError(f"unknown attention kernel {name!r}{hint}; use one of {', '.join(KERNELS)}")
    return name


def unavailable(name: str, device: torch.device | str = "cpu") -> str | None:
    """Why kernel `name` cannot run on `device`, or None when it can (as far as known before a call)."""
    kernel = KERNELS[check_kernel(name)]
    if kernel.module is not None and importlib.util.find_spec(kernel.module) is None:
        return f"{kernel.module} is not installed"
    if kernel.cuda_only and torch.device(device).type != "cuda":
        return f"kernel {name!r} needs a CUDA device"
    return None

