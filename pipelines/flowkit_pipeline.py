"""`FlowKitPipeline`: the drop-in wrapper around a diffusers text-to-image pipeline.

A thin wrapper, not a second pipeline: attributes it does not own (components, config,
`enable_model_cpu_offload`, `scheduler`, ...) are the wrapped pipeline's, `to()` moves the
wrapped pipeline, and a call takes the wrapped `__call__`'s own keywords, validated
against its signature (a misspelt keyword fails and names the closest one). The call
encodes prompts with the pipeline's `encode_prompt`, draws the starting latents with
`randn_tensor` exactly as the pipeline does (one generator for the batch, or a list of one
per image), runs flowkit's sampler and guidance stack on the pipeline scheduler's grid,
decodes with the pipeline's VAE and returns the pipeline's own output class. `.stats`
keeps the last call's `Stats` (NFE, seconds, per-step records). `compile=True` runs the
network under `torch.compile(..., fullgraph=True)` (kept for later calls; `stats.compile_seconds`
is the first call's compile time); a network the pipeline holds compiled runs as it is.

With `guidance=None` a call behaves like the wrapped pipeline: classifier-free guidance at
the call's `guidance_scale` (above 1), or on FLUX no CFG unless `true_cfg_scale > 1` with
a negative prompt (`guidance_scale` stays FLUX's distilled-guidance embedding). With a
stack, an explicit `guidance_scale` (FLUX: `true_cfg_scale`) sets its combiner's scale.

Keywords of the wrapped pipeline that flowkit does not take are refused, unless they keep
their default value, with the flowkit way to get the same (see `REFUSED`). Differences
from diffusers: FLUX sizes must be multiples of the packing factor (diffusers rounds
down); callbacks see `prompt_embeds` / `negative_prompt_embeds` per branch (diffusers
passes the concatenated CFG batch) and may replace `latents`; as in diffusers, a callback
may also change `pipe._guidance_scale` (diffusers' `SDCFGCutoffCallback`,
`SDXLCFGCutoffCallback` and `SD3CFGCutoffCallback` set it to 0 to stop CFG): at 1 or below
guidance is off from the next step (conditional only), above 1 the combiner takes the new
scale. Conditioning tensors a callback returns unchanged, or cut to their last rows (the
cut-off callbacks keep the conditional rows), are accepted; other changes are refused.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from flowkit.guidance.cfg import CFG

from flowkit.adapters.base import adapt
from flowkit.api import build_guidance, build_sampler, sample_from_noise, wants_uncond, with_reward
from flowkit.denoiser import compile_options
from flowkit.errors import InputError, UnsupportedError, clip, closest
from flowkit.limits import MAX_IMAGES, MAX_SIZE, MAX_STEPS, check_int, check_optional_int, check_texts, kind
from flowkit.guidance_base import GuidanceStack
from flowkit.sampler_base import Sampler

__all__ = ["FlowKitPipeline", "REFUSED"]

# keyword -> how to get the same with flowkit (refused unless left at the pipeline's default)
REFUSED = {
    "timesteps": "give sigmas=..., or a flowkit grid: FlowKitPipeline.from_pipe(pipe, sampler='euler:grid=\"sigmas:0.9;0.5;0.2\"')",
    "eta": "use flowkit's DDIM: FlowKitPipeline.from_pipe(pipe, sampler='ddim:eta=...')",
    "ip_adapter_image": "IP-Adapter is not supported; flowkit's drop-in is text-to-image (prompts and embeddings)",
    "ip_adapter_image_embeds": "IP-Adapter is not supported; flowkit's drop-in is text-to-image",
    "negative_ip_adapter_image": "IP-Adapter is not supported; flowkit's drop-in is text-to-image",
    "negative_ip_adapter_image_embeds": "IP-Adapter is not supported; flowkit's drop-in is text-to-image",
    "denoising_end": "refiner hand-off is not supported; flowkit samples to the end (use the diffusers "
                     "pipeline itself for an ensemble of expert denoisers)",
    "callback": "use callback_on_step_end",
    "callback_steps": "use callback_on_step_end",
}
_OWN = ("pipe", "sampler", "guidance", "stats", "attention", "compile")
# callback tensor name -> (branch, conditioning fields to try)
_CALLBACK_TENSORS = {
    "prompt_embeds": ("cond", ("encoder_hidden_states",)),
    "negative_prompt_embeds": ("uncond", ("encoder_hidden_states",)),
    "pooled_prompt_embeds": ("cond", ("pooled_projections", "text_embeds")),
    "negative_pooled_prompt_embeds": ("uncond", ("pooled_projections", "text_embeds")),
    "add_text_embeds": ("cond", ("text_embeds",)),
    "add_time_ids": ("cond", ("time_ids",)),
    "negative_add_time_ids": ("uncond", ("time_ids",)),
}


class FlowKitPipeline:
    """A diffusers pipeline sampled by flowkit (see the module docstring)."""

    def __init__(self, pipe: Any, sampler: str | Sampler = "euler", guidance: Any = None,
                 attention: str | None = None, reward: Any = None, compile: bool | str | dict = False):
        adapt(pipe)  # refuses unsupported pipelines now, naming the supported ones
        compile_options(compile)  # a bad option fails here
        object.__setattr__(self, "compile", compile)
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "sampler", with_reward(build_sampler(sampler), reward))
        if guidance is not None:
            build_guidance(guidance, 1.0)  # a bad spec fails here, not at the first call
        object.__setattr__(self, "guidance", guidance)
        object.__setattr__(self, "stats", None)
        object.__setattr__(self, "attention", None)
        self.set_attention_kernel(attention)

    @classmethod
    def from_pipe(cls, pipe: Any, sampler: str | Sampler = "euler", guidance: Any = None,
                  attention: str | None = None, reward: Any = None,
                  compile: bool | str | dict = False) -> "FlowKitPipeline":
        """Wrap `pipe` (StableDiffusion, StableDiffusionXL, StableDiffusion3 or Flux pipeline);
        `attention`: the attention kernel of its calls (see flowkit.attention; None: the active one);
        `reward`: the reward of a sampler that scores one (sampler="rbf:budget=300", bon, smc);
        `compile`: run its network compiled (see flowkit.sample)."""
        return cls(pipe, sampler=sampler, guidance=guidance, attention=attention, reward=reward, compile=compile)

    def set_attention_kernel(self, kernel: str | None) -> None:
        """The attention kernel of this wrapper's calls ("sdpa", "sdpa-math", "reference", ...; None: the active one)."""
        if kernel is not None:
            from flowkit.attention import check_kernel

            check_kernel(kernel)
        object.__setattr__(self, "attention", kernel)

    # -- the wrapped pipeline's surface ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _OWN:
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.pipe)))

    def __repr__(self) -> str:
        return f"FlowKitPipeline({type(self.pipe).__name__}, sampler={self.sampler.describe()!r})"

    def to(self, *args: Any, **kwargs: Any) -> "FlowKitPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    # -- the call -------------------------------------------------------------------------
    def _keywords(self, args: tuple, kwargs: dict) -> tuple[dict, set]:
        """The call's keywords with the wrapped signature's defaults; and the names given."""
        pipe = self.pipe
        sig = inspect.signature(pipe.__call__)
        params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        names = list(params)
        if len(args) > len(names):
            raise InputError(f"{type(pipe).__name__} takes at most {len(names)} positional arguments, got {len(args)}")
        given = dict(kwargs)
        for name, value in zip(names, args):
            if name in given:
                raise InputError(f"{name!r} given both by position and by keyword")
            given[name] = value
        for name in given:
            if name in REFUSED and name not in params:
                raise UnsupportedError(f"{name} is not supported: {REFUSED[name]}")
            if name not in params:
                raise InputError(f"{type(pipe).__name__} takes no keyword {name!r}{closest(name, names)}")
        for name, value in given.items():
            if name in REFUSED and not _is_default(value, params[name].default):
                raise UnsupportedError(f"{name} is not supported by FlowKitPipeline: {REFUSED[name]}")
        kw = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        kw.update(given)
        return kw, set(given)

    def _stack(self, kw: dict, given: set, family: str) -> GuidanceStack:
        scale_name = "true_cfg_scale" if family == "flux" else "guidance_scale"
        if self.guidance is None:
            if family == "flux":
                has_neg = kw.get("negative_prompt") is not None or (
                    kw.get("negative_prompt_embeds") is not None and kw.get("negative_pooled_prompt_embeds") is not None)
                scale = float(kw.get("true_cfg_scale", 1.0))
                return GuidanceStack([CFG(scale=scale)] if scale > 1 and has_neg else [])
            scale = float(kw.get("guidance_scale", 1.0))
            rescale = float(kw.get("guidance_rescale", 0.0) or 0.0)
            if kw.get("skip_guidance_layers") is not None and scale > 1:
                return GuidanceStack([_skip_layer_guidance(kw, scale)])
            return GuidanceStack([CFG(scale=scale, guidance_rescale=rescale)] if scale > 1 else [])
        if kw.get("skip_guidance_layers") is not None:
            raise UnsupportedError("skip_guidance_layers builds the call's own guidance; with a flowkit stack, put "
                                   "skip-layer guidance in it: DiffusersGuider(SkipLayerGuidance(...))")
        if "guidance_rescale" in given and kw["guidance_rescale"]:
            raise UnsupportedError("guidance_rescale goes on the combiner of your stack: CFG(scale=..., guidance_rescale=...)")
        stack = build_guidance(self.guidance, 1.0)
        if scale_name in given and stack.combiner is not None and hasattr(stack.combiner, "scale"):
            stack = _combiner_at(stack, float(kw[scale_name]))
        return stack

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Generate as the wrapped pipeline's `__call__` would, sampled by flowkit."""
        kw, given = self._keywords(args, kwargs)
        pipe = self.pipe
        adapter = adapt(pipe)
        _check_call(kw)  # the wrapped pipeline's own checks, as errors that say what to change
        h0, w0 = adapter.default_size()
        h, w = kw.get("height") or h0, kw.get("width") or w0
        kw["height"], kw["width"] = h, w
        adapter.latent_shape(h, w)  # flowkit's size rules first (FLUX: no silent resize)
        n_per = 1 if kw.get("num_images_per_prompt") is None else kw["num_images_per_prompt"]
        adapter.check_call(kw)
        stack = self._stack(kw, given, adapter.family)
        need_uncond = wants_uncond(stack)
        attention = kw.get(adapter.attention_kwargs_name)
        adapter.set_attention_kwargs(attention)
        conds = adapter.encode_call(kw, need_uncond, n_per)
        batch = len(conds["cond"])
        generator = kw.get("generator")
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise InputError(f"{len(generator)} generators for {batch} images ({batch // n_per} prompts x {n_per} "
                             "images per prompt): give one generator, or a list of one per image")
        latents = kw.get("latents")
        if latents is not None:
            noise = adapter.noise_from_latents(latents.to(adapter.device), h, w).float()
        else:
            dtype = conds["cond"]["encoder_hidden_states"].dtype
            noise = adapter.draw_noise(batch, h, w, generator, dtype).float()
        callback = None
        if kw.get("callback_on_step_end") is not None:
            callback = self._callback(kw, adapter)
        x, stats, ctx = sample_from_noise(
            adapter, conds, noise, sampler=self.sampler, stack=stack, steps=kw.get("num_inference_steps") or 1,
            grid=None, height=h, width=w, generators=_per_sample_generators(generator, batch),
            callback=callback, sigmas=kw.get("sigmas"), mu=kw.get("mu"),
            step_generator=generator, attention=self.attention, prompts=_row_prompts(kw, n_per, batch),
            compile=self.compile)
        object.__setattr__(self, "stats", stats)
        out = adapter.output(x, kw.get("output_type") or "pil", bool(kw.get("return_dict", True)), generator)
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()
        return out

    def _callback(self, kw: dict, adapter: Any):
        """flowkit's step callback calling the user's `callback_on_step_end(pipe, i, t, tensors)`."""
        from flowkit.paths.linear import LinearPath
        from flowkit.schedulers import scheduler_frame

        user = kw["callback_on_step_end"]
        names = list(getattr(user, "tensor_inputs", None) or kw.get("callback_on_step_end_tensor_inputs") or [])
        frames: dict[str, str] = {}

        def fn(ctx, step, x, pred):
            if "frame" not in frames:
                frames["frame"] = scheduler_frame(ctx.scheduler) if ctx.scheduler is not None else (
                    "flow" if isinstance(ctx.denoiser.path, LinearPath) else "vp")
            frame = frames["frame"]
            t_next = float(ctx.grid[step + 1])
            latents = adapter.to_pipeline_latents(x, t_next, frame).to(adapter.dtype)
            tensors = {}
            for name in names:
                if name == "latents":
                    tensors[name] = latents
                    continue
                if name not in _CALLBACK_TENSORS:
                    raise UnsupportedError(f"callback tensor {name!r} is not available through flowkit; "
                                           f"available: latents, {', '.join(_CALLBACK_TENSORS)}")
                branch, fields = _CALLBACK_TENSORS[name]
                cond = ctx.conds.get(branch)
                found = [cond.get(f) for f in fields if cond is not None and cond.get(f) is not None]
                tensors[name] = found[0] if found else None
            timestep = ctx.denoiser.point(ctx.t.cpu()).timestep[0].to(torch.float32)
            pipe = self.pipe
            pipe._num_timesteps = ctx.num_steps  # read by callbacks (pipeline.num_timesteps), as diffusers sets it
            scale = None
            if adapter.family != "flux":  # FLUX's _guidance_scale is its distilled-guidance embedding, not CFG
                scale = _stack_scale(ctx.stack)
                pipe._guidance_scale = scale
            outputs = user(pipe, step, timestep, tensors) or {}
            if not isinstance(outputs, dict):
                raise InputError(f"callback_on_step_end must return a dict of tensors (or None), got {kind(outputs)}")
            for name, value in outputs.items():
                if name != "latents" and not _unchanged(value, tensors.get(name)):
                    raise UnsupportedError(f"the callback changed {name!r}; FlowKitPipeline takes new latents and "
                                           "pipe._guidance_scale from callbacks, not new conditioning")
            if scale is not None and getattr(pipe, "_guidance_scale", scale) != scale:
                ctx.stack = _with_scale(ctx.stack, float(pipe._guidance_scale))
            new = outputs.get("latents", latents)
            if new is latents:
                return None
            if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
                got = f"a tensor of shape {tuple(new.shape)}" if isinstance(new, torch.Tensor) else kind(new)
                raise InputError(f"the callback returned latents as {got}: return a tensor of shape "
                                 f"{tuple(latents.shape)}, as it was given")
            return adapter.from_pipeline_latents(new.to(device=x.device, dtype=x.dtype), x, t_next, frame)

        return fn


def _check_call(kw: dict) -> None:
    """What the wrapped pipeline's own checks refuse, refused here with a flowkit InputError
    (no silent correction: 0 steps is not 1 step): prompts, steps, images per prompt,
    generators, guidance scales; sizes and steps (sigmas included) within flowkit's limits,
    as `flowkit.sample` checks them."""
    if kw.get("prompt_embeds") is None:
        check_texts("prompt", kw.get("prompt"))
    for name in ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
        if kw.get(name) is not None:
            check_texts(name, kw[name])
    for name in ("height", "width"):  # None: the pipeline's default size
        check_optional_int(name, kw.get(name), 1, MAX_SIZE)
    steps = kw.get("num_inference_steps")
    if steps is not None or kw.get("sigmas") is None:  # user sigmas may set the number of steps (diffusers)
        check_int("num_inference_steps", steps, 1, MAX_STEPS)
    sigmas = kw.get("sigmas")
    if sigmas is not None:  # one value a step: the step limit bounds them too
        try:  # no len(): a number, a 0-d tensor or array; text has one but is no list
            count = None if isinstance(sigmas, (str, bytes)) else len(sigmas)
        except TypeError:
            count = None
        if count is None:
            raise InputError(f"sigmas must be a list of numbers, one per step, got {kind(sigmas)}")
        check_int("the number of sigmas", count, 1, MAX_STEPS)
    if kw.get("num_images_per_prompt") is not None:
        check_int("num_images_per_prompt", kw["num_images_per_prompt"], 1, MAX_IMAGES)
    generator = kw.get("generator")
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        bad = next(g for g in gens if not isinstance(g, torch.Generator))
        raise InputError(f"generator must be a torch.Generator or a list of them (one per image), got {kind(bad)}: "
                         "e.g. generator=torch.Generator().manual_seed(0)")
    for name in ("guidance_scale", "true_cfg_scale"):
        value = kw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise InputError(f"{name} must be a finite number, got {clip(repr(value))}")


def _skip_layer_guidance(kw: dict, scale: float) -> Any:
    """The SD3 pipeline's `skip_guidance_layers` as diffusers' SkipLayerGuidance run by flowkit:
    CFG at `scale` plus skip_layer_guidance_scale * (cond - cond with those blocks skipped), at
    the steps the pipeline skips them (N * start < i < N * stop; the guider counts
    int(start * N) < i < int(stop * N), so its stop is rounded up to the pipeline's)."""
    import math

    from diffusers.guiders import SkipLayerGuidance
    from flowkit.guidance.diffusers_guider import DiffusersGuider

    n = int(kw.get("num_inference_steps") or 1)
    start, stop = float(kw.get("skip_layer_guidance_start", 0.01)), float(kw.get("skip_layer_guidance_stop", 0.2))
    last = math.ceil(n * stop)  # the pipeline's steps i < n * stop are those i < ceil(n * stop)
    guider_stop = 1.0 if last >= n else min(1.0, (last + 0.5) / n)
    layers = kw["skip_guidance_layers"]
    return DiffusersGuider(SkipLayerGuidance(
        guidance_scale=scale, skip_layer_guidance_scale=float(kw.get("skip_layer_guidance_scale", 2.8)),
        skip_layer_guidance_start=start, skip_layer_guidance_stop=max(guider_stop, start),
        skip_layer_guidance_layers=[int(i) for i in (layers if isinstance(layers, (list, tuple)) else [layers])]))


def _stack_scale(stack: GuidanceStack) -> float:
    """The CFG scale a diffusers pipeline would hold for this stack (1.0: no guidance)."""
    if stack.combiner is None:
        return 1.0
    return float(getattr(stack.combiner, "scale", 1.0))


def _with_scale(stack: GuidanceStack, scale: float) -> GuidanceStack:
    """The stack after a callback set the pipeline's guidance scale: none at <= 1 (as
    diffusers' `do_classifier_free_guidance`), else its combiner at the new scale."""
    if scale <= 1.0:
        return GuidanceStack([])
    if stack.combiner is None or not hasattr(stack.combiner, "scale"):
        raise UnsupportedError(f"the callback set the guidance scale to {scale:g}, but this run's guidance "
                               "stack has no combiner with a scale")
    return _combiner_at(stack, scale)


def _combiner_at(stack: GuidanceStack, scale: float) -> GuidanceStack:
    """The stack with a copy of its combiner at `scale` (the caller's modules are not changed)."""
    combiner = copy.copy(stack.combiner)
    combiner.scale = scale
    return GuidanceStack([combiner if m is stack.combiner else m for m in stack])


def _unchanged(new: Any, passed: Any) -> bool:
    """Whether a tensor a callback returned is the one it was given, or its last rows."""
    if new is passed:
        return True
    if not isinstance(new, torch.Tensor) or not isinstance(passed, torch.Tensor):
        return False
    if new.dim() != passed.dim() or new.shape[1:] != passed.shape[1:] or not 0 < len(new) <= len(passed):
        return False
    return bool(torch.equal(new.to(passed.device, passed.dtype), passed[len(passed) - len(new):]))


def _is_default(value: Any, default: Any) -> bool:
    if value is None:
        return default is None or default is inspect.Parameter.empty
    try:
        return bool(value == default)
    except Exception:  # tensors, images
        return False


def _per_sample_generators(generator: Any, batch: int) -> list[torch.Generator]:
    """One CPU generator per image for flowkit's own noise (stochastic samplers, particles),
    drawn from the call's generator(s); from torch's global RNG when there is none, as diffusers."""
    def cpu(g: torch.Generator) -> torch.Generator:
        if g.device.type == "cpu":
            return g
        seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
        return torch.Generator("cpu").manual_seed(seed)

    if generator is None:
        return [torch.Generator("cpu").manual_seed(int(torch.randint(0, 2**62, (1,)))) for _ in range(batch)]
    if isinstance(generator, (list, tuple)):
        return [cpu(g) for g in generator]
    g = cpu(generator)
    return [g] * batch


def _row_prompts(kw: dict, per_prompt: int, batch: int) -> list[str] | None:
    """Each image's prompt text, where the call gave prompts (not prompt_embeds)."""
    prompt = kw.get("prompt") if kw.get("prompt_embeds") is None else None
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        return None
    rows = [t for t in texts for _ in range(per_prompt)]
    return rows if len(rows) == batch else None
