"""Renders made to look generated, for training the evaluator to read what the backbones draw.

Generated shapes are blurred, thickened or thinned, bent, ragged at the edge and unevenly coloured, with
the colour bleeding into a soft, low-contrast pattern; and sometimes there is no single clear shape at all
(nothing, two shapes, a blob). `generation_like` imitates the first from a render's layers
(`studio.world.render.layers`); `no_shape` draws the second. The evaluator's trainer passes half of both
through the world VAE as well.
"""

from __future__ import annotations

import numpy as np

from studio.world.render import CENTRES, RADII, compose, coverage, layers, sample_labels
from studio.world.vocab import COLOURS, SHAPES

LUMP_IOU = 0.85  # a lump that matches a world shape's render better than this is redrawn


def _smooth_field(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency noise (H, W): normal values on a cells x cells grid, upsampled bicubically."""
    import cv2

    coarse = rng.normal(0, amplitude, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma > 0.05 else image


def bend(alpha: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """An elastic bend: `alpha` resampled along a smooth random displacement of about `strength` pixels."""
    import cv2

    size = alpha.shape[0]
    dx, dy = (_smooth_field(rng, size, int(rng.integers(3, 6)), strength) for _ in range(2))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return cv2.remap(alpha.astype(np.float32), x + dx, y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def reshape_edge(alpha: np.ndarray, rng: np.random.Generator, *, sigma: float, level: float,
                 roughness: float) -> np.ndarray:
    """Dilation (level < 0.5) or erosion (> 0.5) with a ragged edge: `alpha` blurred by `sigma`, plus smooth
    noise of `roughness`, cut at `level`, with a pixel of soft edge."""
    soft = _blur(alpha.astype(np.float32), sigma) + _smooth_field(rng, alpha.shape[0], 12, roughness)
    return np.clip((soft - level) / 0.12 + 0.5, 0, 1)


def generation_like(background: np.ndarray, alpha: np.ndarray, colour: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One render's layers made to look generated: the image, uint8 (H, W, 3), and the shape's new coverage
    (H, W). Each change is drawn independently, so plain renders stay among the outputs."""
    size = alpha.shape[0]
    if rng.random() < 0.6:
        alpha = bend(alpha, rng, rng.uniform(0.3, 1.3))
    if rng.random() < 0.7:
        alpha = reshape_edge(alpha, rng, sigma=rng.uniform(0.5, 1.8), level=rng.uniform(0.3, 0.65),
                             roughness=rng.uniform(0.0, 0.05))  # more reads as a lump (the labelled set)
    alpha = _blur(alpha, rng.uniform(0, 1.0))
    if rng.random() < 0.5:  # uneven colour: lighter and darker patches, a drift of hue
        colour = colour[None, None] * (1 + _smooth_field(rng, size, 4, 0.08))[..., None] + rng.normal(0, 0.05, 3)
    else:
        colour = colour + rng.normal(0, 0.05, 3)
    colour = np.clip(colour * rng.uniform(0.85, 1.08), 0, 1)
    if rng.random() < 0.5:  # a soft, low-contrast pattern
        mean = background.mean(axis=(0, 1), keepdims=True)
        background = mean + (background - mean) * rng.uniform(0.55, 1.1)
        background = _blur(background, rng.uniform(0.3, 1.2))
    if rng.random() < 0.4:  # colour bleeding into the background around the shape
        halo = _blur(alpha, rng.uniform(1.5, 3.5)) * rng.uniform(0.1, 0.35)
        tint = colour if colour.ndim == 1 else colour.mean(axis=(0, 1))
        background = background * (1 - halo[..., None]) + tint * halo[..., None]
    image = compose(background, alpha, colour).astype(np.float32) / 255
    image = _blur(image, rng.uniform(0, 0.7) if rng.random() < 0.5 else 0.0)
    image = image + rng.normal(0, rng.uniform(0, 0.025), image.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), alpha


def _outline(rng: np.random.Generator, size: int, inside) -> np.ndarray:
    """Coverage of `inside(u, v)` (offsets in radii) at a random world position and size."""
    fine = size * 4
    cx, cy = CENTRES[str(rng.choice(list(CENTRES)))]
    radius = RADII[str(rng.choice(list(RADII)))] * rng.uniform(0.8, 1.2)
    y, x = (np.mgrid[0:fine, 0:fine].astype(np.float32) + 0.5) / fine
    covered = inside((x - cx) / radius, (y - cy) / radius).astype(np.float32)
    return covered.reshape(size, 4, size, 4).mean(axis=(1, 3))


def _lump(rng: np.random.Generator):
    """A lump: a disc whose edge carries a few random harmonics (a rounded polygon with bumps, the commonest
    failure of the world backbones), from nearly round to spiky."""
    amplitudes = rng.dirichlet(np.ones(5)) * rng.uniform(0.15, 0.9)
    phases = rng.uniform(0, 2 * np.pi, 5)
    stretch = rng.uniform(0.8, 1.25)

    def inside(u, v):
        theta = np.arctan2(v, u * stretch)
        edge = 1 + sum(a * np.cos(k * theta + f) for k, a, f in zip(range(3, 8), amplitudes, phases, strict=True))
        return np.hypot(u * stretch, v) <= edge

    return inside


def _not_a_world_shape(rng: np.random.Generator):
    """Shapes outside the nine: a world shape turned out of its pose (a triangle on its tip, a moon opening
    up or left, a heart on its side) or a star of 4 or 6 points."""
    from studio.world.render import SHAPE_TESTS, _polygon, _star_vertices

    if rng.random() < 0.4:
        vertices = _star_vertices(points=int(rng.choice([4, 6])), inner=rng.uniform(0.35, 0.6))
        return lambda u, v: _polygon(u, v, vertices)
    test = SHAPE_TESTS[str(rng.choice(["triangle", "heart", "moon"]))]
    angle = rng.uniform(np.pi / 2, 3 * np.pi / 2)
    c, s = np.cos(angle), np.sin(angle)
    return lambda u, v: test(c * u + s * v, -s * u + c * v)


def no_shape(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, str | None]]:
    """An image with no single clear shape, generation-like, its objects' coverage, and what is still known
    of it (colour None when there is none or two; background always): nothing, two shapes, or a blob that no
    world shape matches (a lump, or a shape that is none of the nine)."""
    from studio.world.geometry import match_shape

    labels = sample_labels(rng, held_out=True)
    background, _, colour = layers(labels, size, int(rng.integers(2**31)))
    kind = rng.choice(["nothing", "two", "lump", "other"], p=[0.15, 0.25, 0.4, 0.2])
    known: dict[str, str | None] = {"colour": labels.colour, "background": labels.background}
    if kind == "nothing":
        alpha = np.zeros((size, size), dtype=np.float32)
        known["colour"] = None
    elif kind == "two":  # the second drawn over the first, in the same colour or another
        first, second = (CENTRES[str(p)] for p in rng.choice(list(CENTRES), size=2, replace=False))
        alpha = coverage(str(rng.choice(SHAPES)), size, *first, RADII["small"] * rng.uniform(0.8, 1.0))
        drawn, first_alpha = generation_like(background, alpha, colour, rng)
        background = drawn.astype(np.float32) / 255
        alpha = coverage(str(rng.choice(SHAPES)), size, *second, RADII["small"] * rng.uniform(0.8, 1.0))
        if rng.random() < 0.5:
            known["colour"] = None
            colour = np.array(COLOURS[str(rng.choice([c for c in COLOURS if c != labels.colour]))], np.float32) / 255
    elif kind == "other":
        alpha = _outline(rng, size, _not_a_world_shape(rng))
    else:
        while True:  # lumps that overlap a render of a world shape at IoU >= 0.85 look like that shape
            alpha = _outline(rng, size, _lump(rng))
            if match_shape(alpha > 0.5)[1] < LUMP_IOU:
                break
    image, alpha = generation_like(background, alpha, colour, rng)
    if kind == "two":
        alpha = np.maximum(alpha, first_alpha)
    return image, alpha, known
