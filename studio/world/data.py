"""Rendered sets of the shapes world, made once per (size, seed, held-out) and cached on disk."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np

from studio.home import atomic_path, cache_dir
from studio.world.render import layers, render, sample_labels
from studio.world.vocab import ATTRIBUTES, VALUES, Labels

SET_VERSION = 1


def _render_chunk(args: tuple[int, int, int, bool, bool]) -> dict[str, np.ndarray]:
    start, stop, seed, held_out, as_layers = args
    out: dict[str, list] = {k: [] for k in (("backgrounds", "alphas") if as_layers else ("images", "masks"))}
    labels = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])  # item i is the same whatever the chunking
        item = sample_labels(rng, held_out=held_out)
        if as_layers:
            background, alpha, _ = layers(item, seed=int(rng.integers(2**31)))
            out["backgrounds"].append(np.round(background * 255).astype(np.uint8))
            out["alphas"].append(alpha.astype(np.float16))
        else:
            image, mask = render(item, seed=int(rng.integers(2**31)))
            out["images"].append(np.asarray(image))
            out["masks"].append(mask)
        labels.append([item.index(a) for a in ATTRIBUTES])
    return {**{k: np.stack(v) for k, v in out.items()}, "labels": np.asarray(labels, dtype=np.int64)}


def render_set(n: int, seed: int, *, held_out: bool = False, workers: int = 2) -> dict[str, np.ndarray]:
    """`n` random renders: images (n, 64, 64, 3) uint8, masks (n, 64, 64) bool, labels (n, 5) indices
    into VALUES in ATTRIBUTES order. Base values only unless `held_out`."""
    return _cached_set(n, seed, held_out, workers, as_layers=False)


def layer_set(n: int, seed: int, *, held_out: bool = False, workers: int = 2) -> dict[str, np.ndarray]:
    """The layers of `n` random renders (`studio.world.render.layers`), for augmentations that reshape the
    shape: backgrounds (n, 64, 64, 3) uint8, alphas (n, 64, 64) float16 coverage, labels as `render_set`'s."""
    return _cached_set(n, seed, held_out, workers, as_layers=True)


def _cached_set(n: int, seed: int, held_out: bool, workers: int, *, as_layers: bool) -> dict[str, np.ndarray]:
    kind = "layers-" if as_layers else ""
    path = cache_dir("world") / f"{kind}set-v{SET_VERSION}-{n}-{seed}-{'all' if held_out else 'base'}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    chunk = 512
    jobs = [(i, min(i + chunk, n), seed, held_out, as_layers) for i in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    with atomic_path(path) as tmp:
        np.savez(tmp, **data)
    return data


def labels_at(data: dict[str, np.ndarray], i: int) -> Labels:
    return Labels(**{a: VALUES[a][int(k)] for a, k in zip(ATTRIBUTES, data["labels"][i], strict=True)})


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
