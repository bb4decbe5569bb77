"""The DiT families: SD3/3.5 (MMDiT), Flux.1 and PixArt, each with its own call conventions."""

from __future__ import annotations

from typing import Any

from studio.pipelines.base import CALLS, Progress, standard_call, step_end_callback

from studio.backbones import t5_free_options
from studio.recipe import Recipe


@CALLS.register("sd3")
def sd3_call(pipe: Any, recipe: Recipe, progress: Progress | None) -> dict[str, Any]:
    """SD3/3.5: the standard call, with `t5_free_options`."""
    return standard_call(pipe, recipe, progress) | t5_free_options(pipe)


@CALLS.register("flux")
def flux_call(pipe: Any, recipe: Recipe, progress: Progress | None) -> dict[str, Any]:
    """Flux.1 is guidance-distilled: `guidance_scale` feeds its guidance embedding, no negative prompt."""
    return step_end_callback(progress, recipe.steps)


@CALLS.register("pixart")
def pixart_call(pipe: Any, recipe: Recipe, progress: Progress | None) -> dict[str, Any]:
    """PixArt: exact sizes (no resolution binning), raw captions (no bs4/ftfy cleaning), old-style callback."""
    options: dict[str, Any] = {"negative_prompt": recipe.negative_prompt, "use_resolution_binning": False,
                               "clean_caption": False}
    if progress is not None:
        options |= {"callback": lambda step, timestep, latents: progress(step + 1, recipe.steps),
                    "callback_steps": 1}
    return options
