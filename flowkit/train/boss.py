"""`flowkit train boss`: the straightening fine-tune of BOSS (Nguyen et al., "Bellman Optimal
Step-size Straightening of Flow-Matching Models", Sec. 3.3, eq. 9).

The frozen model's fine Euler trajectories (`k_max` steps, conditional velocity, prompts of
a shapes prompt set, seeded noise) give the BOSS path t_{p_0} > ... > t_{p_K} of K steps;
the fine-tune regresses the velocity at each chosen time onto the displacement of its
optimal step,

    L = E_{n, k} || v_theta(x^n_{p_k}, t_{p_k}) - (x^n_{p_{k+1}} - x^n_{p_k}) / (t_{p_{k+1}} - t_{p_k}) ||^2,

so that K Euler steps on the BOSS grid land where the fine trajectory does. `lora_rank > 0`
trains LoRA adapters (peft, through diffusers' `add_adapter`) on the attention projections
instead of every weight; the export merges them. The export is a shapes model folder plus
`boss.json`, the BOSS table of the new weights (same grid: the model was straightened for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget, merged_copy

__all__ = ["BossTask"]


@dataclass
class BossTask:
    name: str = "boss"
    model: str = "shapes"  # a shapes-family model: shapes, tiny, or a shapes model folder
    steps: int = 6  # K: the sampling steps to straighten for
    k_max: int = 64
    trajectories: int = 256
    prompts: str = "single"
    lora_rank: int = 0  # 0: fine-tune every weight
    seed: int = 0
    _data: dict[str, Any] | None = field(default=None, repr=False)
    _pipeline: Any = field(default=None, repr=False)

    def _pipe(self):
        """The frozen model's pipeline (loaded once)."""
        if self._pipeline is None:
            import flowkit

            self._pipeline = flowkit.load(self.model)
        return self._pipeline

    def build(self) -> nn.Module:
        import copy

        unet = copy.deepcopy(self._pipe().unet)
        if self.lora_rank > 0:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        return unet.train()

    def data(self) -> dict[str, Any]:
        """Pairs along the BOSS path of the frozen model's trajectories (computed once)."""
        if self._data is None:
            from flowkit.adapters.base import adapt
            from flowkit.boss import Problem, best_path, fine_grid, local_cost
            from flowkit.guidance_base import GuidanceStack
            from flowkit.seeding import generators_for, randn_per_sample
            from flowkit.tune import load_prompts

            adapter = adapt(self._pipe())
            prompts = load_prompts(self.prompts)
            rows = [prompts[i % len(prompts)] for i in range(self.trajectories)]
            shape = adapter.latent_shape(*adapter.default_size())
            with torch.no_grad():
                cond = adapter.encode(rows, None, False)["cond"]
                gens = generators_for(self.seed, range(self.trajectories))
                problem = Problem(adapter.denoiser, GuidanceStack([]), {"cond": cond}, gens)
                ts = fine_grid(adapter.denoiser, self.k_max)
                tr = problem.euler(randn_per_sample(shape, generators_for(self.seed, range(self.trajectories)))
                                   * float(ts[0]), ts)
            cost = local_cost(tr)
            path, _ = best_path(cost, self.steps)
            x = tr.xs[path]  # [K+1, N, ...]
            t = ts[path]  # [K+1]
            dt = (t[1:] - t[:-1]).float().view(-1, *([1] * (x.ndim - 1)))
            self._data = {"x": x[:-1], "target": (x[1:] - x[:-1]) / dt, "t": t[:-1].float(),
                          "cond": cond["encoder_hidden_states"], "cost": cost, "fine": ts, "shape": shape,
                          "prompts": prompts}
        return self._data

    def loss(self, model: nn.Module, step: int, batch_size: int, rng: np.random.Generator,
             gen: torch.Generator) -> torch.Tensor:
        d = self.data()
        n = rng.integers(self.trajectories, size=batch_size)
        k = rng.integers(self.steps, size=batch_size)
        x, target = d["x"][k, n], d["target"][k, n]
        v = model(x, d["t"][k] * 1000, encoder_hidden_states=d["cond"][n]).sample  # eq. 9
        return torch.mean((v - target) ** 2)

    def export(self, model: nn.Module, out_dir: Path) -> list[Path]:
        from flowkit.boss import BossTable, model_fingerprint
        from flowkit.denoiser import UNetDenoiser
        from flowkit.loading import save_shapes
        from flowkit.paths.linear import LinearPath

        merged = merged_copy(model)
        folder = Path(out_dir) / "export"
        files = save_shapes(merged, folder)
        d = self.data()
        table = BossTable(fingerprint=model_fingerprint(UNetDenoiser(merged.half().float(), LinearPath(), "velocity")),
                          shape=d["shape"], cost_kind="local", fine=[float(v) for v in d["fine"].tolist()],
                          cost=d["cost"], samples=self.trajectories, prompts=d["prompts"], guidance="none",
                          prompts_key=f"straightened-{self.steps}", model=f"{self.model} straightened for "
                          f"{self.steps} steps").choose([self.steps])
        files.append(table.save(folder / "boss.json"))
        return files


def _boss_target() -> tuple[Any, TrainConfig]:
    return BossTask(), TrainConfig(steps=2000, batch_size=32, lr=2e-5, warmup=100, ema_decay=0.99, ckpt_every=250)


TRAIN_TARGETS.register(TrainTarget('boss', 'the BOSS straightening fine-tune of a flow model (optionally LoRA)', _boss_target))
