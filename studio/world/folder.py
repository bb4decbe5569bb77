"""Reference folders of renders in the kohya layout: NNN.png beside NNN.txt holding its caption (and,
with `masks`, NNN.mask.png: the shape's exact mask, for masked loss)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from studio.world.captions import random_caption
from studio.world.render import render, sample_labels


def write_reference_folder(out: str | Path, *, n: int = 12, seed: int = 0, trigger: str | None = None,
                           masks: bool = False, stratify: tuple[str, ...] = (), **fixed: str | None) -> list[Path]:
    """Render `n` images with the `fixed` attributes (others random base values) and caption each.
    `stratify` names attributes whose base values take turns (image i gets value i mod count), so a
    small set covers them evenly, e.g. ("size",): half small, half large."""
    from studio.errors import InvalidArgumentError

    if n < 1:
        raise InvalidArgumentError(f"n={n} must be at least 1.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    from studio.world.vocab import base_values

    pinned = {k: v for k, v in fixed.items() if v}
    paths = []
    for i in range(n):
        turns = {a: base_values(a)[i % len(base_values(a))] for a in stratify if a not in pinned}
        labels = sample_labels(rng, **pinned, **turns)
        image, mask = render(labels, seed=int(rng.integers(2**31)))
        path = out / f"{i:03d}.png"
        image.save(path)
        if masks:
            from PIL import Image

            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out / f"{i:03d}.mask.png")
        path.with_suffix(".txt").write_text(random_caption(labels, rng, trigger=trigger) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
