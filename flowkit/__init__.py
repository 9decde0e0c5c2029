"""flowkit: samplers and composable guidance for diffusion and flow-matching models.

    import flowkit
    pipe = flowkit.load("shapes")
    out = flowkit.sample(pipe, ["three red circles"], sampler="euler", steps=20, seed=0)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from flowkit.api import SampleOutput, sample
from flowkit.loading import load
from flowkit.seeding import seed_for
from flowkit.timegrid import TimeGrid

__all__ = ["__version__", "load", "sample", "SampleOutput", "seed_for", "TimeGrid"]
