"""Perturbed branches: how one branch's forward changes the network (PAG, SEG, SLG, AutoGuidance).

A guidance module that wants "a worse version of the model" on some branch declares it with
`requests.need(branch, mask, perturbation=Perturbation(...))`. The sampling loop then runs
that branch in a forward of its own (the other branches stay batched together), tagged with
the perturbation, and the network's attention controller (flowkit.attention) applies it for
that forward only. Targets are module paths of the network as diffusers names them: the
blocks a `LayerSkipConfig` selects, `fqn.index` (e.g. "transformer_blocks.7",
"mid_block.attentions.0.transformer_blocks.0").

- `identity`: the self-attention layers inside these blocks return their values, i.e. the
  attention map is the identity (Ahn et al., "Self-Rectifying Diffusion Sampling with
  Perturbed-Attention Guidance", eq. 9; diffusers' `skip_attention_scores`);
- `blur`: the self-attention queries inside these blocks are Gaussian-blurred over the
  (square) token grid before attention (Hong, "Smoothed Energy Guidance", Sec. 3.3; sigma
  above `blur_threshold_inf` is the infinite blur, the mean query), as diffusers' SEG hook;
- `skip`: these blocks are skipped whole: each returns its inputs (Stability AI's skip-layer
  guidance for SD 3.5; diffusers' `TransformerBlockSkipHook`, the SD3 pipeline's `skip_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Perturbation"]


@dataclass(frozen=True)
class Perturbation:
    """The perturbation of one branch's forward (module paths of the network; see the module docstring)."""

    identity: tuple[str, ...] = ()
    blur: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    blur_sigma: float = 9999999.0
    blur_threshold_inf: float = 9999.0

    def __post_init__(self) -> None:
        for name in ("identity", "blur", "skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not (self.identity or self.blur or self.skip):
            raise ValueError("a Perturbation needs at least one block (identity, blur or skip)")
        if self.blur and not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")

    @property
    def blocks(self) -> tuple[str, ...]:
        """Every block path this perturbation touches."""
        return self.identity + self.blur + self.skip

    def describe(self) -> str:
        parts = [f"{kind}:{','.join(paths)}" for kind, paths in
                 (("identity", self.identity), ("blur", self.blur), ("skip", self.skip)) if paths]
        return "; ".join(parts)
