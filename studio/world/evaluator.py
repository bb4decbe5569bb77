"""The instrument: a small CNN that reads every attribute and the object mask of a 64x64 image.

It is trained on renders made to look generated (blurred, bent, thickened or thinned, ragged, unevenly
coloured: `studio.world.augment`), half of them passed through the world VAE, and on images with no single
clear shape, which it reads as shape "none". It is checked against an eye-labelled set of generated images
(`studio.world.labelled`) and read beside a second instrument that needs no training (`studio.world.geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from studio.world import ASSETS
from studio.world.render import as_pixels
from studio.world.vocab import ATTRIBUTES, NO_SHAPE, VALUES, Labels

# what the evaluator can read: every value, and for the shape also that there is none
OUTCOMES = {**{a: list(v) for a, v in VALUES.items()}, "shape": [*VALUES["shape"], NO_SHAPE]}


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class WorldEvaluator(ModelMixin, ConfigMixin):
    """Image (B, 3, 64, 64) in [-1, 1] -> logits per attribute and mask logits (B, 64, 64). `values` names each
    head's outcomes (`OUTCOMES`; an evaluator saved before there was a "none" outcome has only `classes`);
    `predict` reads a shape whose probability is below `none_below` as "none" (fitted on the labelled set's
    calibration half: `bench/instruments.py --calibrate`)."""

    @register_to_config
    def __init__(self, width: int = 32, classes: dict[str, int] | None = None,
                 values: dict[str, list[str]] | None = None, none_below: float = 0.0):
        super().__init__()
        classes = {a: len(v) for a, v in values.items()} if values else classes or {a: len(v) for a, v in VALUES.items()}
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

    @property
    def outcomes(self) -> dict[str, list[str]]:
        return dict(self.config.values) if self.config.values else {a: list(v) for a, v in VALUES.items()}


@lru_cache(maxsize=2)
def load_evaluator(folder: str | None = None) -> WorldEvaluator:
    """The shipped evaluator (assets/world/evaluator), in fp32 and eval mode."""
    from studio.errors import StudioError

    path = Path(folder) if folder else ASSETS / "evaluator"
    if not (path / "config.json").is_file():
        raise StudioError(f"no evaluator at {path}; train one with `studio world train --model evaluator`.")
    return WorldEvaluator.from_pretrained(path, dtype=torch.float32).eval()


def images_to_tensor(images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3), or a float tensor in [-1, 1] -> (B, 3, 64, 64) in [-1, 1]."""

    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = np.stack([as_pixels(im) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def shape_outcomes(probabilities: torch.Tensor, names: Sequence[str], none_below: float) -> list[str]:
    """The shape read from each row of probabilities (B, outcomes): the likeliest, or "none" below
    `none_below`."""
    confidence, index = probabilities.max(-1)
    return [NO_SHAPE if c < none_below else names[int(k)] for c, k in zip(confidence, index, strict=True)]


@torch.no_grad()
def predict(images: Sequence[Any] | torch.Tensor, *, evaluator: WorldEvaluator | None = None,
            batch: int = 256) -> dict[str, Any]:
    """Per image: the predicted value of every attribute, and the mask (bool (B, 64, 64))."""
    model = evaluator or load_evaluator()
    x = images_to_tensor(images)
    outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    names = model.outcomes
    result: dict[str, Any] = {a: [names[a][int(k)] for o in outs for k in o[a].argmax(-1)] for a in ATTRIBUTES}
    if model.config.none_below and NO_SHAPE in names["shape"]:
        result["shape"] = shape_outcomes(torch.cat([o["shape"] for o in outs]).softmax(-1), names["shape"],
                                         model.config.none_below)
    result["mask"] = torch.cat([o["mask"] for o in outs]) > 0
    return result


DISAGREEMENT = 0.10  # a row whose two readings disagree on more of its images than this is flagged


def _scores(predicted: dict[str, Any], wanted: list[dict[str, str]]) -> dict[str, Any]:
    accuracy: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        pairs = [(p, w[attribute]) for p, w in zip(predicted[attribute], wanted, strict=True) if attribute in w]
        if pairs:
            accuracy[attribute] = sum(p == w for p, w in pairs) / len(pairs)
    return {"accuracy": accuracy,
            "all_correct": sum(all(predicted[a][i] == w[a] for a in w) for i, w in enumerate(wanted)) / len(wanted),
            "predicted": [{a: predicted[a][i] for a in ATTRIBUTES} for i in range(len(wanted))]}


def evaluate(images: Sequence[Any] | torch.Tensor, expected: Sequence[Labels | dict[str, str]], *,
             masks: torch.Tensor | None = None, evaluator: WorldEvaluator | None = None,
             second: bool = True) -> dict[str, Any]:
    """Accuracy per attribute named in `expected` (all five for Labels) and, with true `masks`, mask IoU.

    With `second` (the default) the images are also read by the geometric instrument (`geometry`): its
    accuracy, and per attribute the `agreement`, the share of images on which both instruments agree that the
    expected value is (or is not) there; attributes agreeing on less than 1 - DISAGREEMENT are `flagged`."""
    if len(expected) != len(images):
        from studio.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{len(images)} images but {len(expected)} expected labels; give one per image.")
    wanted = [e.as_dict() if isinstance(e, Labels) else dict(e) for e in expected]
    predicted = predict(images, evaluator=evaluator)
    metrics: dict[str, Any] = {"n": len(images), **_scores(predicted, wanted)}
    if masks is not None:
        truth = torch.as_tensor(masks).bool()
        inter = (predicted["mask"] & truth).flatten(1).sum(1).float()
        union = (predicted["mask"] | truth).flatten(1).sum(1).clamp(min=1).float()
        metrics["mask_iou"] = float((inter / union).mean())
    if second:
        from studio.world import geometry

        seen = geometry.predict([images[i] for i in range(len(images))])
        metrics["geometric"] = _scores(seen, wanted)
        metrics["agreement"] = {
            a: sum((predicted[a][i] == w[a]) == (seen[a][i] == w[a]) for i, w in enumerate(wanted) if a in w)
            / max(1, sum(a in w for w in wanted)) for a in metrics["accuracy"]}
        metrics["flagged"] = [a for a, v in metrics["agreement"].items() if v < 1 - DISAGREEMENT]
    return metrics


def readings(metrics: dict[str, Any], attribute: str) -> str:
    """One table cell with both readings of `attribute`: "0.81 / 0.78" (evaluator / geometry), with a "!"
    when the two disagree on more than DISAGREEMENT of the images."""
    first = metrics["accuracy"][attribute]
    if "geometric" not in metrics:
        return f"{first:.2f}"
    flag = " !" if attribute in metrics["flagged"] else ""
    return f"{first:.2f} / {metrics['geometric']['accuracy'][attribute]:.2f}{flag}"
