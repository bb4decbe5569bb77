"""studio: a diffusion-model customization studio.

Heavy modules (torch, diffusers) load on first use of the names below, so `import studio` and
`studio --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "studio.backbones",
    "Backbone": "studio.backbones",
    "FAMILIES": "studio.backbones",
    "DEFAULT_BACKBONE": "studio.backbones",
    "StudioPipeline": "studio.pipelines.base",
    "Generation": "studio.pipelines.base",
    "Recipe": "studio.recipe",
    "read_recipe": "studio.recipe",
    "SCHEDULERS": "studio.schedulers",
    "StudioError": "studio.errors",
    "train": "studio.training.trainer",
    "TrainConfig": "studio.training.trainer",
    "train_batch": "studio.training.batch",
    "Library": "studio.library",
    "load_adapter": "studio.adapters.base",
    "erase": "studio.training.erasing",
}
# `studio.merge` is the merge package, callable as the merge function (studio/merge/__init__.py)

__all__ = ["__version__", "merge", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "merge":
        return importlib.import_module("studio.merge")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
