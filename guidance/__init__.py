"""Guidance modules (installed as `flowkit.guidance`); one method per file.

`available()` lists every registered module, built-in or from a plugin.
"""

from flowkit.guidance.adaptive import AdaptiveGuidance
from flowkit.guidance.apg import APG
from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance, GuidanceStack
from flowkit.guidance.cfg import CFG
from flowkit.guidance.dirichlet_classifier import DirichletClassifierGuidance
from flowkit.guidance.gfcg import GFCG
from flowkit.guidance.linear_ag import LinearAG, LinearAGCoefficients, fit_linear_ag
from flowkit.registry import GUIDANCE

__all__ = ["Guidance", "GuidanceStack", "BranchRequests", "BranchPredictions", "CFG", "APG", "AdaptiveGuidance", "DirichletClassifierGuidance", "GFCG", "LinearAG",
           "LinearAGCoefficients", "fit_linear_ag", "available", "get"]


def available() -> dict[str, str]:
    """Registered guidance module names with their one-line descriptions."""
    return GUIDANCE.describe()


def get(name: str) -> type:
    return GUIDANCE.get(name)
