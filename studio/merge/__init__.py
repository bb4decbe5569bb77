"""The merge engine: per-module deltas of weight-space adapters, merge methods over them, the
interference plan, and the merged file / baked backbone.

    import studio
    studio.merge.plan(["a.safetensors", "b.safetensors"]).table()
    studio.merge(["a.safetensors", "b.safetensors"], method="ties", weights=[0.7, 0.5], out="ab.safetensors")

`studio.merge` is this package and also the merge function: the package's module object is made
callable (below), so the one name serves both without importing torch at `import studio`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {"merge": "studio.merge.api", "bake": "studio.merge.engine", "load_sources": "studio.merge.engine",
            "MergeResult": "studio.merge.engine", "plan": "studio.merge.interference",
            "MergePlan": "studio.merge.interference", "METHODS": "studio.merge.methods"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio.merge' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("merge")(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
