"""Procedural renders of the shapes world with exact labels and masks.

Each image is one coloured shape on a patterned light background. Shapes are drawn at 4x and
averaged down (anti-aliased edges); the mask is the shape's coverage above one half.
"""

from __future__ import annotations

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


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A light patterned background, (H, W, 3) float in [0, 1]."""
    base = rng.uniform(0.80, 0.95) + rng.uniform(-0.03, 0.03, size=3)  # light, faintly tinted grey
    ink = base - rng.uniform(0.22, 0.32)  # the pattern: the same tint, darker
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size * 64  # pattern units of a 64 px image
    phase = rng.uniform(0, 16)
    if kind == "plain":
        amount = np.zeros_like(x)
    elif kind == "stripes":  # diagonal bands, 8 px period
        amount = (((x + y + phase) % 8) < 4).astype(np.float32)
    elif kind == "dots":
        px, py = (x + phase) % 10 - 5, (y + phase) % 10 - 5
        amount = (px**2 + py**2 <= 2.2**2).astype(np.float32)
    elif kind == "grid":
        amount = ((((x + phase) % 10) < 1.5) | (((y + phase) % 10) < 1.5)).astype(np.float32)
    elif kind == "gradient":
        t = x / 64 if rng.random() < 0.5 else y / 64
        amount = t if rng.random() < 0.5 else 1 - t
    elif kind == "checker":  # 8 px squares
        amount = ((((x + phase) // 8) + ((y + phase) // 8)) % 2).astype(np.float32)
    elif kind == "waves":  # horizontal bands bent by a sine
        amount = (np.sin(2 * np.pi * (y + 2.5 * np.sin(2 * np.pi * x / 16) + phase) / 8) > 0).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(base[None, None, :] * (1 - amount[..., None]) + ink[None, None, :] * amount[..., None], 0, 1)


def render(labels: Labels, size: int = 64, seed: int = 0):
    """One image of `labels` and its object mask: (PIL RGB image, (size, size) bool array)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    cx, cy = CENTRES[labels.position]
    cx, cy = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.03, 0.03)
    radius = RADII[labels.size] * rng.uniform(0.92, 1.08)
    fine = size * SUPERSAMPLE
    y, x = (np.mgrid[0:fine, 0:fine].astype(np.float32) + 0.5) / fine
    covered = SHAPE_TESTS[labels.shape]((x - cx) / radius, (y - cy) / radius).astype(np.float32)
    alpha = covered.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))  # (H, W)
    background = _background(labels.background, size, rng)
    colour = np.array(COLOURS[labels.colour], dtype=np.float32) / 255
    image = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    pixels = np.round(image * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), alpha > 0.5


def sample_labels(rng: np.random.Generator, *, held_out: bool = False, **fixed: str) -> Labels:
    """Random labels: base values only unless `held_out`; `fixed` pins attributes (shape="star")."""
    values = {a: (VALUES[a] if held_out else base_values(a)) for a in VALUES}
    chosen = {a: fixed.get(a) or str(rng.choice(values[a])) for a in VALUES}
    return Labels(**chosen)


__all__ = ["BACKGROUNDS", "render", "sample_labels", "SHAPE_TESTS"]
