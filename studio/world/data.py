"""Rendered sets of the shapes world, made once per (size, seed, held-out) and cached on disk."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from studio.home import cache_dir
from studio.world.render import render, sample_labels
from studio.world.vocab import ATTRIBUTES, VALUES, Labels

SET_VERSION = 1


def _render_chunk(args: tuple[int, int, int, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start, stop, seed, held_out = args
    images, masks, labels = [], [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])  # item i is the same whatever the chunking
        item = sample_labels(rng, held_out=held_out)
        image, mask = render(item, seed=int(rng.integers(2**31)))
        images.append(np.asarray(image))
        masks.append(mask)
        labels.append([item.index(a) for a in ATTRIBUTES])
    return np.stack(images), np.stack(masks), np.asarray(labels, dtype=np.int64)


def render_set(n: int, seed: int, *, held_out: bool = False, workers: int = 2) -> dict[str, np.ndarray]:
    """`n` random renders: images (n, 64, 64, 3) uint8, masks (n, 64, 64) bool, labels (n, 5) indices
    into VALUES in ATTRIBUTES order. Base values only unless `held_out`."""
    path = cache_dir("world") / f"set-v{SET_VERSION}-{n}-{seed}-{'all' if held_out else 'base'}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    chunk = 512
    jobs = [(i, min(i + chunk, n), seed, held_out) for i in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    data = {"images": np.concatenate([p[0] for p in parts]), "masks": np.concatenate([p[1] for p in parts]),
            "labels": np.concatenate([p[2] for p in parts])}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    Path(tmp).replace(path)
    return data


def labels_at(data: dict[str, np.ndarray], i: int) -> Labels:
    return Labels(**{a: VALUES[a][int(k)] for a, k in zip(ATTRIBUTES, data["labels"][i], strict=True)})


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
