"""Embedded backbones: names that need no download. Each builder takes no argument and returns a pipeline:
`tiny-<family>` (studio.tiny, random configs of the real architectures) and `world-sd` / `world-dit` (the
shapes world, studio.world.models).

The imports run one way: backbones -> embedded -> tiny, world.models -> folders; neither builder module
imports the backbones. `ships` says what an embedded backbone brings beside its weights (its IP-Adapter,
control models, image encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio import tiny
from studio.errors import BackboneNotFoundError
from studio.registry import Registry
from studio.world import ASSETS
from studio.world import models as world_models

EMBEDDED: Registry[Callable[[], Any]] = Registry("backbone", BackboneNotFoundError)
for _name, _builder in {**tiny.BUILDERS, **world_models.BUILDERS}.items():
    EMBEDDED.add(_name, _builder)


def ships(backbone: str, part: str) -> Path | None:
    """Where the embedded backbone `backbone` keeps its own `part` (an adapter kind it ships, such as
    "ip_adapter" or "controlnet", or "image_encoder"), or None when it ships none. Adapters ask here, so
    no adapter module holds a table of the world's assets."""
    relative = world_models.SHIPS.get(backbone, {}).get(part)
    return None if relative is None else ASSETS / relative
