"""diffusers integration (installed as `flowkit.pipelines`): the shapes pipeline and the
`FlowKitPipeline` drop-in wrapper for SD 1.x/2.x, SDXL, SD3 and FLUX pipelines."""

from flowkit.pipelines.flowkit_pipeline import REFUSED, FlowKitPipeline

__all__ = ["FlowKitPipeline", "REFUSED"]
