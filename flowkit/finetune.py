"""Reward backpropagation: AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion
Models with Reward Backpropagation") and DRaFT (Clark et al., "Directly Fine-Tuning Diffusion
Models on Differentiable Rewards").

`finetune(pipe, reward=..., prompts=...)` adds a LoRA to the pipeline's network (peft, rank 4
on to_q/to_k/to_v/to_out.0, through diffusers' own `add_adapter`, its weights in fp32) and
trains it to maximise a differentiable reward of the sampled images:

    loss = -mean_b R(to_pixels(x_0^b), prompt_b),   x_0 = the sampler's chain from noise,

with gradients through the last K sampling steps only (the earlier ones run without a graph:
`flowkit.sample(grad_steps=K)`), K fixed (DRaFT-K), uniform, or the official randomised
truncation, each network call checkpointed (recomputed in the backward pass), AdamW with
gradient clipping, resumable checkpoints and held-out prompts scored at every checkpoint. The
LoRA is saved with diffusers' `save_lora_weights`, so a plain diffusers pipeline reloads it
with `load_lora_weights`.

The official code (mihirp1998/AlignProp, `sd_pipeline.py` and `alignprop_trainer.py`) scales
its images twice before the reward: `image_processor.postprocess(output_type="pt")` already
maps the decoded image from [-1, 1] to [0, 1], and its loss functions map it again with
`(im / 2 + 0.5).clamp(0, 1)`, so the reward sees [0.5, 1] (and the clamp zeroes the gradient
of every saturated pixel). Here the reward gets `adapter.to_pixels(x)` in [-1, 1], scaled once
and unclamped, which is what a flowkit reward takes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flowkit.adapters.base import adapt
from flowkit.api import build_guidance, build_sampler, sample_from_noise, wants_uncond
from flowkit.errors import InputError, NonFiniteError, UnsupportedError
from flowkit.rewards import build_reward
from flowkit.seeding import generators_for, randn_per_sample

__all__ = ["finetune", "FinetuneResult", "add_lora", "lora_parameters", "reward_loss", "truncation_steps",
           "saved_activation_bytes",
           "score", "save_lora", "load_lora", "TARGET_MODULES", "ADAPTER", "TRUNCATIONS"]

log = logging.getLogger(__name__)

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "alignprop"
TRUNCATIONS = ("fixed", "uniform", "random")
# the official randomised truncation: the first step with gradients t ~ N(42, 5) of 50 steps
# (`backprop_kwargs["gaussian"]`), redrawn until 1 <= t < N; K = N - t. Here as fractions of N.
RANDOM_MEAN, RANDOM_STD = 42 / 50, 5 / 50
CHECKPOINT_FILE = "latest.pt"
_STEP_TAG = 0xA119  # third key word of the training streams (seed, step, tag)


# -- the LoRA -----------------------------------------------------------------------------------
def _network(pipe: Any) -> tuple[str, nn.Module]:
    """(component name, network) of the pipeline: the module its denoiser evaluates."""
    net = getattr(adapt(pipe).denoiser, "network", None)
    if not isinstance(net, nn.Module):
        raise UnsupportedError(f"{type(pipe).__name__} has no network module to add a LoRA to")
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is net:
            return name, net
    raise UnsupportedError(f"cannot find the network of {type(pipe).__name__} among its components (unet, "
                           "transformer)")


def lora_parameters(pipe: Any, adapter_name: str = ADAPTER) -> dict[str, Tensor]:
    """The LoRA weights `adapter_name` of the pipeline's network, by parameter name (in order)."""
    _, net = _network(pipe)
    tag = f".{adapter_name}."
    return {n: p for n, p in net.named_parameters() if "lora_" in n and tag in n}


def add_lora(pipe: Any, *, rank: int = 4, targets: Sequence[str] = TARGET_MODULES,
             adapter_name: str = ADAPTER, seed: int = 0) -> dict[str, Tensor]:
    """Add a LoRA of `rank` on `targets` to the pipeline's network through diffusers'
    `add_adapter` (peft; lora_alpha = rank, so its scale is 1; A Gaussian, drawn from `seed`;
    B = 0, so it starts as the identity) and make it the active adapter; its weights are kept
    in fp32 whatever the network's dtype. Returns its parameters by name (what `finetune`
    trains)."""
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"rank must be an integer >= 1, got {rank!r}")
    _, net = _network(pipe)
    if adapter_name in (getattr(net, "peft_config", None) or {}):
        raise InputError(f"the network already has a LoRA named {adapter_name!r}: remove it "
                         f"(pipe.delete_adapters({adapter_name!r})) or give another adapter_name")
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
        torch.manual_seed(seed)
        net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=list(targets)), adapter_name=adapter_name)
    params = lora_parameters(pipe, adapter_name)
    if not params:
        raise UnsupportedError(f"no module of {type(net).__name__} matches {list(targets)}: name its attention "
                               "projections in targets=")
    for p in params.values():
        p.data = p.data.float()  # fp32 LoRA weights on a half-precision network
        p.requires_grad_(True)
    return params


def save_lora(pipe: Any, folder: str | os.PathLike, adapter_name: str = ADAPTER) -> Path:
    """Write the LoRA with the pipeline class's own `save_lora_weights` (diffusers' format and
    file name, with its peft config as adapter metadata), so a plain diffusers pipeline of the
    same class reloads it with `load_lora_weights(folder)`. Returns the folder."""
    from peft.utils import get_peft_model_state_dict

    name, net = _network(pipe)
    saver = getattr(type(pipe), "save_lora_weights", None)
    if saver is None:
        raise UnsupportedError(f"{type(pipe).__name__} has no diffusers LoRA loader (save_lora_weights)")
    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    if not state:
        raise InputError(f"the network has no LoRA named {adapter_name!r} to save")
    if name == "unet":  # diffusers' UNet training scripts write the diffusers naming
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = net.peft_config[adapter_name].to_dict()
    saver(str(folder), **{f"{name}_lora_layers": {k: v.detach().cpu().contiguous() for k, v in state.items()},
                          f"{name}_lora_adapter_metadata": metadata})
    return folder


def load_lora(pipe: Any, folder: str | os.PathLike, adapter_name: str = ADAPTER) -> None:
    """Load a LoRA written by `save_lora` into `pipe` (diffusers' `load_lora_weights`) as the
    active adapter `adapter_name`."""
    loader = getattr(pipe, "load_lora_weights", None)
    if loader is None:
        raise UnsupportedError(f"{type(pipe).__name__} has no diffusers LoRA loader (load_lora_weights)")
    loader(str(folder), adapter_name=adapter_name)


# -- truncation -------------------------------------------------------------------------------
def truncation_steps(truncation: str, steps: int, generator: torch.Generator, k: int = 1) -> int:
    """K, the number of final sampling steps differentiated in one training step.

    "fixed": K = k (DRaFT-K; k = steps: the whole chain). "uniform" and "random" follow the
    official code: draw the first step with gradients t, uniform on [0, N) or t = int(x) with
    x ~ N(0.84 N, 0.1 N) (its N(42, 5) of 50 steps), until 1 <= t < N; K = N - t (1..N-1).
    """
    if truncation == "fixed":
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= steps:
            raise InputError(f"k must be an integer from 0 to the {steps} sampling steps, got {k!r}")
        return k
    if truncation not in TRUNCATIONS:
        raise InputError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if steps < 2:
        raise InputError(f"{truncation} truncation draws K from 1..steps-1: give at least 2 sampling steps")
    while True:
        if truncation == "uniform":
            t = int(torch.randint(0, steps, (1,), generator=generator))
        else:
            x = RANDOM_MEAN * steps + RANDOM_STD * steps * float(torch.randn((), generator=generator))
            t = int(x)  # toward zero, as the official int(Normal(...).sample())
        if 1 <= t < steps:
            return steps - t


# -- the loss ---------------------------------------------------------------------------------
def reward_loss(pipe: Any, reward: Any, prompts: Sequence[str], generators: Sequence[torch.Generator], *,
                steps: int, grad_steps: int | None, guidance: Any = None, sampler: Any = None,
                checkpoint: bool = True, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(loss, rewards [B]) of one batch: sample from each row's noise (its generator's, as
    `flowkit.sample` draws it, or `noise` [B, *latent]) with gradients through the last
    `grad_steps` steps (None: all), decode with `to_pixels`, score; loss = -mean reward."""
    adapter = adapt(pipe)
    rew = build_reward(reward)
    stack = build_guidance(guidance, adapter.default_guidance_scale)
    smp = build_sampler(sampler if sampler is not None else getattr(adapter, "default_sampler", "euler"))
    h, w = adapter.default_size()
    prompts = list(prompts)
    with torch.no_grad():
        conds = adapter.encode_sized(prompts, None, wants_uncond(stack), h, w)
    if noise is None:
        noise = randn_per_sample(adapter.latent_shape(h, w), generators, adapter.device, torch.float32)
    with torch.enable_grad():
        x, _, _ = sample_from_noise(adapter, conds, noise, sampler=smp, stack=stack, steps=steps, grid=None,
                                    height=h, width=w, generators=list(generators), prompts=prompts,
                                    grad_steps=grad_steps, checkpoint=checkpoint)
        r = rew(adapter.to_pixels(x), prompts)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    return -r.mean(), r


def saved_activation_bytes(pipe: Any, reward: Any, prompts: Sequence[str], generators: Sequence[torch.Generator],
                           *, steps: int, grad_steps: int | None, guidance: Any = None, sampler: Any = None,
                           checkpoint: bool = True, adapter_name: str = ADAPTER) -> int:
    """The bytes autograd keeps for the backward pass of one training batch (`reward_loss`,
    only the LoRA trainable, as in `finetune`): the size of every tensor saved for backward
    (torch.autograd.graph.saved_tensors_hooks), shared storage counted once per save."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with _only_trainable(pipe, list(lora_parameters(pipe, adapter_name).values())):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reward_loss(pipe, reward, prompts, generators, steps=steps, grad_steps=grad_steps, guidance=guidance,
                        sampler=sampler, checkpoint=checkpoint)
    return total


def score(pipe: Any, prompts: Sequence[str], rewards: Mapping[str, Any], *, samples: int | None = None,
          seed: int = 0, steps: int = 20, guidance: Any = None, sampler: Any = None,
          batch: int = 16) -> dict[str, Tensor]:
    """Each reward's scores [samples] of the pipeline's images without gradients: sample i has
    prompt i mod len(prompts) and the seed `flowkit.sample(seed=seed)` gives image i."""
    prompts = list(prompts)
    n = len(prompts) if samples is None else int(samples)
    built = {name: build_reward(r) for name, r in rewards.items()}
    out: dict[str, list[Tensor]] = {name: [] for name in built}
    adapter = adapt(pipe)
    stack = build_guidance(guidance, adapter.default_guidance_scale)
    smp = build_sampler(sampler if sampler is not None else getattr(adapter, "default_sampler", "euler"))
    h, w = adapter.default_size()
    with torch.no_grad():
        for lo in range(0, n, batch):
            idx = list(range(lo, min(lo + batch, n)))
            rows = [prompts[i % len(prompts)] for i in idx]
            gens = generators_for(seed, idx)
            conds = adapter.encode_sized(rows, None, wants_uncond(stack), h, w)
            noise = randn_per_sample(adapter.latent_shape(h, w), gens, adapter.device, torch.float32)
            x, _, _ = sample_from_noise(adapter, conds, noise, sampler=smp, stack=stack, steps=steps, grid=None,
                                        height=h, width=w, generators=gens, prompts=rows)
            images = adapter.to_pixels(x)
            for name, r in built.items():
                out[name].append(r(images, rows).detach().float().cpu())
    return {name: torch.cat(v) for name, v in out.items()}


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What `finetune` did. history: one record per optimizer step (step, loss, reward,
    reward_std, K, grad_norm before clipping, seconds); evaluations: one record per checkpoint
    (step, the held-out mean of each reward); lora_dir: the final LoRA (diffusers format) when
    an out_dir was given; checkpoints: the LoRA folder of each checkpoint step."""

    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    lora_dir: Path | None = None
    checkpoints: dict[int, Path] = field(default_factory=dict)

    @property
    def rewards(self) -> list[float]:
        """The training batches' mean rewards, step by step."""
        return [h["reward"] for h in self.history]


def _step_streams(seed: int, step: int, batch: int) -> tuple[np.random.Generator, list[torch.Generator],
                                                               torch.Generator]:
    """The prompt stream, the rows' noise generators and the truncation generator of one
    training step: a pure function of (seed, step), so a resumed run repeats the same steps."""
    rng = np.random.default_rng([seed, step, _STEP_TAG])
    gens = [torch.Generator().manual_seed(int(v)) for v in rng.integers(2**62, size=batch)]
    trunc = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gens, trunc


@contextlib.contextmanager
def _only_trainable(pipe: Any, params: Sequence[Tensor]):
    """Within: no parameter of the pipeline's modules but `params` requires grad (so the graph
    holds nothing for frozen weights); restored after."""
    keep = {id(p) for p in params}
    mods = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, nn.Module)]
    changed = [p for m in mods for p in m.parameters() if p.requires_grad and id(p) not in keep]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _settings_key(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune(
    pipe: Any,
    *,
    reward: Any,
    prompts: Sequence[str],
    held_out: Sequence[str] | None = None,
    eval_rewards: Mapping[str, Any] | None = None,
    steps: int = 200,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    grad_clip: float = 1.0,
    sample_steps: int = 20,
    guidance: Any = None,
    sampler: Any = None,
    truncation: str = "random",
    k: int = 1,
    checkpoint: bool = True,
    rank: int = 4,
    targets: Sequence[str] = TARGET_MODULES,
    adapter_name: str = ADAPTER,
    ckpt_every: int = 50,
    eval_samples: int | None = None,
    eval_seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a LoRA on `pipe`'s network to maximise `reward` (AlignProp / DRaFT-K), in place.

    reward: a registered reward name or spec ("count"), a `flowkit.rewards.Reward` or a
        differentiable function of images [B, 3, H, W] in [-1, 1] (and prompts); prompts: the
        training prompts (each step draws `batch_size` of them with replacement);
    held_out / eval_rewards: prompts scored at step 0 and at every checkpoint (`eval_samples`
        images, default one per prompt, image i seeded as `flowkit.sample(seed=eval_seed)`'s
        image i) with the training reward and each of `eval_rewards` ({name: reward});
    truncation: "fixed" (gradients through the last `k` steps, DRaFT-K), "uniform" or "random"
        (the official randomised truncation, see `truncation_steps`); checkpoint: recompute
        each network call in the backward pass instead of keeping its activations;
    sample_steps / guidance / sampler: how each training image is sampled (guidance None: the
        model's default CFG);
    out_dir: checkpoints every `ckpt_every` steps and at the end (`latest.pt`: LoRA, optimizer,
        step, history; `checkpoints/step-NNNNNN/`: the LoRA in diffusers' format), the final
        LoRA in `lora/` and a JSONL log; a run resumes from `latest.pt` unless resume=False.

    The LoRA (`adapter_name`) stays on the network, active: `flowkit.sample(pipe, ...)` then
    samples the fine-tuned model (`pipe.disable_lora()` or `delete_adapters` to go back).
    """
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("sample_steps", sample_steps, 1),
                             ("ckpt_every", ckpt_every, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("give the training prompts as a non-empty list of strings")
    held = list(held_out or [])
    rew = build_reward(reward)
    if not rew.differentiable:
        raise InputError(f"reward {rew.name!r} is not differentiable: reward backpropagation follows a gradient")
    family = getattr(rew, "family", None)
    adapter = adapt(pipe)
    if family is not None and adapter.family != family:
        raise UnsupportedError(f"reward {rew.name!r} scores {family} images, and this is a {adapter.family} model: "
                               "give a reward of your own (flowkit.rewards.Reward.from_fn)")
    truncation_steps(truncation, sample_steps, torch.Generator(), k)  # checks truncation and k
    label = getattr(rew, "label", None) or rew.name or "reward"  # a function's reward: its own name
    scorers: dict[str, Any] = {label: rew, **dict(eval_rewards or {})}
    guidance_text = build_guidance(guidance, adapter.default_guidance_scale).describe()
    settings = {"reward": repr(rew) if rew.name in ("", "custom") else rew.name, "prompts": prompts,
                "batch_size": batch_size, "sample_steps": sample_steps, "guidance": guidance_text,
                "sampler": str(sampler), "truncation": truncation, "k": k if truncation == "fixed" else None,
                "rank": rank, "targets": list(targets), "seed": seed, "weight_decay": weight_decay,
                "grad_clip": grad_clip, "held_out": held, "eval_rewards": sorted(scorers), "eval_samples": eval_samples,
                "eval_seed": eval_seed}

    params = add_lora(pipe, rank=rank, targets=targets, adapter_name=adapter_name, seed=seed)
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=lr, weight_decay=weight_decay)
    result = FinetuneResult(steps=steps)
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / CHECKPOINT_FILE
        if resume and ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("settings") != _settings_key(settings):
                raise InputError(f"{ckpt} was written by a fine-tune with other settings: give another out_dir, "
                                 "or resume=False to start again")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state["lora"][name])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
            result.history = list(state["history"])
            result.evaluations = list(state["evaluations"])
            log.info("resumed the fine-tune in %s from step %d", out, start)
        for folder in sorted((out / "checkpoints").glob("step-*")):
            if folder.name[5:].isdigit() and 0 < int(folder.name[5:]) <= start:
                result.checkpoints[int(folder.name[5:])] = folder

    def evaluate(step: int) -> None:
        if not held:
            return
        scores = score(pipe, held, scorers, samples=eval_samples, seed=eval_seed, steps=sample_steps,
                       guidance=guidance, sampler=sampler)
        record = {"step": step, **{name: float(v.mean()) for name, v in scores.items()}}
        result.evaluations.append(record)
        log.info("fine-tune step %d, held-out: %s", step, record)

    def save(step: int) -> None:
        if out is None:
            return
        folder = out / "checkpoints" / f"step-{step:06d}"
        save_lora(pipe, folder, adapter_name)
        result.checkpoints[step] = folder
        _atomic_save({"lora": {n: p.detach().cpu().clone() for n, p in params.items()}, "opt": opt.state_dict(),
                      "step": step, "history": result.history, "evaluations": result.evaluations,
                      "settings": _settings_key(settings)}, out / CHECKPOINT_FILE)

    if start == 0 and not result.evaluations:
        evaluate(0)
    bar = None
    if progress and start < steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"fine-tune ({label})", dynamic_ncols=True)
    logf = open(out / "log.jsonl", "a") if out is not None else None
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            rng, gens, trunc = _step_streams(seed, step, batch_size)
            rows = [prompts[i] for i in rng.integers(len(prompts), size=batch_size)]
            K = truncation_steps(truncation, sample_steps, trunc, k)
            with _only_trainable(pipe, plist):
                loss, r = reward_loss(pipe, rew, rows, gens, steps=sample_steps, grad_steps=K, guidance=guidance,
                                      sampler=sampler, checkpoint=checkpoint)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"the loss of fine-tune step {step} is not finite: lower lr, or check the "
                                         "reward on these prompts")
                grads = torch.autograd.grad(loss, plist, allow_unused=True) if loss.requires_grad else \
                    [None] * len(plist)
            for p, g in zip(plist, grads):
                p.grad = torch.zeros_like(p) if g is None else g.to(p.dtype)
            norm = float(nn.utils.clip_grad_norm_(plist, grad_clip) if grad_clip else
                         torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plist])))
            opt.step()
            opt.zero_grad(set_to_none=True)
            r = r.detach().float()
            record = {"step": step, "loss": float(loss.detach()), "reward": float(r.mean()),
                      "reward_std": float(r.std()) if len(r) > 1 else 0.0, "K": K, "grad_norm": norm,
                      "seconds": round(time.perf_counter() - t0, 3)}
            result.history.append(record)
            if logf is not None:
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            if on_step is not None:
                on_step(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.4g}", K=K)
            done = step + 1
            if done % ckpt_every == 0 or done == steps:
                evaluate(done)
                save(done)
    finally:
        if logf is not None:
            logf.close()
        if bar is not None:
            bar.close()
    if out is not None:
        result.lora_dir = save_lora(pipe, out / "lora", adapter_name)
    return result


class _CallableModule(types.ModuleType):
    """`flowkit.finetune` is this module once it has been imported (Python binds a submodule
    to its package's attribute): calling it calls `finetune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(finetune)  # what inspect.signature(flowkit.finetune) shows
