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

    def attend(self, layer: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
               cross: tuple[slice, slice] | None) -> Tensor:
        """One attention call [B, H, Lq, D]: captured through the reference kernel when the
        store asks for this layer now, else on the active kernel."""
        store = self.store
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
