"""The second instrument: reads a shapes-world image by geometry, with nothing trained.

The object is the pixels far from the grey axis (every background is a faintly tinted grey and every
palette colour is saturated: colour distance from the background), split by Otsu's threshold. Its shape is
the renderer's own shape whose mask, placed on the object's centroid at the radius its area implies (x0.85,
x1, x1.15) and turned by up to 20 degrees, overlaps it best (IoU); below that shape's floor (`FLOORS`), with
no object, or with two objects, the reading is "none". Colour is the nearest palette colour to the object's median (Lab);
background the renderer's pattern, over its phases, that best correlates with the grey level around the
object; position and size come from the centroid and the matched radius.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from studio.world.render import CENTRES, RADII, pattern
from studio.world.vocab import ATTRIBUTES, BACKGROUNDS, COLOURS, NO_SHAPE, SHAPES

# Below its floor a match reads "none". Renders match their own shape at >= 0.85; generated shapes much less
# (fat moons, half-filled rings) and lumps that are no shape reach 0.9 on a circle, so each floor is fitted on
# the labelled set's calibration half (`bench/instruments.py --calibrate`; 0.7 each before).
FLOORS = {"circle": 0.9, "square": 0.81, "triangle": 0.76, "cross": 0.7, "diamond": 0.91, "ring": 0.5, "star": 0.85,
          "heart": 0.87, "moon": 0.5}
MIN_CHROMA = 40.0  # of 255: the least an object pixel stands off the grey axis (the palette: 130-225)
MIN_AREA = 10  # pixels; fewer is no object
TEMPLATE_RADIUS = 16  # pixels of the template masks (objects are 7-15 px in radius: little aliasing)
SCALES = (0.85, 1.0, 1.15)
ANGLES = (-20.0, -10.0, 0.0, 10.0, 20.0)
PLAIN_STD = 0.02  # grey-level spread (of 1) below which a background is plain


@lru_cache(maxsize=1)
def _templates() -> dict[str, tuple[np.ndarray, float, np.ndarray]]:
    """Per shape: its coverage on a (4R, 4R) canvas centred at (2R, 2R), its area per radius squared, and its
    centroid's offset from the centre in radii."""
    from studio.world.render import coverage

    side = 4 * TEMPLATE_RADIUS
    out = {}
    for shape in SHAPES:
        mask = coverage(shape, side, 0.5, 0.5, 0.25)  # radius = a quarter of the side = TEMPLATE_RADIUS px
        ys, xs = np.nonzero(mask > 0.5)
        offset = np.array([xs.mean() + 0.5 - side / 2, ys.mean() + 0.5 - side / 2]) / TEMPLATE_RADIUS
        out[shape] = (mask.astype(np.float32), float((mask > 0.5).sum()) / TEMPLATE_RADIUS**2, offset)
    return out


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[str, np.ndarray]]:
    """Every patterned background at phases 0..15.5 (gradients in both orientations), flattened."""
    out = []
    for kind in BACKGROUNDS:
        if kind == "plain":
            continue
        if kind == "gradient":
            variants = [pattern(kind, 64, 0, axis=a) for a in (0, 1)]
        else:
            variants = [pattern(kind, 64, p) for p in np.arange(0, 16, 0.5)]
        out += [(kind, v.ravel()) for v in variants]
    return out


@lru_cache(maxsize=1)
def _palette_lab() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    return names, _lab(np.array([COLOURS[n] for n in names], dtype=np.float32)[None] / 255)[0]


def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2Lab)


def segment(pixels: np.ndarray) -> np.ndarray:
    """The object's pixels of a uint8 (H, W, 3) image: chroma (max - min channel) above Otsu's split and
    `MIN_CHROMA`, as a bool (H, W) mask (empty when nothing stands off the background)."""
    import cv2

    rgb = pixels.astype(np.float32)
    chroma = rgb.max(-1) - rgb.min(-1)
    if chroma.max() < MIN_CHROMA:
        return np.zeros(chroma.shape, dtype=bool)
    scaled = np.clip(chroma, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return chroma > max(float(otsu), MIN_CHROMA)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected parts of `mask` (8-connected), largest first."""
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    parts = [labels == k for k in range(1, count)]
    return sorted(parts, key=lambda p: -int(p.sum()))


def match_shape(mask: np.ndarray) -> tuple[str, float, float, dict[str, float]]:
    """The shape whose placed template overlaps `mask` best: (shape, IoU, radius in px, best IoU per shape)."""
    import cv2

    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    centroid = np.array([xs.mean(), ys.mean()])  # pixel-index coordinates, as cv2 uses
    h, w = mask.shape
    scores: dict[str, float] = {}
    radii: dict[str, float] = {}
    for shape, (template, unit_area, offset) in _templates().items():
        best, best_radius = 0.0, 0.0
        for scale in SCALES:
            radius = np.sqrt(area / unit_area) * scale
            for angle in ANGLES:
                rotation = cv2.getRotationMatrix2D((0.0, 0.0), -angle, 1.0)[:, :2]  # turns image coordinates
                centre = centroid - rotation @ offset * radius
                k = radius / TEMPLATE_RADIUS
                # template pixel (u, v) -> image: centre + k * R(angle) @ ((u, v) - its centre)
                matrix = np.hstack([k * rotation, (centre - k * rotation @ np.full(2, 2.0 * TEMPLATE_RADIUS - 0.5))[:, None]])
                placed = cv2.warpAffine(template, matrix.astype(np.float32), (w, h), flags=cv2.INTER_LINEAR) > 0.5
                union = (placed | mask).sum()
                iou = float((placed & mask).sum() / union) if union else 0.0
                if iou > best:
                    best, best_radius = iou, radius
        scores[shape], radii[shape] = best, best_radius
    shape = max(scores, key=scores.get)
    return shape, scores[shape], radii[shape], scores


def _background(pixels: np.ndarray, mask: np.ndarray) -> str:
    import cv2

    around = ~cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    grey = pixels.astype(np.float32).mean(-1).ravel() / 255
    keep = around.ravel()
    values = grey[keep]
    if values.size < 64 or values.std() < PLAIN_STD:  # (an object covering nearly everything leaves no pattern)
        return "plain"
    centred = values - values.mean()
    best, best_kind = -1.0, "plain"
    for kind, amount in _patterns():
        a = amount[keep] - amount[keep].mean()
        denominator = np.sqrt((a * a).sum() * (centred * centred).sum())
        if denominator == 0:
            continue
        score = float((a * centred).sum() / denominator)
        score = abs(score) if kind == "gradient" else -score  # the ink is darker than the base
        if score > best:
            best, best_kind = score, kind
    return best_kind


def decide(reading: dict[str, Any], floors: dict[str, float] | None = None) -> str:
    """The shape a reading says: its best match, or "none" with no object, two objects, or a match below
    that shape's floor (`FLOORS` unless given)."""
    if reading.get("best") is None or reading["two"] or reading["iou"] < (floors or FLOORS)[reading["best"]]:
        return NO_SHAPE
    return reading["best"]


def read(image: Any) -> dict[str, Any]:
    """One image (PIL or uint8 (64, 64, 3)) read by geometry: every attribute, the mask, the best match
    ("best", its "iou") and whether there are "two" objects."""
    from studio.world.render import as_pixels

    pixels = as_pixels(image)
    found = segment(pixels)
    parts = [p for p in _components(found) if p.sum() >= MIN_AREA]
    reading: dict[str, Any] = {"mask": found, "iou": 0.0}
    if not parts:
        return {**reading, "shape": NO_SHAPE, "colour": NO_SHAPE, "background": _background(pixels, found),
                "position": NO_SHAPE, "size": NO_SHAPE}
    # a part over a quarter of the largest is a second object (a ring's halves would be one 8-connected part)
    two = len(parts) > 1 and parts[1].sum() > 0.25 * parts[0].sum()
    obj = parts[0]
    best, iou, radius, _ = match_shape(obj)
    reading.update(iou=iou, best=best, two=two)
    shape = decide(reading)
    import cv2

    core = cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    colour_pixels = pixels[core if core.sum() >= 4 else obj].astype(np.float32) / 255
    names, palette = _palette_lab()
    lab = _lab(np.median(colour_pixels, axis=0)[None, None])[0, 0]
    weights = np.array([0.5, 1.0, 1.0])  # lightness counts half: generated colours drift in lightness
    colour = names[int(np.argmin((((palette - lab) * weights) ** 2).sum(-1)))]
    ys, xs = np.nonzero(obj)
    side = pixels.shape[0]
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / side
    position = min(CENTRES, key=lambda p: float(((np.array(CENTRES[p]) - centre) ** 2).sum()))
    size = "large" if radius / side > (RADII["small"] + RADII["large"]) / 2 else "small"
    return {**reading, "shape": shape, "colour": colour, "background": _background(pixels, found),
            "position": position, "size": size}


def predict(images: Sequence[Any]) -> dict[str, Any]:
    """Per image, as `studio.world.evaluator.predict` returns: every attribute's value, and the mask."""
    import torch

    readings = [read(image) for image in images]
    result: dict[str, Any] = {a: [r[a] for r in readings] for a in (*ATTRIBUTES, "iou")}
    result["mask"] = torch.from_numpy(np.stack([r["mask"] for r in readings])) if readings else torch.zeros(0)
    return result
