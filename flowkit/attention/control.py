"""Putting flowkit's processors on a network, choosing its kernel, and a run's capture session.

`install(model)` replaces the diffusers processors flowkit knows (see processors.py) by
flowkit's, all tied to one `AttentionController` per model, which runs each attention call
on the active kernel and counts the calls per kernel. The active kernel is, innermost
first: `use_kernel(name)` / a run's `attention=` option, the model's own (`set_kernel`),
then "sdpa". `session(model)` is what a flowkit run opens: it installs the processors for
the run if they are not installed (and restores the originals after), and hands out the
run's `AttentionStore`, through which guidance requests attention maps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from flowkit.attention.kernels import DEFAULT_KERNEL, KERNELS, check_kernel, reference
from flowkit.attention.processors import FlowKitProcessor, replacements
from flowkit.attention.store import AttentionStore
from flowkit.errors import UnsupportedError

__all__ = ["AttentionController", "install", "uninstall", "controller", "session", "use_kernel", "set_kernel",
           "layers", "network", "active_kernel"]

_OVERRIDE: ContextVar[str | None] = ContextVar("flowkit_attention_kernel", default=None)
_CONTROLLERS: "weakref.WeakKeyDictionary[Any, AttentionController]" = weakref.WeakKeyDictionary()


def active_kernel(model_kernel: str | None = None) -> str:
    """The kernel a call runs on: the `use_kernel` override, else the model's, else "sdpa"."""
    return _OVERRIDE.get() or model_kernel or DEFAULT_KERNEL


class AttentionController:
    """The flowkit processors of one network: kernel choice, call counts, the current run's store.

    kernel: this model's kernel (None: the default); counts: attention calls by kernel name
    since install, captured calls as "captured"; store: the running session's store, if any;
    processors: layer name -> (module, flowkit processor); kept: layer name -> the class of a
    processor left in place (not one flowkit replaces).
    """

    def __init__(self) -> None:
        self.kernel: str | None = None
        self.counts: Counter[str] = Counter()
        self.store: AttentionStore | None = None
        self.processors: dict[str, tuple[Any, FlowKitProcessor]] = {}
        self.kept: dict[str, str] = {}
        self.capturable: list[str] = []
        self.network: "weakref.ref[Any] | None" = None
        self._perturbed: dict[Any, tuple[frozenset[str], frozenset[str]]] = {}

    # -- perturbed forwards (flowkit.perturbation) ------------------------------------------
    def _perturbation(self) -> Any:
        store = self.store
        scope = store.scope if store is not None else None
        return scope.perturbation if scope is not None else None

    def perturbed_layers(self, perturbation: Any) -> tuple[frozenset[str], frozenset[str]]:
        """(identity layers, blurred-query layers): the self-attention layers inside the
        perturbation's `identity` and `blur` blocks; a block with none is an UnsupportedError."""
        if perturbation not in self._perturbed:
            out = []
            for blocks in (perturbation.identity, perturbation.blur):
                found: set[str] = set()
                for block in blocks:
                    hits = {name for name, (module, _) in self.processors.items()
                            if name.startswith(block + ".") and not getattr(module, "is_cross_attention", False)}
                    if not hits:
                        raise UnsupportedError(f"block {block!r} has no self-attention layer with a flowkit processor "
                                               "to perturb; name a block of the network's transformer blocks")
                    found |= hits
                out.append(frozenset(found))
            self._perturbed[perturbation] = (out[0], out[1])
        return self._perturbed[perturbation]

    @contextmanager
    def perturbing(self, perturbation: Any) -> Iterator[None]:
        """Apply `perturbation` for one forward: resolve its attention layers (used by `attend`
        and `query`) and make its `skip` blocks return their inputs."""
        self.perturbed_layers(perturbation)
        net = self.network() if self.network is not None else None
        skipped = []
        try:
            for block in perturbation.skip:
                try:
                    module = net.get_submodule(block) if net is not None else None
                except AttributeError:
                    module = None
                if module is None:
                    raise UnsupportedError(f"no block {block!r} to skip in this network")
                module.forward = _skipper(module)
                skipped.append(module)
            yield
        finally:
            for module in skipped:
                del module.forward

    def query(self, layer: str, query: Tensor) -> Tensor:
        """A self-attention layer's projected queries [B, L, C] (before heads and norms): blurred
        over the token grid when this forward's perturbation blurs this layer (SEG), as
        diffusers' SmoothedEnergyGuidanceHook does on `to_q`."""
        p = self._perturbation()
        if p is None or not p.blur or layer not in self.perturbed_layers(p)[1]:
            return query
        import math

        from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

        sigma = p.blur_sigma
        size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        return _gaussian_blur_2d(query, size, sigma, p.blur_threshold_inf)

    def attend(self, layer: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
               cross: tuple[slice, slice] | None) -> Tensor:
        """One attention call [B, H, Lq, D]: captured through the reference kernel when the
        store asks for this layer now, else on the active kernel; the values themselves in a
        perturbed forward that makes this layer's attention the identity (PAG)."""
        store = self.store
        p = self._perturbation()
        if p is not None and p.identity and layer in self.perturbed_layers(p)[0] and q.shape[2] == v.shape[2]:
            if store is not None and not store.replaying:
                self.counts["identity"] += 1
                store.counts["identity"] += 1
            return v
        if cross is not None and store is not None and store.wants(layer):
            out, probs = reference(q, k, v, mask, probs=True)
            store.record(layer, probs[:, :, cross[0], cross[1]])
            name = "captured"
        else:
            name = active_kernel(self.kernel)
            out = KERNELS[name].fn(q, k, v, mask)
        if store is not None and store.replaying:
            return out  # a checkpointed call recomputed in the backward pass: counted already
        self.counts[name] += 1
        if store is not None:
            store.counts[name] += 1
        return out

    def intact(self) -> bool:
        """Whether every flowkit processor is still in place (a later set_attn_processor replaces them)."""
        return all(module.processor is proc for module, proc in self.processors.values())


def _skipper(block: Any) -> Callable[..., Any]:
    """A forward for `block` that returns its inputs (the block skipped), in the order its own
    forward returns them (diffusers' TransformerBlockRegistry metadata; hidden states only for
    a block it does not know)."""
    import inspect

    names = list(inspect.signature(type(block).forward).parameters)[1:]
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(type(block))
        h_index, e_index = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    except (ImportError, ValueError):
        h_index, e_index = 0, None

    def arg(name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = names.index(name)
        return args[i] if i < len(args) else None

    def skip(*args: Any, **kwargs: Any) -> Any:
        hidden = arg("hidden_states", args, kwargs)
        if e_index is None:
            return hidden
        out = [None, None]
        out[h_index], out[e_index] = hidden, arg("encoder_hidden_states", args, kwargs)
        return tuple(out)

    return skip


def network(obj: Any) -> Any:
    """The attention-bearing network of a pipeline, FlowKitPipeline, denoiser or model."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if type(obj).__name__ == "FlowKitPipeline":
        obj = obj.pipe
    for attr in ("unet", "transformer", "network"):
        net = getattr(obj, attr, None)
        if isinstance(net, torch.nn.Module):
            return net
    raise UnsupportedError(f"{type(obj).__name__} has no attention network: give a diffusers pipeline, "
                           "a FlowKitPipeline, a UNet or a transformer")


def _scan(model: Any) -> Iterator[tuple[str, Any, type[FlowKitProcessor] | None]]:
    """(name, attention module, the flowkit processor class that replaces its processor or None)."""
    table = replacements()
    for name, module in model.named_modules():
        proc = getattr(module, "processor", None)
        if proc is None or not hasattr(module, "set_processor"):
            continue
        if isinstance(proc, FlowKitProcessor):
            yield name, module, type(proc)
            continue
        custom = getattr(proc, "_attention_backend", None) is not None or getattr(proc, "_parallel_config", None)
        yield name, module, None if custom else table.get(type(proc))


def controller(model: Any) -> AttentionController | None:
    """The controller of `model`'s installed flowkit processors, or None."""
    ctl = _CONTROLLERS.get(network(model))
    return ctl if ctl is not None and ctl.intact() else None


def install(model: Any, kernel: str | None = None) -> AttentionController:
    """Put flowkit processors on `model` (a pipeline or network; idempotent); `kernel` sets its kernel."""
    net = network(model)
    ctl = controller(net)
    if ctl is None:
        old = _CONTROLLERS.pop(net, None)
        if old is not None:
            _restore(old)
        ctl = AttentionController()
        for name, module, cls in _scan(net):
            if cls is None:
                ctl.kept[name] = type(module.processor).__name__
                continue
            proc = module.processor
            original = proc.original if isinstance(proc, FlowKitProcessor) else proc
            new = cls(name, ctl, original)
            module.set_processor(new)
            ctl.processors[name] = (module, new)
            if cls.capturable(module):
                ctl.capturable.append(name)
        ctl.network = weakref.ref(net)
        _CONTROLLERS[net] = ctl
    if kernel is not None:
        ctl.kernel = check_kernel(kernel)
    return ctl


def _restore(ctl: AttentionController) -> None:
    for module, proc in ctl.processors.values():
        if module.processor is proc:
            module.set_processor(proc.original)


def uninstall(model: Any) -> None:
    """Give `model` its original processors back."""
    ctl = _CONTROLLERS.pop(network(model), None)
    if ctl is not None:
        _restore(ctl)


def set_kernel(model: Any, kernel: str | None) -> AttentionController | None:
    """The pipeline-level setter: `model` (a pipeline or network) runs its attention on `kernel`
    from now on, in flowkit runs and in the pipeline's own calls; None restores diffusers' processors."""
    if kernel is None:
        uninstall(model)
        return None
    return install(model, check_kernel(kernel))


@contextmanager
def use_kernel(kernel: str) -> Iterator[str]:
    """Run attention on `kernel` inside the block (flowkit runs, and models with flowkit processors)."""
    token = _OVERRIDE.set(check_kernel(kernel))
    try:
        yield kernel
    finally:
        _OVERRIDE.reset(token)


def layers(model: Any) -> list[str]:
    """The names of `model`'s cross-attention layers whose maps flowkit can capture, in model order."""
    return [name for name, module, cls in _scan(network(model)) if cls is not None and cls.capturable(module)]


def checkpoint_contexts(model: Any | None, store: AttentionStore) -> Callable[[], tuple[Any, Any]]:
    """torch.utils.checkpoint's `context_fn` for the network calls of a run with `store`: the
    recomputation in the backward pass (which may come after the run, when flowkit's processors
    are gone) runs with the processors, store, call scope and kernel choice of the original
    call, so it takes the same kernels and records and counts nothing twice."""
    net = model if model is None or isinstance(model, torch.nn.Module) else network(model)

    def contexts() -> tuple[Any, Any]:
        ctl = controller(net) if net is not None else None
        return (contextlib.nullcontext(),
                _replay(net, store, store.scope, _OVERRIDE.get(), ctl.kernel if ctl is not None else None))

    return contexts


@contextmanager
def _replay(net: Any, store: AttentionStore, scope: Any, kernel: str | None, model_kernel: str | None
            ) -> Iterator[None]:
    ctl, installed = None, False
    if net is not None:
        ctl = controller(net)
        if ctl is None:
            ctl, installed = install(net, model_kernel), True
    outer = ctl.store if ctl is not None else None
    if ctl is not None:
        ctl.store = store
    token = _OVERRIDE.set(kernel)
    try:
        with store.replay(scope):
            yield
    finally:
        _OVERRIDE.reset(token)
        if ctl is not None:
            ctl.store = outer
            if installed:
                uninstall(net)


@contextmanager
def session(model: Any | None, kernel: str | None = None) -> Iterator[AttentionStore]:
    """One run's attention: flowkit processors on `model` (a network, pipeline or None) for the run
    (unless already installed), `kernel` for its calls (None: the active kernel), and the run's store."""
    if kernel is not None:
        check_kernel(kernel)
    ctl, installed_here = None, False
    model = model if isinstance(model, torch.nn.Module) or model is None else network(model)
    if model is not None:
        ctl = controller(model)
        if ctl is None:
            ctl, installed_here = install(model), True
    store = AttentionStore(ctl.capturable if ctl is not None else ())
    if ctl is not None:
        store.perturber = ctl.perturbing
    outer = ctl.store if ctl is not None else None
    if ctl is not None:
        ctl.store = store
    token = _OVERRIDE.set(kernel) if kernel is not None else None
    try:
        yield store
    finally:
        if token is not None:
            _OVERRIDE.reset(token)
        if ctl is not None:
            ctl.store = outer
            if installed_here:
                uninstall(model)
