"""Limits declared once: image pixels on read, generation size by family, rank by layer width, counts >= 1.

The CLI, the API, recipe files (YAML/TOML), recipe PNGs and the web UI all go through these, so a bad number is
refused the same way wherever it comes from, before any model loads or any weight changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from studio.errors import InvalidArgumentError, InvalidSizeError, StudioError

# 8192 x 8192: above any photo a user trains from (a 61 MP camera is 9504 x 6336 = 60 MP) and far below what
# Pillow's own default refuses only at 2 x 89 MP; a 312-byte PNG may declare 20000 x 20000 (400 MP)
MAX_IMAGE_PIXELS = 8192 * 8192
# a family's largest side: 4 x its native side (SD1.5 512 -> 2048, SDXL/Flux 1024 -> 4096; the 64-pixel world
# models 256), as A1111's sliders stop at 2048 for SD1.5; past that a UNet repeats its subject and the memory
# of one image (the attention of a 4096 x 4096 SDXL latent) outgrows an 80 GB card
SIDE_FACTOR = 4


class ImageTooLargeError(StudioError, ValueError):
    """An image whose header declares more pixels than MAX_IMAGE_PIXELS (a decompression bomb)."""


def check_image_pixels(width: int, height: int, source: str | Path) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{str(source)!r} declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), "
                                 f"over studio's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP; resize it (e.g. to 2048 "
                                 f"on its long side).")


def open_image(source: Any, name: str | Path | None = None):
    """PIL's Image.open for any image a user hands studio (a path or a file object): refuses, before decoding, one
    whose header declares more than MAX_IMAGE_PIXELS (PIL warns at 89 MP and raises only past 179 MP, as an
    error type callers do not expect)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageTooLargeError(f"{str(name or source)!r} is over studio's limit of "
                                     f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP ({error}); resize it.") from None
    try:
        check_image_pixels(*image.size, name or source)
    except ImageTooLargeError:
        image.close()
        raise
    return image


def check_generation_size(name: str, value: Any, default_size: int, family: str) -> None:
    """A generated image's width or height within its family's limit (the pipeline checks the multiple)."""
    limit = SIDE_FACTOR * default_size
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise InvalidSizeError(f"{name}={value} is over the {family} limit of {limit} pixels ({SIDE_FACTOR} x its "
                               f"native {default_size}); generate at {default_size} and upscale instead.")


def check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    """A whole-number option >= `minimum` (a bool, a float or text such as "many" is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name}={value!r} must be a whole number >= {minimum}.")
    return value


def check_rank(rank: int, widths: Iterable[int], *, what: str = "rank") -> None:
    """A LoRA rank is at most the widest targeted layer's smaller side: past it every layer is stored as a
    full-size copy (rank 4096 on 64-wide layers: 272 MB) and learns nothing more."""
    widest = max(widths, default=0)
    if widest and rank > widest:
        raise InvalidArgumentError(f"{what}={rank} is more than the widest layer it adapts ({widest}): every layer "
                                   f"would be a full-size copy; use {what} <= {widest} (e.g. {min(16, widest)}).")
