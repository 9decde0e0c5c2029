"""Attention kernels and attention-map capture for diffusers networks.

    import flowkit.attention as A
    A.set_kernel(pipe, "sdpa-math")           # the pipeline's attention runs on SDPA's math backend
    with A.use_kernel("reference"):           # inside the block: the matmul-softmax reference
        flowkit.sample(pipe, prompts)
    flowkit.sample(pipe, prompts, attention="sdpa")   # one run's kernel
    A.layers(pipe)                            # the cross-attention layers whose maps can be captured

Kernels (`KERNELS`): "sdpa" (default: PyTorch's fused SDPA; flash / memory-efficient /
cuDNN on a GPU), "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn" (SDPA restricted
to one backend), "xformers" (when installed, on CUDA) and "reference". Guidance reads
attention maps through the run's store, `ctx.attention` (see flowkit.attention.store).
"""

from flowkit.attention.control import (
    AttentionController,
    active_kernel,
    checkpoint_contexts,
    controller,
    install,
    layers,
    network,
    session,
    set_kernel,
    uninstall,
    use_kernel,
)
from flowkit.attention.kernels import (
    DEFAULT_KERNEL,
    KERNELS,
    check_kernel,
    reference,
    unavailable,
)
from flowkit.attention.store import AttentionMap, AttentionStore, resolve_layers

__all__ = [
    "AttentionController",
    "AttentionMap",
    "AttentionStore",
    "DEFAULT_KERNEL",
    "KERNELS",
    "active_kernel",
    "checkpoint_contexts",
    "check_kernel",
    "controller",
    "install",
    "layers",
    "network",
    "reference",
    "resolve_layers",
    "session",
    "set_kernel",
    "uninstall",
    "unavailable",
    "use_kernel",
]
