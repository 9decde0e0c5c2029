"""The guidance base classes, re-exported from the core (`flowkit.guidance_base`), so a
module author writes `from flowkit.guidance.base import Guidance`."""

from flowkit.guidance_base import (
    BranchPredictions,
    BranchRequests,
    Guidance,
    GuidanceStack,
)

__all__ = ["Guidance", "GuidanceStack", "BranchRequests", "BranchPredictions"]
