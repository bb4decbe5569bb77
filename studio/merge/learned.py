"""Learned merge: search each adapter's weight so the merged model reproduces a few reference images.

LoraHub (Huang et al. 2023, arXiv:2307.13269) searches weights w in [-1.5, 1.5] minimising the
few-shot loss + 0.05 mean|w| with nevergrad's NGOpt over 40 evaluations. Here the loss is the
backbone's own denoising loss on the reference images (fixed noise and timesteps, so candidates
compare fairly), and the search a (1+4) evolution strategy with the 1/5th success rule (Rechenberg):
nevergrad is not a dependency, and four weights need nothing more. The adapters are attached unfused
while searching, so a candidate costs one weight change and one batched forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from studio.adapters.base import Adapter
    from studio.backbones import Backbone
    from studio.merge.engine import MergeResult
    from studio.training.objectives import Objective

BOUND = 1.5  # LoraHub's weight range
L1 = 0.05  # LoraHub's penalty on mean |w|


def reference_batch(backbone: Backbone, objective: Objective, folder: str | Path, *,
                    repeats: int = 4) -> tuple[torch.Tensor, dict]:
    """Latents and conditioning of a reference folder (kohya layout, captions beside images), each
    image `repeats` times so several noise levels are scored."""
    from PIL import Image

    from studio.training.data import bucket_of, check_size, encode_images, fit, scan_folder

    size = check_size(backbone.default_size, backbone.size_factor)
    scan = scan_folder(folder, min_size=size)
    images = []
    for item in scan.items:
        with Image.open(item.path) as image:
            images.append(fit(image, bucket_of(item.size, [(size, size)])))
    with torch.no_grad():
        latents = encode_images(backbone, images).repeat(repeats, 1, 1, 1)
        conditioning = objective.encode([i.caption for i in scan.items] * repeats)
    return latents, conditioning


def search_weights(loss_of: Callable[[np.ndarray], float], start: np.ndarray, *, evaluations: int = 40,
                   seed: int = 0, sigma: float = 0.3) -> tuple[np.ndarray, float, list[float]]:
    """Minimise `loss_of(w) + L1 * mean|w|` over w in [-BOUND, BOUND]^k; returns the best w, its
    objective and the objective's history."""
    rng = np.random.default_rng(seed)

    def objective(w: np.ndarray) -> float:
        return loss_of(w) + L1 * float(np.abs(w).mean())

    best, best_value = start.copy(), objective(start)
    history = [best_value]
    while len(history) < evaluations:
        candidates = [np.clip(best + sigma * rng.standard_normal(best.shape), -BOUND, BOUND) for _ in range(4)]
        values = [objective(c) for c in candidates[: evaluations - len(history)]]
        history += values
        i = int(np.argmin(values))
        if values[i] < best_value:
            best, best_value = candidates[i], values[i]
            sigma *= 1.5
        else:
            sigma *= 0.6
    return best, best_value, history


def learned_merge(sources: list[str | Path | Adapter], backbone: Backbone, reference: str | Path | None, *,
                  evaluations: int = 40, seed: int = 0, rank: int | None = None, out: str | Path | None = None,
                  overwrite: bool = False, log: Callable[[str], None] = print) -> MergeResult:
    """Weights learned on `reference`, then the exact weighted sum (concat) at those weights."""
    from studio.merge.engine import load_sources, merge
    from studio.merge.interference import unique_names
    from studio.training.objectives import objective_for

    if reference is None:
        raise InvalidArgumentError("the learned merge needs --reference: a folder of a few images (with captions) "
                                   "that the merged adapter should reproduce.")
    if backbone is None:
        raise InvalidArgumentError("the learned merge needs the backbone (--backbone) to score candidates.")
    adapters = load_sources(sources, backbone)
    objective = objective_for(backbone)
    latents, conditioning = reference_batch(backbone, objective, reference)
    originals = [a.config.name for a in adapters]
    for adapter, name in zip(adapters, unique_names([a.name for a in adapters]), strict=True):
        adapter.config.name = name  # attached together, they need distinct names
        adapter.attach(backbone, 1.0)

    def loss_of(w: np.ndarray) -> float:
        for adapter, value in zip(adapters, w, strict=True):
            adapter.set_weight(backbone, float(value))
        torch.manual_seed(seed)  # the same noise and timesteps for every candidate
        with torch.no_grad():
            return float(objective.loss(backbone.denoiser, latents.to(backbone.device), **{
                k: v.to(backbone.device) for k, v in conditioning.items()}))

    try:
        backbone.denoiser.eval()
        best, value, history = search_weights(loss_of, np.ones(len(adapters)), evaluations=evaluations, seed=seed)
    finally:
        for adapter, name in zip(adapters, originals, strict=True):
            adapter.detach(backbone)
            adapter.config.name = name
    log(f"learned weights {', '.join(f'{w:.3f}' for w in best)} (objective {history[0]:.5f} at 1 each -> {value:.5f})")
    result = merge(adapters, method="concat", weights=[float(w) for w in best], rank=rank, backbone=backbone,
                   out=None)
    result.adapter.config.merge |= {"method": "learned", "parameters": {
        "weights": [float(w) for w in best], "evaluations": evaluations, "seed": seed,
        "reference": str(reference), "objective": [history[0], value]}}
    if out is not None:
        result.path = result.adapter.save(out, overwrite=overwrite)
    return result
