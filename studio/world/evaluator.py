"""The instrument: a small CNN that reads every attribute and the object mask of a 64x64 image.

It is trained on renders, half of them passed through the world VAE and all with light noise, so it
judges generated images by what they show rather than by VAE artefacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from studio.world import ASSETS
from studio.world.vocab import ATTRIBUTES, VALUES, Labels


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class WorldEvaluator(ModelMixin, ConfigMixin):
    """Image (B, 3, 64, 64) in [-1, 1] -> logits per attribute and mask logits (B, 64, 64)."""

    @register_to_config
    def __init__(self, width: int = 32, classes: dict[str, int] | None = None):
        super().__init__()
        classes = classes or {a: len(v) for a, v in VALUES.items()}
        self.stem = _block(3, width, 2)  # 32x32
        self.down1 = _block(width, 2 * width, 2)  # 16x16
        self.down2 = _block(2 * width, 4 * width, 2)  # 8x8
        self.down3 = _block(4 * width, 4 * width, 2)  # 4x4: a flattened 4x4 map keeps where things are
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * width, 256), nn.SiLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({a: nn.Linear(256, n) for a, n in classes.items()})
        self.mask_head = nn.Conv2d(2 * width, 1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h16 = self.down1(self.stem(images))  # (B, 2w, 16, 16)
        features = self.trunk(self.down3(self.down2(h16)))  # (B, 256)
        out = {a: head(features) for a, head in self.heads.items()}
        mask = nn.functional.interpolate(self.mask_head(h16), scale_factor=4, mode="bilinear", align_corners=False)
        out["mask"] = mask[:, 0]  # (B, 64, 64)
        return out


@lru_cache(maxsize=2)
def load_evaluator(folder: str | None = None) -> WorldEvaluator:
    """The shipped evaluator (assets/world/evaluator), in fp32 and eval mode."""
    from studio.errors import StudioError

    path = Path(folder) if folder else ASSETS / "evaluator"
    if not (path / "config.json").is_file():
        raise StudioError(f"no evaluator at {path}; train one with `studio world train --model evaluator`.")
    return WorldEvaluator.from_pretrained(path, torch_dtype=torch.float32).eval()


def images_to_tensor(images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3), or a float tensor in [-1, 1] -> (B, 3, 64, 64) in [-1, 1]."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = np.stack([np.asarray(im.convert("RGB").resize((64, 64)) if hasattr(im, "convert") else im)
                       for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def predict(images: Sequence[Any] | torch.Tensor, *, evaluator: WorldEvaluator | None = None,
            batch: int = 256) -> dict[str, Any]:
    """Per image: the predicted value of every attribute, and the mask (bool (B, 64, 64))."""
    model = evaluator or load_evaluator()
    x = images_to_tensor(images)
    outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    result: dict[str, Any] = {a: [VALUES[a][int(k)] for o in outs for k in o[a].argmax(-1)] for a in ATTRIBUTES}
    result["mask"] = torch.cat([o["mask"] for o in outs]) > 0
    return result


def evaluate(images: Sequence[Any] | torch.Tensor, expected: Sequence[Labels | dict[str, str]], *,
             masks: torch.Tensor | None = None, evaluator: WorldEvaluator | None = None) -> dict[str, Any]:
    """Accuracy per attribute named in `expected` (all five for Labels) and, with true `masks`, mask IoU."""
    if len(expected) != len(images):
        from studio.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{len(images)} images but {len(expected)} expected labels; give one per image.")
    wanted = [e.as_dict() if isinstance(e, Labels) else dict(e) for e in expected]
    predicted = predict(images, evaluator=evaluator)
    accuracy: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        pairs = [(p, w[attribute]) for p, w in zip(predicted[attribute], wanted, strict=True) if attribute in w]
        if pairs:
            accuracy[attribute] = sum(p == w for p, w in pairs) / len(pairs)
    metrics: dict[str, Any] = {"n": len(images), "accuracy": accuracy,
                               "all_correct": sum(all(predicted[a][i] == w[a] for a in w)
                                                  for i, w in enumerate(wanted)) / len(wanted),
                               "predicted": [{a: predicted[a][i] for a in ATTRIBUTES} for i in range(len(wanted))]}
    if masks is not None:
        truth = torch.as_tensor(masks).bool()
        inter = (predicted["mask"] & truth).flatten(1).sum(1).float()
        union = (predicted["mask"] | truth).flatten(1).sum(1).clamp(min=1).float()
        metrics["mask_iou"] = float((inter / union).mean())
    return metrics
