"""Procedural renders of the shapes world with exact labels and masks.

Each image is one coloured shape on a patterned light background. Shapes are drawn at 4x and
averaged down (anti-aliased edges); the mask is the shape's coverage above one half.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from studio.world.vocab import BACKGROUNDS, COLOURS, VALUES, Labels, base_values

SUPERSAMPLE = 4
CENTRES = {"centre": (0.5, 0.5), "top left": (0.28, 0.28), "top right": (0.72, 0.28),
           "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
RADII = {"small": 0.13, "large": 0.21}  # fraction of the image side


def _polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test over a grid of points."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > v) != (y0 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (v - y1) / (y0 - y1) + x1
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _star_vertices(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart_vertices(n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x / 16.5, (y + 2.5) / 15.5], axis=1)  # centred, about unit radius


_TRIANGLE = np.array([(0.0, -0.95), (0.95, 0.72), (-0.95, 0.72)])
_STAR = _star_vertices()
_HEART = _heart_vertices()

# (u, v) are offsets from the shape's centre in units of its radius, v pointing down.
SHAPE_TESTS = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.82,
    "triangle": lambda u, v: _polygon(u, v, _TRIANGLE),
    "cross": lambda u, v: ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95)),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.0,
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
    "star": lambda u, v: _polygon(u, v, _STAR),
    "heart": lambda u, v: _polygon(u, v, _HEART),
    "moon": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.78**2),
}


def pattern(kind: str, size: int, phase: float, *, axis: int = 0, flip: bool = False) -> np.ndarray:
    """How much of the pattern's darker ink covers each pixel, (H, W) in [0, 1]; `phase` shifts it (pattern
    units of a 64 px image), `axis` (0: x, 1: y) and `flip` orient the gradient."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size * 64  # pattern units of a 64 px image
    if kind == "plain":
        return np.zeros_like(x)
    if kind == "stripes":  # diagonal bands, 8 px period
        return (((x + y + phase) % 8) < 4).astype(np.float32)
    if kind == "dots":
        px, py = (x + phase) % 10 - 5, (y + phase) % 10 - 5
        return (px**2 + py**2 <= 2.2**2).astype(np.float32)
    if kind == "grid":
        return ((((x + phase) % 10) < 1.5) | (((y + phase) % 10) < 1.5)).astype(np.float32)
    if kind == "gradient":
        t = (x if axis == 0 else y) / 64
        return 1 - t if flip else t
    if kind == "checker":  # 8 px squares
        return ((((x + phase) // 8) + ((y + phase) // 8)) % 2).astype(np.float32)
    if kind == "waves":  # horizontal bands bent by a sine
        return (np.sin(2 * np.pi * (y + 2.5 * np.sin(2 * np.pi * x / 16) + phase) / 8) > 0).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A light patterned background, (H, W, 3) float in [0, 1]."""
    base = rng.uniform(0.80, 0.95) + rng.uniform(-0.03, 0.03, size=3)  # light, faintly tinted grey
    ink = base - rng.uniform(0.22, 0.32)  # the pattern: the same tint, darker
    phase = rng.uniform(0, 16)
    axis, flip = (int(rng.random() >= 0.5), rng.random() >= 0.5) if kind == "gradient" else (0, False)
    amount = pattern(kind, size, phase, axis=axis, flip=flip)
    return np.clip(base[None, None, :] * (1 - amount[..., None]) + ink[None, None, :] * amount[..., None], 0, 1)


def coverage(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """The fraction of each pixel that `shape` covers at centre (cx, cy) and `radius` (fractions of the
    side), (H, W) float: drawn at SUPERSAMPLE x and averaged down."""
    fine = size * SUPERSAMPLE
    y, x = (np.mgrid[0:fine, 0:fine].astype(np.float32) + 0.5) / fine
    covered = SHAPE_TESTS[shape]((x - cx) / radius, (y - cy) / radius).astype(np.float32)
    return covered.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def layers(labels: Labels, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `render` composes: background (H, W, 3), the shape's coverage (H, W) and its colour (3,), floats
    in [0, 1]."""
    rng = np.random.default_rng(seed)
    cx, cy = CENTRES[labels.position]
    cx, cy = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.03, 0.03)
    radius = RADII[labels.size] * rng.uniform(0.92, 1.08)
    alpha = coverage(labels.shape, size, cx, cy, radius)
    background = _background(labels.background, size, rng)
    return background, alpha, np.array(COLOURS[labels.colour], dtype=np.float32) / 255


def compose(background: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The image of a shape of `colour` covering `alpha` of `background`, uint8 (H, W, 3)."""
    image = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def render(labels: Labels, size: int = 64, seed: int = 0):
    """One image of `labels` and its object mask: (PIL RGB image, (size, size) bool array)."""
    from PIL import Image

    background, alpha, colour = layers(labels, size, seed)
    return Image.fromarray(compose(background, alpha, colour), "RGB"), alpha > 0.5


def sample_labels(rng: np.random.Generator, *, held_out: bool = False, **fixed: str) -> Labels:
    """Random labels: base values only unless `held_out`; `fixed` pins attributes (shape="star")."""
    values = {a: (VALUES[a] if held_out else base_values(a)) for a in VALUES}
    chosen = {a: fixed.get(a) or str(rng.choice(values[a])) for a in VALUES}
    return Labels(**chosen)


__all__ = ["BACKGROUNDS", "compose", "coverage", "layers", "pattern", "render", "sample_labels", "SHAPE_TESTS"]


def as_pixels(image: Any) -> np.ndarray:
    """A PIL image, a uint8 array (H, W, 3) or a float tensor (3, H, W) in [-1, 1] as uint8 (64, 64, 3);
    another size is resized (a note on the log), anything that is not an image is refused by name."""

    import torch

    from studio.errors import InvalidArgumentError

    if isinstance(image, torch.Tensor):
        image = image.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
    if hasattr(image, "convert"):
        image = image.convert("RGB")
        if image.size != (64, 64):
            _note_resize(image.size)
            image = image.resize((64, 64))
        return np.asarray(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise InvalidArgumentError(f"cannot read an image from {type(image).__name__} of shape "
                                   f"{getattr(array, 'shape', None)} and dtype {array.dtype}; give PIL images or "
                                   f"uint8 arrays (H, W, 3).")
    if array.shape[:2] != (64, 64):
        from PIL import Image

        _note_resize(array.shape[1::-1])
        return np.asarray(Image.fromarray(array).resize((64, 64)))
    return array


def _note_resize(size: tuple[int, int]) -> None:
    import logging

    logging.getLogger("studio.world").info("the instruments read 64x64 images: resizing one of %dx%d", *size)
