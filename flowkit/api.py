"""The Python sampling API: `flowkit.sample`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowkit import limits as L
from flowkit.adapters.base import adapt
from flowkit.context import Context
from flowkit.denoiser import compile_options
from flowkit.errors import InputError, SpecError
from flowkit.guidance_base import Guidance, GuidanceStack
from flowkit.registry import GUIDANCE, SAMPLERS
from flowkit.sampler_base import Sampler
from flowkit.sampling_loop import Stats, integrate
from flowkit.seeding import generators_for, randn_per_sample, seed_for
from flowkit.timegrid import Schedule, TimeGrid

__all__ = ["sample", "SampleOutput", "build_sampler", "build_guidance", "run_context", "sample_from_noise",
           "wants_uncond", "with_reward"]


@dataclass
class SampleOutput:
    """images: PIL images (or per output_type); latents: final states before decoding
    (pre-clamp); stats: NFE, seconds, per-step records; seeds: each image's seed."""

    images: Any
    latents: Tensor
    stats: Stats
    seeds: list[int]
    prompts: list[str]


def build_sampler(sampler: str | Sampler) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    if not isinstance(sampler, str):
        raise SpecError(f"sampler must be a name, a spec string or a Sampler, got {type(sampler).__name__}")
    from flowkit.spec import build

    built = build(SAMPLERS, sampler)
    if len(built) != 1:
        raise SpecError(f"give exactly one sampler, got {len(built)} in {sampler!r}")
    return built[0]


def with_reward(sampler: Sampler, reward: Any) -> Sampler:
    """`sampler` scoring with `reward` (a registered name or spec, a Reward, or a function of
    images), for the samplers that take one (`with_reward`: rbf, bon, smc); None: unchanged."""
    if reward is None:
        return sampler
    if not callable(getattr(sampler, "with_reward", None)):
        takers = ", ".join(n for n, cls in SAMPLERS.items() if callable(getattr(cls, "with_reward", None)))
        raise InputError(f"sampler {sampler.name!r} takes no reward; reward= goes to a sampler that scores one "
                         f"({takers})")
    return sampler.with_reward(reward)


def build_guidance(guidance: Any, default_scale: float) -> GuidanceStack:
    """None: CFG at the model's default scale; '' / 'none' / []: no guidance."""
    if isinstance(guidance, GuidanceStack):
        return guidance
    if guidance is None:
        from flowkit.guidance.cfg import CFG

        return GuidanceStack([CFG(scale=default_scale)])
    if isinstance(guidance, str) and guidance.strip().lower() in ("", "none"):
        return GuidanceStack([])
    if isinstance(guidance, Guidance):
        guidance = [guidance]
    from flowkit.spec import build

    return GuidanceStack(build(GUIDANCE, guidance))


def sample(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    sampler: str | Sampler | None = None,
    steps: int = 30,
    guidance: Any = None,
    seed: int = 0,
    negative_prompt: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    length: int | None = None,
    grid: str | TimeGrid | None = None,
    num_images_per_prompt: int = 1,
    generators: Sequence[torch.Generator] | None = None,
    start_index: int = 0,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = False,
    grad: bool = False,
    grad_steps: int | None = None,
    checkpoint: bool = False,
    check_every: int = 4,
    attention: str | None = None,
    reward: Any = None,
    compile: bool | str | dict = False,
) -> SampleOutput:
    """Sample images for `prompts` with a registered sampler and a guidance stack.

    Image i (prompt-major, then images per prompt) is seeded with `seed_for(seed,
    start_index + i)` on its own CPU generator unless `generators` (one per image) is given.
    `sampler=None` takes the model's default (euler for image models); `length` is the
    sequence length of a sequence model (the same as height=1, width=length).
    `attention`: the attention kernel of this run (see flowkit.attention; None: the active one).
    `reward`: the reward of a sampler that scores one (rbf, bon, smc; see `with_reward`).
    `compile`: run the network under `torch.compile(..., fullgraph=True)` (True; a mode name
    such as "max-autotune"; or a dict of torch.compile keywords); the compiled network is kept
    for later calls, and `stats.compile_seconds` is the first call's compile time. A network
    the pipeline already holds compiled runs as it is.

    Gradients: `grad=True` keeps the autograd graph through the whole run (the latents and
    images can be differentiated, e.g. with respect to LoRA weights); `grad_steps=K` keeps it
    through the last K steps only, the earlier ones run without it (DRaFT-K; K = 0: none);
    `checkpoint=True` recomputes each network call's activations in the backward pass instead
    of keeping them (the same gradients, less memory; the recomputation is not an NFE).
    """
    adapter = adapt(pipe)
    if grad_steps is not None:
        if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or grad_steps < 0:
            raise InputError(f"grad_steps must be an integer >= 0 (the last steps kept in the graph), got "
                             f"{grad_steps!r}")
        grad = True
    if attention is not None:
        from flowkit.attention import check_kernel

        check_kernel(attention)
    compile_options(compile)
    # every argument checked before any work, against the limits of every surface (flowkit.limits)
    prompt_list = L.check_texts("prompts", prompts)
    L.check_int("steps", steps, 1, L.MAX_STEPS)
    L.check_int("seed", seed, 0, L.MAX_SEED)
    L.check_int("num_images_per_prompt", num_images_per_prompt, 1, L.MAX_IMAGES)
    L.check_int("start_index", start_index, 0, L.MAX_SEED)
    L.check_optional_int("height", height, 1, L.MAX_SIZE)
    L.check_optional_int("width", width, 1, L.MAX_SIZE)
    L.check_optional_int("length", length, 1, L.MAX_SIZE)
    if len(prompt_list) * num_images_per_prompt > L.MAX_IMAGES:
        raise InputError(f"{len(prompt_list)} prompts x {num_images_per_prompt} images per prompt is more than "
                         f"{L.MAX_IMAGES} images in one call: split the call")
    generators = L.check_generators(generators)
    prompt_list = [p for p in prompt_list for _ in range(num_images_per_prompt)]
    n = len(prompt_list)
    if negative_prompt is None:
        negatives = None
    else:
        negs = L.check_texts("negative_prompt", negative_prompt)
        if len(negs) == 1:
            negs = negs * (n // num_images_per_prompt)
        if len(negs) * num_images_per_prompt != n:
            raise InputError(f"{len(negs)} negative prompts for {n // num_images_per_prompt} prompts: "
                             "give one, or one per prompt")
        negatives = [q for q in negs for _ in range(num_images_per_prompt)]
    if generators is not None:
        generators = list(generators)
        if len(generators) != n:
            raise InputError(f"{len(generators)} generators for {n} images: give one generator per image")
        seeds = [int(g.initial_seed()) for g in generators]
    else:
        seeds = [seed_for(seed, start_index + i) for i in range(n)]
        generators = generators_for(seed, range(start_index, start_index + n))

    if length is not None:
        if height is not None or width is not None:
            raise InputError("give length (sequence models) or height and width, not both")
        height, width = 1, length
    h, w = adapter.default_size() if height is None and width is None else (height, width)
    if h is None or w is None:
        raise InputError("give both height and width, or neither")
    shape = adapter.latent_shape(h, w)
    smp = with_reward(build_sampler(sampler if sampler is not None else getattr(adapter, "default_sampler", "euler")),
                      reward)
    stack = build_guidance(guidance, adapter.default_guidance_scale)
    need_uncond = wants_uncond(stack)
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with grad_ctx:
        conds = adapter.encode_sized(prompt_list, negatives, need_uncond, h, w)
        noise = randn_per_sample(shape, generators, adapter.device, torch.float32)
        x, stats, _ = sample_from_noise(adapter, conds, noise, sampler=smp, stack=stack, steps=steps,
                                        grid=TimeGrid.parse(grid) if grid is not None else None, height=h, width=w,
                                        generators=generators, callback=callback, check_every=check_every,
                                        progress=progress, attention=attention, prompts=prompt_list,
                                        grad_steps=grad_steps, checkpoint=bool(checkpoint), compile=compile)
        images = adapter.decode(x, output_type)
    return SampleOutput(images=images, latents=x, stats=stats, seeds=seeds, prompts=prompt_list)


def wants_uncond(stack: GuidanceStack) -> bool:
    """Whether a stack may ask for the 'uncond' branch (so the prompts' negatives are encoded)."""
    return any(m.needs_uncond for m in stack)


def run_context(adapter: Any, conds: dict, *, sampler: Sampler, stack: GuidanceStack, steps: int,
                grid: TimeGrid | None, height: int, width: int, generators: Sequence[torch.Generator],
                sigmas: Sequence[float] | None = None, mu: float | None = None, step_generator: Any = None,
                prompts: Sequence[str] | None = None) -> tuple[Context, Schedule]:
    """The context and schedule of a run, checked: UnsupportedError if the sampler or a
    guidance module refuses this model (its `refuse` reason), before any work.

    The grid is the sampler's own, else `grid`, else the adapter's default. On the pipeline
    scheduler's grid the run starts as the scheduler starts (`init_noise_sigma`), feeds the
    network the scheduler's own timesteps, and carries the scheduler for sampler='pipeline'
    (which needs that grid). `sigmas` / `mu`: a pipeline call's own, passed to its scheduler;
    `step_generator`: what sampler='pipeline' hands a stochastic scheduler's step (a call's
    generator or list of them; default: the first sample's generator); `prompts`: each
    row's prompt text where known (what world-aware methods read, `ctx.prompts`); what the
    model's world hands methods is `ctx.kit`.
    """
    from flowkit.errors import UnsupportedError

    explicit = sampler.time_grid(grid) if (grid is not None or sampler.grid) else None
    if sigmas is not None or mu is not None or sampler.uses_scheduler:
        if explicit is not None and explicit.kind != "scheduler":
            what = "sampler 'pipeline' steps on the pipeline scheduler's own timesteps" if sampler.uses_scheduler \
                else "sigmas= and mu= go to the pipeline's scheduler"
            raise UnsupportedError(f"{what}; drop the flowkit grid {explicit.describe()!r}")
        time_grid = adapter.scheduler_grid(sigmas=sigmas, mu=mu) if (sigmas is not None or mu is not None) \
            else (explicit or adapter.scheduler_grid())
        if time_grid is None:
            reason = sampler.refuse(Context(adapter.denoiser, stack, conds, list(generators), steps))
            raise UnsupportedError(reason or f"{type(getattr(adapter, 'pipe', adapter)).__name__} has no scheduler "
                                   "to take sigmas or mu")
    else:
        time_grid = explicit or adapter.default_grid()
    den = adapter.denoiser
    plan = time_grid.schedule(steps, den.path, image_seq_len=adapter.image_seq_len(height, width),
                              strict=not sampler.uses_scheduler)
    try:
        model_grid = adapter.default_grid()
    except UnsupportedError:  # a pipeline without a scheduler: its shift rule is unknown
        model_grid = None
    ctx = Context(den, stack, conds, list(generators), plan.steps, device=adapter.device, encode=adapter.encoder(),
                  scheduler=plan.scheduler, noise_scale=plan.noise_scale, kit=adapter.kit(),
                  prompts=None if prompts is None else list(prompts), step_generator=step_generator,
                  model_grid=model_grid)
    ctx.grid = plan.ts
    reason = sampler.refuse(ctx)
    if reason:
        raise UnsupportedError(reason)
    stack.check(ctx)
    return ctx, plan


def sample_from_noise(adapter: Any, conds: dict, noise: Tensor, *, sampler: Sampler, stack: GuidanceStack,
                      steps: int, grid: TimeGrid | None, height: int, width: int,
                      generators: Sequence[torch.Generator], callback: Callable | None = None, check_every: int = 4,
                      progress: bool = False, sigmas: Sequence[float] | None = None, mu: float | None = None,
                      step_generator: Any = None, attention: str | None = None,
                      prompts: Sequence[str] | None = None, grad_steps: int | None = None,
                      checkpoint: bool = False, compile: Any = False) -> tuple[Tensor, Stats, Context]:
    """Sample from unit `noise` [B, *latent] with an adapter's denoiser; the run both surfaces
    (`flowkit.sample`, `FlowKitPipeline`) share. The run is set up by `run_context` (see it for
    the grid, sigmas, mu, step_generator and prompts); `attention`: the run's attention kernel
    (None: the active one), its attention-map store is `ctx.attention`; `grad_steps`,
    `checkpoint` and `compile`: see `flowkit.sample`. Returns (final flow-frame state, stats,
    context).
    """
    ctx, plan = run_context(adapter, conds, sampler=sampler, stack=stack, steps=steps, grid=grid, height=height,
                            width=width, generators=generators, sigmas=sigmas, mu=mu, step_generator=step_generator,
                            prompts=prompts)
    den = adapter.denoiser
    den.pin_timesteps(plan.ts[:-1] if plan.timesteps is not None else None, plan.timesteps)
    from flowkit.attention import checkpoint_contexts, session

    options = compile_options(compile)
    if options is not None and not hasattr(den, "compiled"):
        from flowkit.errors import UnsupportedError

        raise UnsupportedError(f"compile=: {type(den).__name__} runs no torch network to compile; leave compile off")
    compiled = den.compiled(options) if options is not None else contextlib.nullcontext()
    try:
        with compiled:
            network = getattr(den, "network", None)
            with session(network, attention) as ctx.attention:
                den.checkpoint = checkpoint_contexts(network, ctx.attention) if checkpoint else None
                x, stats = integrate(sampler, ctx, noise, plan.ts, callback=callback, check_every=check_every,
                                     progress=progress, grad_steps=grad_steps)
        stats.attention = dict(ctx.attention.counts)
    finally:
        den.pin_timesteps(None, None)
        den.checkpoint = None
    return x, stats, ctx
