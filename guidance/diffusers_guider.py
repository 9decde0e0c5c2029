"""diffusers' guiders as flowkit combiners, and flowkit combiners as diffusers guiders
(the guiders of `diffusers.guiders`, diffusers >= 0.35: CFG, CFG-Zero*, APG, APG-mix,
AutoGuidance, FDG, MG, PAG, SLG, SEG, TCFG, LTX-2; each cites its paper in its docstring).

`DiffusersGuider(guider)` (spec `diffusers:name=PerturbedAttentionGuidance,guidance_scale=5,
perturbed_guidance_scale=3,...`) runs any `diffusers.guiders.BaseGuidance` (a user's
subclass too) in a flowkit stack, with any sampler:

- each step it lets the guider's own state follow the run (`set_state(step, number of
  steps, timestep)`) and asks it which conditions it wants (`prepare_inputs`, as a modular
  pipeline does, once per step): the guider's `num_conditions` and their names
  (`pred_cond`, `pred_uncond`, `pred_cond_skip`, ...); its `start`/`stop` windows and
  `enabled` are the guider's own, so it asks for fewer conditions outside them;
- it declares one flowkit branch per condition: `cond` and `uncond` for the plain ones,
  and a *perturbed* branch for a condition the guider evaluates on a perturbed network
  (PAG, SLG: `cond_skip`; SEG: `cond_seg`; AutoGuidance: `uncond_perturbed`), which the
  sampling loop runs in a forward of its own on flowkit's attention processors (identity
  attention, blurred queries, skipped blocks: flowkit.perturbation), charged per branch;
- it calls the guider's own `forward` on flowkit's branch predictions, on the model's
  raw output (noise or velocity, as diffusers' pipelines do).

The guider's layers are named as diffusers names them: a `LayerSkipConfig` /
`SmoothedEnergyGuidanceConfig` selects blocks `fqn.index` of the network (in a spec, give
such a config as JSON text: `perturbed_guidance_config='{"indices": [0], "fqn":
"mid_block.attentions.0.transformer_blocks"}'`). `fqn="auto"` takes the first of
transformer_blocks, blocks, layers, single_transformer_blocks, ... that the network has
(diffusers' own order is a set's; a UNet has none of these: name its fqn).

What flowkit refuses, with the reason: a LayerSkipConfig that skips only the attention
output or only the feed-forward, or drops with a probability below 1 (diffusers draws that
dropout from torch's global generator, so an image would depend on its batch partners);
LTX-2's `pred_cond_stg` / `pred_cond_modality` conditions (its audio-video model's
inputs, which no flowkit family has: use stg_scale=0, modality_scale=1); a guider of
unknown class that changes the model in `prepare_models`. MagnitudeAwareGuidance gets image
predictions flattened to [B, C, H*W] (its norm over three dimensions fails in torch; the
norms, and so the result, are those it means).

The guider's state per run is a copy of it kept in the run's context (so one module serves
many runs); a momentum buffer's running average follows particle resampling and snapshots.

`as_diffusers_guider(module)` is the other direction: a flowkit combiner that works on the
model output (CFG; APG with space="model_output") as a diffusers guider for modular pipelines.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from flowkit.errors import SpecError
from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.perturbation import Perturbation
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE
from flowkit.spec import Param

__all__ = ["DiffusersGuider", "as_diffusers_guider", "GUIDERS", "guider_class", "layer_perturbation"]

# the twelve guiders of diffusers 0.42 (`diffusers.guiders`)
GUIDERS = ("ClassifierFreeGuidance", "ClassifierFreeZeroStarGuidance", "AdaptiveProjectedGuidance",
           "AdaptiveProjectedMixGuidance", "AutoGuidance", "FrequencyDecoupledGuidance", "MagnitudeAwareGuidance",
           "PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance",
           "TangentialClassifierFreeGuidance", "LTX2Guidance")
# fqn="auto": the first of these the network has (a fixed order; diffusers iterates a set)
AUTO_FQN = ("transformer_blocks", "blocks", "layers", "single_transformer_blocks", "visual_transformer_blocks",
            "temporal_transformer_blocks")
_CONDITION_BRANCH = {0: "cond", 1: "uncond"}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers' "guiders are experimental" warning while a guider is built."""
    log = logging.getLogger("diffusers.guiders.guider_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def guider_class(name: str) -> type:
    """The guider class `name`: one of `diffusers.guiders`, or "package.module.Class" (or
    "package.module:Class") for a `BaseGuidance` subclass of one's own."""
    from diffusers.guiders.guider_utils import BaseGuidance

    if not isinstance(name, str) or not name:
        raise SpecError(f"diffusers: name must be a guider class name, got {name!r}")
    if "." in name or ":" in name:
        module, _, attr = name.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"diffusers: cannot import guider {name!r}: {e}") from None
    else:
        import diffusers.guiders as guiders

        cls = getattr(guiders, name, None)
        if cls is None:
            from flowkit.errors import closest

            raise SpecError(f"diffusers: no guider {name!r} in diffusers.guiders{closest(name, GUIDERS)}; "
                            f"known: {', '.join(GUIDERS)}")
    if not (inspect.isclass(cls) and issubclass(cls, BaseGuidance)):
        raise SpecError(f"diffusers: {name!r} is not a diffusers guider (a BaseGuidance subclass)")
    return cls


def _config_value(key: str, value: Any) -> Any:
    """A spec value for a guider option: JSON text for LayerSkipConfig-like objects."""
    if hasattr(value, "to_dict"):
        return json.dumps(value.to_dict())
    if isinstance(value, (list, tuple)) and value and hasattr(value[0], "to_dict"):
        return json.dumps([v.to_dict() for v in value])
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _find_blocks(network: Any, fqn: str) -> tuple[str, Any]:
    """(resolved fqn, the ModuleList of blocks) of `network`, or a reason (str, None)."""
    if fqn == "auto":
        for ident in AUTO_FQN:
            if isinstance(getattr(network, ident, None), torch.nn.ModuleList):
                return ident, getattr(network, ident)
        return (f"fqn='auto' finds no transformer blocks in {type(network).__name__} (it looks for "
                f"{', '.join(AUTO_FQN[:4])}, ...); give the config's fqn, e.g. "
                "'mid_block.attentions.0.transformer_blocks' on a UNet"), None
    try:
        blocks = network.get_submodule(fqn)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, torch.nn.ModuleList):
        return f"{type(network).__name__} has no block list {fqn!r} (a LayerSkipConfig's fqn)", None
    return fqn, blocks


def layer_perturbation(configs: Any, network: Any, *, blur: tuple[float, float] | None = None
                       ) -> Perturbation | str:
    """The `Perturbation` that diffusers' hooks would apply for `configs` (LayerSkipConfigs, or
    SmoothedEnergyGuidanceConfigs when `blur` = (sigma, threshold_inf)) on `network`; or the
    reason flowkit cannot apply it."""
    identity: list[str] = []
    blurred: list[str] = []
    skip: list[str] = []
    for config in configs if isinstance(configs, (list, tuple)) else [configs]:
        fqn, blocks = _find_blocks(network, config.fqn)
        if blocks is None:
            return fqn
        indices = list(config.indices) if isinstance(config.indices, (list, tuple)) else [config.indices]
        paths = [f"{fqn}.{i}" for i in indices if isinstance(i, int) and 0 <= i < len(blocks)]
        if not paths:
            return (f"no block {indices} in {fqn} of {type(network).__name__} (it has {len(blocks)}); "
                    "choose the layers by their index there")
        if blur is not None:
            if config._query_proj_identifiers not in (None, ["to_q"]):
                return "flowkit blurs the queries of `to_q`; other query projections are not supported"
            blurred += paths
            continue
        if not math.isclose(config.dropout, 1.0):
            return (f"a LayerSkipConfig with dropout={config.dropout} drops activations with torch's global "
                    "generator (an image would depend on its batch partners); flowkit skips layers whole: "
                    "use dropout=1")
        if config.skip_attention_scores and not config.skip_attention:
            identity += paths
        elif config.skip_attention and config.skip_ff:
            skip += paths
        else:
            return ("flowkit perturbs attention maps (skip_attention_scores), queries (SEG) and whole blocks "
                    "(skip_attention and skip_ff); a LayerSkipConfig that skips only the attention output or "
                    "only the feed-forward is not supported")
    if blur is not None:
        return Perturbation(blur=tuple(blurred), blur_sigma=float(blur[0]), blur_threshold_inf=float(blur[1]))
    return Perturbation(identity=tuple(identity), skip=tuple(skip))


def _perturbed_conditions(guider: Any) -> dict[str, Any]:
    """identifier -> what perturbs that condition: ("layers", configs), ("blur", configs,
    sigma, threshold) or ("refuse", reason), for the guiders diffusers perturbs the model for."""
    from diffusers import guiders as G

    out: dict[str, Any] = {}
    if isinstance(guider, (G.PerturbedAttentionGuidance, G.SkipLayerGuidance)):
        out["pred_cond_skip"] = ("layers", guider.skip_layer_config)
    elif isinstance(guider, G.SmoothedEnergyGuidance):
        out["pred_cond_seg"] = ("blur", guider.seg_guidance_config, guider.seg_blur_sigma,
                                guider.seg_blur_threshold_inf)
    elif isinstance(guider, G.AutoGuidance):
        out["pred_uncond"] = ("layers", guider.auto_guidance_config)
    elif isinstance(guider, G.LTX2Guidance):
        reason = ("LTX2Guidance's {} condition is LTX-2's own (spatio-temporal skips / the audio-video modality "
                  "of its model), which no flowkit family has; run it with stg_scale=0 and modality_scale=1")
        out["pred_cond_stg"] = ("refuse", reason.format("pred_cond_stg"))
        out["pred_cond_modality"] = ("refuse", reason.format("pred_cond_modality"))
    return out


_KNOWN = ("ClassifierFreeGuidance", "ClassifierFreeZeroStarGuidance", "AdaptiveProjectedGuidance",
          "AdaptiveProjectedMixGuidance", "FrequencyDecoupledGuidance", "MagnitudeAwareGuidance",
          "TangentialClassifierFreeGuidance", "LTX2Guidance", "PerturbedAttentionGuidance", "SkipLayerGuidance",
          "SmoothedEnergyGuidance", "AutoGuidance")


def _changes_model(guider: Any) -> bool:
    """Whether `guider` is of a class flowkit does not know that perturbs the model in prepare_models."""
    from diffusers import guiders as G
    from diffusers.guiders.guider_utils import BaseGuidance

    if any(isinstance(guider, getattr(G, n)) for n in _KNOWN if getattr(G, n, None) is not None):
        return False
    return type(guider).prepare_models is not BaseGuidance.prepare_models


@GUIDANCE.register
class DiffusersGuider(Guidance):
    name = "diffusers"
    description = ("any diffusers guider (diffusers.guiders, or a BaseGuidance of one's own) as a flowkit "
                   "combiner: diffusers:name=PerturbedAttentionGuidance,guidance_scale=5,...")
    role = "combiner"
    saves_nfe = True  # the guider switches its conditions on and off by step (its windows)

    def __init__(self, guider: Any = None, *, name: str | None = None, **options: Any):
        super().__init__()
        if guider is None:
            cls = guider_class(name or "ClassifierFreeGuidance")
            options = {k: self._option(k, v) for k, v in options.items()}
            with _quiet():
                try:
                    guider = cls(**options)
                except TypeError as e:
                    raise SpecError(f"diffusers: {cls.__name__}: {e}") from None
                except ImportError as e:  # FrequencyDecoupledGuidance without kornia
                    raise SpecError(f"diffusers: {cls.__name__} needs a package that is not installed ({e}); "
                                    "pip install 'flowkit[guiders]'") from None
        elif name is not None or options:
            raise ValueError("give a guider object, or name= and its options, not both")
        from diffusers.guiders.guider_utils import BaseGuidance

        if not isinstance(guider, BaseGuidance):
            raise ValueError(f"DiffusersGuider wraps a diffusers guider (a BaseGuidance), got {type(guider).__name__}")
        self.guider = guider

    @staticmethod
    def _option(key: str, value: Any) -> Any:
        """JSON text for a config option (spec form) becomes its dict or list of dicts."""
        if key.endswith("_config") and isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise SpecError(f"diffusers: option {key} must be JSON text of a config ({e})") from None
        return value

    # -- spec: the guider's own options -------------------------------------------------
    @classmethod
    def spec_params(cls, params: Any = None) -> dict[str, Param]:
        """The spec options: `name` and the named guider's constructor options."""
        params = params or {}
        name = params.get("name") or "ClassifierFreeGuidance"
        out = {"name": Param("name", str | None, None, False)}
        try:
            gcls = guider_class(name)
        except SpecError:
            if set(params) - {"name"}:
                raise  # the options cannot be checked: the name is the mistake
            return out  # a bad name alone is the constructor's to refuse (as any value it checks)
        for p in list(inspect.signature(gcls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            required = p.default is inspect.Parameter.empty
            out[p.name] = Param(p.name, Any, None if required else p.default, required)
        return out

    @property
    def guider_name(self) -> str:
        cls = type(self.guider)
        import diffusers.guiders as guiders

        if getattr(guiders, cls.__name__, None) is cls:
            return cls.__name__
        return f"{cls.__module__}.{cls.__qualname__}"

    def spec_values(self) -> dict[str, Any]:
        """The options to write this module as a spec: the guider's name and its non-default config."""
        out: dict[str, Any] = {}
        if self.guider_name != "ClassifierFreeGuidance":
            out["name"] = self.guider_name
        defaults = {p.name: p.default for p in inspect.signature(type(self.guider).__init__).parameters.values()}
        for key, value in (getattr(self.guider, "_internal_dict", None) or {}).items():
            if key.startswith("_") or key not in defaults:
                continue
            if defaults[key] is not inspect.Parameter.empty and _same_value(value, defaults[key]):
                continue
            out[key] = _config_value(key, value)
        return out

    def params(self) -> dict:
        return self.spec_values()

    @classmethod
    def variants(cls) -> dict[str, str]:
        """`flowkit list guidance`: each diffusers guider with its options and their defaults."""
        out = {}
        for name in GUIDERS:
            try:
                params = cls.spec_params({"name": name})
            except (SpecError, ImportError) as e:  # e.g. FrequencyDecoupledGuidance without kornia
                out[f"diffusers:name={name}"] = f"(unavailable: {e})"
                continue
            opts = ", ".join(f"{p.name}" if p.required else f"{p.name}={p.default!r}"
                             for p in params.values() if p.name != "name")
            out[f"diffusers:name={name}"] = opts
        return out

    @property
    def scale(self) -> float:
        """The guider's `guidance_scale` (what a drop-in call's guidance_scale sets); no such
        attribute for a guider without one."""
        if not hasattr(self.guider, "guidance_scale"):
            raise AttributeError("scale")
        return float(self.guider.guidance_scale)

    @scale.setter
    def scale(self, value: float) -> None:
        with _quiet():
            self.guider = self.guider.new(guidance_scale=float(value))

    @property
    def extra_branches(self) -> int:
        return max(len(self.guider._input_predictions) - 1, 0)

    # -- refusals -----------------------------------------------------------------------
    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        if _changes_model(self.guider):
            return (f"{self.guider_name} changes the model in prepare_models, which flowkit cannot replay; "
                    "flowkit perturbs the network for PAG, SEG, SLG and AutoGuidance configs")
        for ident, how in _perturbed_conditions(self.guider).items():
            if how[0] == "refuse":
                if self._could_ask(ident):
                    return how[1]
                continue
            network = getattr(ctx.denoiser, "network", None)
            if not isinstance(network, torch.nn.Module):
                return f"{self.guider_name} perturbs the network, and this model has no network flowkit can perturb"
            found = self._perturbation(ctx, ident)
            if isinstance(found, str):
                return f"{self.guider_name}: {found}"
        return None

    def _could_ask(self, ident: str) -> bool:
        """Whether an LTX-2 guider would ask for `ident` at some step (its scale is not neutral)."""
        g = self.guider
        if ident == "pred_cond_stg":
            return g._enabled and not math.isclose(g.stg_scale, 0.0)
        if ident == "pred_cond_modality":
            return g._enabled and not math.isclose(g.modality_scale, 1.0)
        return True

    def _perturbation(self, ctx, ident: str) -> Perturbation | str | None:
        how = _perturbed_conditions(self.guider).get(ident)
        if how is None:
            return None
        if how[0] == "refuse":
            return how[1]
        network = ctx.denoiser.network
        if how[0] == "blur":
            return layer_perturbation(how[1], network, blur=(how[2], how[3]))
        return layer_perturbation(how[1], network)

    # -- per run ------------------------------------------------------------------------
    def run_guider(self, ctx) -> Any:
        """This run's copy of the guider (its step state and momentum are the run's)."""
        state = self.state(ctx)
        if "guider" not in state:
            state["guider"] = copy.deepcopy(self.guider)
        return state["guider"]

    def plan(self, ctx) -> list[tuple[str, str, int, Perturbation | None]]:
        """This step's conditions: (identifier, branch, condition index, perturbation), asked of
        the guider once per step after `set_state`."""
        state = self.state(ctx)
        if state.get("planned") == ctx.step:
            return state["plan"]
        g = self.run_guider(ctx)
        timestep = ctx.timestep
        g.set_state(ctx.step, ctx.num_steps, timestep[0] if timestep is not None else None)
        batches = g.prepare_inputs({"flowkit_condition": (0, 1, 2, 3)})
        plan = []
        for b in batches:
            ident = getattr(b, g._identifier_key)
            index = int(getattr(b, "flowkit_condition"))
            p = self._perturbation(ctx, ident)
            if isinstance(p, str):
                from flowkit.errors import UnsupportedError

                raise UnsupportedError(f"{self.guider_name}: {p}")
            if index not in _CONDITION_BRANCH:
                from flowkit.errors import UnsupportedError

                raise UnsupportedError(f"{self.guider_name} asks for condition {ident!r} (index {index}), which "
                                       "flowkit has no conditioning for")
            branch = _CONDITION_BRANCH[index]
            if p is not None:
                branch = ident[5:] if ident.startswith("pred_") and ident[5:] not in ("cond", "uncond") \
                    else f"{branch}_perturbed"
            plan.append((ident, branch, index, p))
        state["plan"], state["planned"] = plan, ctx.step
        return plan

    def branches(self, ctx, requests: BranchRequests) -> None:
        for _, branch, _, p in self.plan(ctx):
            requests.need(branch, perturbation=p)

    def conditioning(self, ctx, branch: str, cond):
        if cond is None:
            for _, name, index, _ in self.state(ctx).get("plan", ()):
                if name == branch:
                    return ctx.conds.get(_CONDITION_BRANCH[index])
        return cond

    def combine(self, ctx, preds: BranchPredictions) -> Prediction:
        cond = preds["cond"]
        plan = self.plan(ctx)
        if any(branch not in preds for _, branch, _, _ in plan):
            return cond  # a policy dropped a branch for every row: the conditional prediction
        g = self.run_guider(ctx)
        present = torch.ones(cond.value.shape[0], dtype=torch.bool, device=cond.value.device)
        for _, branch, _, _ in plan:
            present = present & preds.present(branch)
        state = self.state(ctx)
        buffer = getattr(g, "momentum_buffer", None)
        if buffer is not None and isinstance(state.get("momentum"), Tensor):
            buffer.running_average = state["momentum"]
        inputs = {ident: preds[branch].value for ident, branch, _, _ in plan}
        shape = cond.value.shape
        if _flattens(g) and len(shape) > 3:
            inputs = {k: v.reshape(shape[0], shape[1], -1) for k, v in inputs.items()}
        out = g.forward(**inputs)
        guided = out.pred if hasattr(out, "pred") else out[0] if isinstance(out, (tuple, list)) else out
        guided = guided.reshape(shape)
        if buffer is not None and isinstance(buffer.running_average, Tensor):
            avg = buffer.running_average
            old = state.get("momentum")
            rows = present.view(-1, *([1] * (avg.ndim - 1)))
            state["momentum"] = torch.where(rows, avg, old if isinstance(old, Tensor) else torch.zeros_like(avg))
            buffer.running_average = state["momentum"]
        rows = present.view(-1, *([1] * (guided.ndim - 1)))
        return cond.replace(torch.where(rows, guided.to(cond.value.dtype), cond.value))


def _flattens(guider: Any) -> bool:
    """MagnitudeAwareGuidance takes `torch.norm` over every non-batch dimension, which torch refuses
    for more than two (diffusers 0.42 runs it on packed [B, L, C] latents only): it gets image
    predictions as [B, C, H*W], the same norms and result."""
    from diffusers import guiders as G

    cls = getattr(G, "MagnitudeAwareGuidance", None)
    return cls is not None and isinstance(guider, cls)


def _same_value(a: Any, b: Any) -> bool:
    try:
        if hasattr(a, "to_dict") or hasattr(b, "to_dict"):
            return False
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return list(a) == list(b)
        return bool(a == b) and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                       and not isinstance(a, bool) and a == b)
    except Exception:
        return False


def as_diffusers_guider(module: Guidance, *, num_inference_steps: int | None = None) -> Any:
    """A diffusers guider (a `BaseGuidance`, for modular pipelines) that runs flowkit combiner
    `module` on the pipeline's `pred_cond` / `pred_uncond` (the model output). Feasible for
    combiners that work on the raw model output: CFG (any space; it is affine) and APG with
    space="model_output"; others are a ValueError naming why."""
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

    if not isinstance(module, Guidance) or module.role != "combiner":
        raise ValueError(f"as_diffusers_guider takes a flowkit combiner (CFG, APG, ...), got {module!r}")
    space = getattr(module, "space", "model_output")
    if module.name not in ("cfg", "apg") or (module.name == "apg" and space != "model_output"):
        raise ValueError(f"{module.name} (space={space!r}) needs flowkit's path and time to convert predictions; "
                         "as_diffusers_guider runs combiners on the model output: CFG, or "
                         "APG(space='model_output')")

    class FlowkitGuider(BaseGuidance):
        _input_predictions = ["pred_cond", "pred_uncond"]

        def __init__(self, flowkit_spec: str | None = None) -> None:
            with _quiet():
                super().__init__(module.start, module.stop, True)
            from flowkit.spec import to_spec

            # a config, as pipelines' components have (the spec of the flowkit module it runs)
            self.register_to_config(flowkit_spec=str(to_spec(module)))
            self.module = module
            self._ctx = None

        def _context(self, batch: int):
            from flowkit.context import Context
            from flowkit.guidance_base import GuidanceStack

            if self._ctx is None or self._ctx.batch_size != batch or self._step == 0:
                self._ctx = Context(None, GuidanceStack([module]), {}, [torch.Generator()] * batch,
                                    self._num_inference_steps or num_inference_steps or 1)
            self._ctx.step = self._step or 0
            return self._ctx

        def _enabled_now(self) -> bool:
            if not self._enabled:
                return False
            if self._num_inference_steps is None:
                return True
            first, end = module.window(self._num_inference_steps)
            return first <= self._step < end and module.extra_branches > 0

        @property
        def num_conditions(self) -> int:
            return 2 if self._enabled_now() else 1

        @property
        def is_conditional(self) -> bool:
            return self._count_prepared == 1

        def prepare_inputs(self, data):
            indices = [0] if self.num_conditions == 1 else [0, 1]
            return [self._prepare_batch(data, i, n) for i, n in zip(indices, self._input_predictions)]

        def prepare_inputs_from_block_state(self, data, input_fields):
            indices = [0] if self.num_conditions == 1 else [0, 1]
            return [self._prepare_batch_from_block_state(input_fields, data, i, n)
                    for i, n in zip(indices, self._input_predictions)]

        def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> Any:
            if pred_uncond is None or not self._enabled_now():
                return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
            from flowkit.paths.linear import LinearPath

            b = pred_cond.shape[0]
            path = LinearPath()
            point = path.at(torch.full((b,), 0.5, dtype=torch.float64))
            zeros = torch.zeros_like(pred_cond)
            c = Prediction(pred_cond, "velocity", zeros, point, path)
            u = Prediction(pred_uncond, "velocity", zeros, point, path)
            ones = torch.ones(b, dtype=torch.bool, device=pred_cond.device)
            preds = BranchPredictions({"cond": c, "uncond": u}, {"cond": ones, "uncond": ones})
            pred = module.combine(self._context(b), preds).value
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    return FlowkitGuider()
