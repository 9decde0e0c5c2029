"""The shapes world's diffusers pipeline, re-exported from `flowkit.worlds.shapes_pipeline`
(where the world that owns it lives), for `from flowkit.pipelines.shapes import ShapesPipeline`."""

from flowkit.worlds.shapes_pipeline import (
    ShapesPipeline,
    shapes_scheduler,
    shapes_unet_config,
)

__all__ = ["ShapesPipeline", "shapes_scheduler", "shapes_unet_config"]
