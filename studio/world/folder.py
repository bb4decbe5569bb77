"""Reference folders of renders in the kohya layout: NNN.png beside NNN.txt holding its caption (and,
with `masks`, NNN.mask.png: the shape's exact mask, for masked loss)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from studio.world.captions import random_caption
from studio.world.render import render, sample_labels


def write_reference_folder(out: str | Path, *, n: int = 12, seed: int = 0, trigger: str | None = None,
                           masks: bool = False, **fixed: str | None) -> list[Path]:
    """Render `n` images with the `fixed` attributes (others random base values) and caption each."""
    from studio.errors import InvalidArgumentError

    if n < 1:
        raise InvalidArgumentError(f"n={n} must be at least 1.")
    out = Path(out)
    pinned = {k: v for k, v in fixed.items() if v}
    sample_labels(np.random.default_rng(seed), **pinned)  # a value outside the world is refused before any file
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        labels = sample_labels(rng, **pinned)
        image, mask = render(labels, seed=int(rng.integers(2**31)))
        path = out / f"{i:03d}.png"
        image.save(path)
        if masks:
            from PIL import Image

            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out / f"{i:03d}.mask.png")
        path.with_suffix(".txt").write_text(random_caption(labels, rng, trigger=trigger) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
