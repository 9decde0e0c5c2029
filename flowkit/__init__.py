"""flowkit: samplers and composable guidance for diffusion and flow-matching models.

    import flowkit
    pipe = flowkit.load("shapes")
    out = flowkit.sample(pipe, ["three red circles"], sampler="euler", steps=20, seed=0)

The public names are imported lazily, so `import flowkit` (and `flowkit --version`) stays
fast until sampling is used. `flowkit.finetune` is its module, which is callable:
`flowkit.finetune(pipe, ...)` runs `flowkit.finetune.finetune` (Python binds an imported
submodule to its package's attribute, so the name could not stay the function).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("flowkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_LAZY = {
    "load": "flowkit.loading",
    "sample": "flowkit.api",
    "SampleOutput": "flowkit.api",
    "seed_for": "flowkit.seeding",
    "TimeGrid": "flowkit.timegrid",
    "fit_linear_ag": "flowkit.calibration",
    "finetune": "flowkit.finetune",
}

_MODULES = {"finetune"}  # names whose value is the (callable) module itself

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(_LAZY[name])
        value = module if name in _MODULES else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
