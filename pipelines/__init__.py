"""Generation pipelines: `StudioPipeline` over a backbone, one module per backbone family."""

from studio.pipelines.base import Generation, StudioPipeline

__all__ = ["Generation", "StudioPipeline"]
