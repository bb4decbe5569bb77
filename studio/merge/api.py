"""`studio.merge(...)`: every merge method, the learned one included.

The imports run one way: this module -> learned -> engine (the learned merge searches weights, then merges
with the engine at them), so the engine knows nothing of the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.merge.engine import MergeResult
from studio.merge.engine import merge as merge_at_weights

if TYPE_CHECKING:
    from studio.adapters.base import Adapter


def merge(sources: list[str | Path | Adapter], *, method: str = "linear", reference: str | Path | None = None,
          evaluations: int = 40, **options: Any) -> MergeResult:
    """Merge adapters into one LoRA (studio.merge.engine.merge: weights, rank, density, seed, max_overlap,
    backbone, name, out, overwrite). `method="learned"` searches the weights on the `reference` folder's images
    first, `evaluations` candidates (needs the backbone)."""
    import contextlib

    from studio.outputs import claim

    out, overwrite = options.get("out"), options.get("overwrite", False)
    # checked and held before the work (the learned merge's search, any merge's loading)
    with claim(out, overwrite=overwrite) if out is not None else contextlib.nullcontext():
        if method != "learned":
            return merge_at_weights(sources, method=method, **options)
        from studio.merge.learned import learned_merge

        return learned_merge(sources, options.get("backbone"), reference, evaluations=evaluations,
                             seed=options.get("seed") or 0, rank=options.get("rank"), out=out, overwrite=overwrite)
