"""Generation pipelines: `StudioPipeline` over a backbone, one module per backbone family."""

from studio.pipelines import dit, unet  # noqa: F401  (each registers its families' calls)
from studio.pipelines.base import Generation, StudioPipeline

__all__ = ["Generation", "StudioPipeline"]
