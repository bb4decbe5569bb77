"""Embedded backbones: names that need no download. Each builder takes no argument and returns a pipeline:
`tiny-<family>` (studio.tiny, random configs of the real architectures) and `world-sd` / `world-dit` (the
shapes world, studio.world.models).

The imports run one way: backbones -> embedded -> tiny, world.models -> folders; neither builder module
imports the backbones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from studio import tiny
from studio.errors import BackboneNotFoundError
from studio.registry import Registry
from studio.world import models as world_models

EMBEDDED: Registry[Callable[[], Any]] = Registry("backbone", BackboneNotFoundError)
for _name, _builder in {**tiny.BUILDERS, **world_models.BUILDERS}.items():
    EMBEDDED.add(_name, _builder)
