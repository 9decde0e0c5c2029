"""Putting flowkit's processors on a network, choosing its kernel, and a run's capture session.

`install(model)` replaces the diffusers processors flowkit knows (see processors.py) by
flowkit's, all tied to one `AttentionController` per model. The active kernel is, innermost
first: `use_kernel(name)` / a run's `attention=` option, the model's own (`set_kernel`),
then "sdpa". `session(model)` is what a flowkit run opens: it installs the processors for
the run if they are not installed (and restores the originals after), and hands out the
run's `AttentionStore`, through which guidance requests attention maps.

Nothing is decided or counted inside the network's forward, so a `torch.compile`d network
traces the processors without a graph break: before each forward the controller fixes its
*plan* (the kernel function and the layers whose maps are captured) as plain attributes the
processors read, and after it adds the forward's calls to the counts, one per installed
processor. A forward opens its plan through `AttentionController.forward` (the run's
`store.forward` scope, the replay of a checkpointed call) or, for calls outside a flowkit
run (a pipeline's own `__call__`), through forward hooks on the network. A forward that
captures maps runs eagerly (`torch.compiler.set_stance("force_eager")`): only those steps
leave the compiled graph.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from flowkit.attention.kernels import DEFAULT_KERNEL, KERNELS, check_kernel, reference
from flowkit.attention.processors import FlowKitProcessor, replacements
from flowkit.attention.store import AttentionStore
from flowkit.errors import UnsupportedError

__all__ = ["AttentionController", "install", "uninstall", "controller", "session", "use_kernel", "set_kernel",
           "layers", "network", "active_kernel", "unwrap"]

_OVERRIDE: ContextVar[str | None] = ContextVar("flowkit_attention_kernel", default=None)
_CONTROLLERS: "weakref.WeakKeyDictionary[Any, AttentionController]" = weakref.WeakKeyDictionary()


def active_kernel(model_kernel: str | None = None) -> str:
    """The kernel a call runs on: the `use_kernel` override, else the model's, else "sdpa"."""
    return _OVERRIDE.get() or model_kernel or DEFAULT_KERNEL


class _Plan(NamedTuple):
    kernel: str
    capture: frozenset[str]
    store: AttentionStore | None
    perturbation: Any = None  # the forward's flowkit.perturbation.Perturbation, or None
    identity: frozenset[str] = frozenset()  # its self-attention layers made the identity (PAG)
    blur: frozenset[str] = frozenset()  # its self-attention layers with blurred queries (SEG)


class AttentionController:
    """The flowkit processors of one network: kernel choice, call counts, the current run's store.

    kernel: this model's kernel (None: the default); counts: attention calls by kernel name
    since install, captured calls as "captured"; store: the running session's store, if any;
    processors: layer name -> (module, flowkit processor); kept: layer name -> the class of a
    processor left in place (not one flowkit replaces).

    The plan of the forward being run, read by the processors (see the module docstring):
    `fn`, the kernel function every call runs on; each processor's `capture` flag, set for
    the layers whose maps this forward captures, and its `identity` and `blur` flags, set for
    the layers a perturbed forward perturbs; `running`, the kernel's name.
    """

    def __init__(self) -> None:
        self.kernel: str | None = None
        self.counts: Counter[str] = Counter()
        self.store: AttentionStore | None = None
        self.processors: dict[str, tuple[Any, FlowKitProcessor]] = {}
        self.kept: dict[str, str] = {}
        self.capturable: list[str] = []
        self.running: str = DEFAULT_KERNEL
        self.fn: Callable[..., Tensor] = KERNELS[DEFAULT_KERNEL].fn
        self.capturing: frozenset[str] = frozenset()
        self.captured = 0  # calls captured in the forward being run (the eager capture path counts them)
        self.identities = 0  # calls made the identity in the perturbed forward being run (eager)
        self.perturbed: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._plan_store: AttentionStore | None = None
        self._plan_perturbation: Any = None
        self._depth = 0  # forwards opened by `forward` scopes
        self._hooked: Any = None  # the module whose hooks opened the forward being run
        self._hook_saved: tuple[_Plan, tuple[int, int]] | None = None
        self._hook_plan: _Plan | None = None
        self._handles: dict[int, list[Any]] = {}  # id(module) -> its hook handles
        self.network: "weakref.ref[Any] | None" = None
        self._perturbed: dict[Any, tuple[frozenset[str], frozenset[str]]] = {}

    # -- perturbed forwards (flowkit.perturbation) ------------------------------------------
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

    def skipped_calls(self, perturbation: Any) -> int:
        """Processors inside the perturbation's `skip` blocks: attention calls a skipped forward
        does not make (its blocks return their inputs)."""
        if not perturbation.skip:
            return 0
        return sum(1 for name in self.processors if any(name.startswith(block + ".") for block in perturbation.skip))

    @contextmanager
    def perturbing(self, perturbation: Any) -> Iterator[None]:
        """Apply `perturbation` for one forward: resolve its attention layers (the plan of the
        forward, `forward`, flags them) and make its `skip` blocks return their inputs."""
        self.perturbed_layers(perturbation)
        net = self.network() if self.network is not None else None
        skipped = []  # (block, the forward it had on its instance, or None)
        try:
            for block in perturbation.skip:
                try:
                    module = net.get_submodule(block) if net is not None else None
                except AttributeError:
                    module = None
                if module is None:
                    raise UnsupportedError(f"no block {block!r} to skip in this network")
                # a forward already on the instance (diffusers' HookRegistry hooks: first-block
                # cache, group offload, ...) is put back afterwards, not deleted
                skipped.append((module, module.__dict__.get("forward")))
                module.forward = _skipper(module)
            yield
        finally:
            for module, own in reversed(skipped):
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    # -- the plan of one forward -------------------------------------------------------
    def _set(self, plan: _Plan) -> None:
        self.running, self.fn, self._plan_store = plan.kernel, KERNELS[plan.kernel].fn, plan.store
        if plan.capture != self.capturing:
            for name, (_, proc) in self.processors.items():
                proc.capture = name in plan.capture
            self.capturing = plan.capture
        self._plan_perturbation = plan.perturbation
        if (plan.identity, plan.blur) != self.perturbed:
            for name, (_, proc) in self.processors.items():
                proc.identity, proc.blur = name in plan.identity, name in plan.blur
            self.perturbed = (plan.identity, plan.blur)

    def _open(self, store: AttentionStore | None, kernel: str | None) -> tuple[_Plan, _Plan, tuple[int, int]]:
        """Fix the plan of a forward: (the plan, the outer plan to restore, the outer counts of
        captured and identity calls)."""
        store = self.store if store is None else store
        name = check_kernel(kernel) if kernel is not None else active_kernel(self.kernel)
        capture = frozenset(layer for layer in self.capturable if store is not None and store.wants(layer))
        scope = store.scope if store is not None else None
        perturbation = scope.perturbation if scope is not None else None
        identity, blur = self.perturbed_layers(perturbation) if perturbation is not None else (frozenset(),) * 2
        outer = _Plan(self.running, self.capturing, self._plan_store, self._plan_perturbation, *self.perturbed)
        plan = _Plan(name, capture, store, perturbation, identity, blur)
        self._set(plan)
        saved = (self.captured, self.identities)
        self.captured = self.identities = 0
        return plan, outer, saved

    def _close(self, plan: _Plan, outer: _Plan, saved: tuple[int, int], ok: bool) -> None:
        """Count a finished forward's calls (one per installed processor, less those inside
        skipped blocks; none for a replayed or failed forward) and restore the outer plan."""
        if ok and not (plan.store is not None and plan.store.replaying):
            captured, identities = self.captured, self.identities
            skipped = self.skipped_calls(plan.perturbation) if plan.perturbation is not None else 0
            fused = len(self.processors) - captured - identities - skipped
            for counts in (self.counts, None if plan.store is None else plan.store.counts):
                if counts is None:
                    continue
                if fused:
                    counts[plan.kernel] += fused
                if captured:
                    counts["captured"] += captured
                if identities:
                    counts["identity"] += identities
        self._set(outer)
        self.captured, self.identities = saved

    @contextmanager
    def forward(self, store: AttentionStore | None = None, kernel: str | None = None) -> Iterator[_Plan]:
        """One network forward inside the block: its kernel (`kernel`, else the active one) and
        the layers `store` (default: the session's) wants captured are fixed before it, its calls
        counted after it. A forward that captures, or is perturbed (flowkit.perturbation), runs
        eagerly, outside any compiled graph."""
        plan, outer, saved = self._open(store, kernel)
        self._depth += 1
        ok = False
        try:
            with _eager() if plan.capture or plan.perturbation is not None else contextlib.nullcontext():
                yield plan
            ok = True
        finally:
            self._depth -= 1
            self._close(plan, outer, saved, ok)

    def capture_call(self, layer: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     cross: tuple[slice, slice]) -> Tensor:
        """A captured call (eager): the reference kernel, whose probabilities go to the store."""
        out, probs = reference(q, k, v, mask, probs=True)
        if self._plan_store is not None:
            self._plan_store.record(layer, probs[:, :, cross[0], cross[1]])
        self.captured += 1
        return out

    def blur_query(self, query: Tensor) -> Tensor:
        """A self-attention layer's projected queries [B, L, C] (before heads and norms), blurred
        over the token grid as diffusers' SmoothedEnergyGuidanceHook does on `to_q` (SEG); run
        by the processors flagged `blur` in a perturbed forward (eager)."""
        import math

        from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

        p = self._plan_perturbation
        sigma = p.blur_sigma
        size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        return _gaussian_blur_2d(query, size, sigma, p.blur_threshold_inf)

    def identity_call(self, v: Tensor) -> Tensor:
        """A self-attention call made the identity in a perturbed forward (PAG): the values."""
        self.identities += 1
        return v

    def idle(self) -> None:
        """The plan between forwards: the model's own kernel, nothing captured (what a network
        compiled after `install`, whose hooks are traced away, runs in its own calls)."""
        if not self._depth and self._hooked is None:
            self._set(_Plan(self.kernel or DEFAULT_KERNEL, frozenset(), None))

    # -- forwards outside a flowkit run: the network's hooks ------------------------------
    def _pre_hook(self, module: Any, args: Any) -> None:
        if torch.compiler.is_compiling() or self._depth:
            return  # traced into a compiled graph, or planned by a `forward` scope already
        if self._hooked is not None and self._hooked is not module:
            return  # the inner module of a compiled wrapper whose hooks opened this forward
        # (a module's own stale forward, left open by an exception, is simply reopened)
        plan, outer, saved = self._open(None, None)
        if self._hook_saved is not None:  # keep the plan from before the failed forward
            outer, saved = self._hook_saved
        self._hooked, self._hook_saved = module, (outer, saved)
        self._hook_plan = plan

    def _post_hook(self, module: Any, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or self._hooked is not module:
            return
        outer, saved = self._hook_saved
        self._hooked, self._hook_saved = None, None
        self._close(self._hook_plan, outer, saved, True)

    def hook(self, module: Any) -> None:
        """Plan and count the forwards of `module` (the network, or a compiled wrapper of it)
        that no `forward` scope opened."""
        if id(module) not in self._handles:
            self._handles[id(module)] = [module.register_forward_pre_hook(self._pre_hook),
                                         module.register_forward_hook(self._post_hook)]

    def unhook(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles = {}

    def intact(self) -> bool:
        """Whether every flowkit processor is still in place (a later set_attn_processor replaces them)."""
        return all(module.processor is proc for module, proc in self.processors.values())


def unwrap(net: Any) -> Any:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles, else `net` itself."""
    while isinstance(getattr(net, "_orig_mod", None), torch.nn.Module):
        net = net._orig_mod
    return net


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
    """The attention-bearing network of a pipeline, FlowKitPipeline, denoiser or model (as it is
    held: a `torch.compile` wrapper stays wrapped; `unwrap` gives the module it compiles)."""
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
    for name, module in unwrap(model).named_modules():
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
    ctl = _CONTROLLERS.get(unwrap(network(model)))
    return ctl if ctl is not None and ctl.intact() else None


def install(model: Any, kernel: str | None = None) -> AttentionController:
    """Put flowkit processors on `model` (a pipeline or network, compiled or not; idempotent);
    `kernel` sets its kernel."""
    net = network(model)
    inner = unwrap(net)
    ctl = controller(inner)
    if ctl is None:
        old = _CONTROLLERS.pop(inner, None)
        if old is not None:
            _restore(old)
        ctl = AttentionController()
        for name, module, cls in _scan(inner):
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
        ctl.network = weakref.ref(inner)
        _CONTROLLERS[inner] = ctl
        ctl.hook(inner)
    if net is not inner:  # a compiled wrapper: its hooks run outside the compiled graph
        ctl.hook(net)
    if kernel is not None:
        ctl.kernel = check_kernel(kernel)
        ctl.idle()
    return ctl


def _eager() -> Any:
    """A context where compiled code runs eagerly (torch.compile's "force_eager" stance), when
    torch's compiler is loaded at all (nothing was compiled otherwise)."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _restore(ctl: AttentionController) -> None:
    ctl.unhook()
    for module, proc in ctl.processors.values():
        if module.processor is proc:
            module.set_processor(proc.original)


def uninstall(model: Any) -> None:
    """Give `model` its original processors back."""
    ctl = _CONTROLLERS.pop(unwrap(network(model)), None)
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
    are gone) runs with the processors, store, call scope and kernel of the original call, so it
    takes the same kernels and records and counts nothing twice."""
    net = model if model is None or isinstance(model, torch.nn.Module) else network(model)

    def contexts() -> tuple[Any, Any]:
        ctl = controller(net) if net is not None else None
        kernel = ctl.running if ctl is not None and ctl._depth else active_kernel(ctl.kernel if ctl else None)
        return contextlib.nullcontext(), _replay(net, store, store.scope, kernel)

    return contexts


@contextmanager
def _replay(net: Any, store: AttentionStore, scope: Any, kernel: str) -> Iterator[None]:
    ctl, installed = None, False
    if net is not None:
        ctl = controller(net)
        if ctl is None:
            ctl, installed = install(net), True
    outer = ctl.store if ctl is not None else None
    if ctl is not None:
        ctl.store = store
    try:
        with store.replay(scope), (ctl.forward(store, kernel) if ctl is not None else contextlib.nullcontext()):
            yield
    finally:
        if ctl is not None:
            ctl.store = outer
            if installed:
                uninstall(net)


@contextmanager
def session(model: Any | None, kernel: str | None = None) -> Iterator[AttentionStore]:
    """One run's attention: flowkit processors on `model` (a network, compiled or not, a pipeline
    or None) for the run (unless already installed), `kernel` for its calls (None: the active
    kernel), and the run's store, whose `forward` scopes plan and count each network call."""
    if kernel is not None:
        check_kernel(kernel)
    ctl, installed_here = None, False
    model = model if isinstance(model, torch.nn.Module) or model is None else network(model)
    if model is not None:
        ctl = controller(model)
        if ctl is None:
            installed_here = True
        ctl = install(model)  # (hooks a compiled wrapper of an installed network too)
    store = AttentionStore(ctl.capturable if ctl is not None else ())
    store.controller = ctl
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
        store.controller = None
        if ctl is not None:
            ctl.store = outer
            if installed_here:
                uninstall(model)
