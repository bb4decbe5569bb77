"""Reference folders in kohya's conventions, bucketed by aspect ratio, encoded once and cached.

A folder holds images directly, or `N_words` subfolders (kohya/DreamBooth): N is how often each
image repeats per epoch, `words` the trigger and class words ("10_sks star"). An image's caption is
its `.txt` or `.caption` file, else the subfolder's words, else the trigger word. An image's mask
(for masked loss) is `NAME.mask.png` beside it (white = subject), else its alpha channel. Unreadable
images, images smaller than the training size and masks that do not fit their image are skipped and
listed; a folder with nothing usable is an error that says what it found.

Latents and text conditioning are cached under `$STUDIO_HOME/cache/train`, keyed by the content
hash of the image (or caption), the backbone's fingerprint, the bucket and the flip, so a second run
on the same folder encodes nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import InvalidArgumentError, StudioError
from studio.home import atomic_path
from studio.images import IMAGE_SUFFIXES, encode_images, fit  # noqa: F401  (the training data's names too)

if TYPE_CHECKING:
    import torch
    from PIL import Image

CAPTION_SUFFIXES = (".txt", ".caption")
MASK_SUFFIX = ".mask.png"


class DatasetError(StudioError, ValueError):
    """A training folder studio cannot train on."""


@dataclass
class Item:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height)
    sha256: str
    regularisation: bool = False
    mask: Path | None = None  # NAME.mask.png, or the image itself when it has an alpha channel


@dataclass
class Scan:
    """What a folder scan found: usable items and the files it skipped, with why."""

    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _caption_of(image: Path, words: str, trigger: str) -> str:
    for suffix in CAPTION_SUFFIXES:
        side = image.with_suffix(suffix)
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
    return words or trigger


def _mask_of(image: Path, size: tuple[int, int], has_alpha: bool) -> tuple[Path | None, str | None]:
    """(mask path, None) or (None, why the mask cannot be used)."""
    from PIL import UnidentifiedImageError

    from studio.limits import ImageTooLargeError, open_image

    side = image.with_name(image.stem + MASK_SUFFIX)
    if not side.is_file():
        return (image if has_alpha else None), None
    try:
        with open_image(side) as mask:
            mask.load()
            mask_size = mask.size
    except ImageTooLargeError:
        return None, f"its mask {side.name} is over the pixel limit; save it at the image's size"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return None, f"its mask {side.name} is unreadable ({type(error).__name__}); re-save it as a grey PNG"
    if mask_size != size:
        return None, (f"its mask {side.name} is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}; "
                      f"save the mask at the image's size")
    return side, None


def folder_trigger(folder: str | Path) -> str:
    """The trigger word a kohya-layout folder names: the first word of its `N_words` subfolders when they
    all share it ("10_sks" -> "sks"); "" otherwise."""
    folder = Path(folder)
    words = {m[1] for sub in (folder.iterdir() if folder.is_dir() else ()) if sub.is_dir()
             for m in [re.fullmatch(r"\d+_(\S+).*", sub.name)] if m}
    return words.pop() if len(words) == 1 else ""


def scan_folder(folder: str | Path, *, trigger: str = "", min_size: int = 0, regularisation: bool = False) -> Scan:
    """Every image under `folder` (kohya `N_words` subfolders or flat) with caption and repeats."""
    from PIL import UnidentifiedImageError

    from studio.limits import ImageTooLargeError, open_image

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training folder {str(folder)!r} does not exist or is not a folder.")
    groups: list[tuple[Path, int, str]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(\d+)_(.*)", sub.name)
        if m:
            groups.append((sub, max(1, int(m[1])), m[2].strip()))
    groups.append((folder, 1, ""))
    scan = Scan()
    for where, repeats, words in groups:
        for path in sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.lower().endswith(MASK_SUFFIX)):
            try:
                with open_image(path) as image:  # refuses an image over the pixel limit before decoding it
                    image.verify()  # catches truncated and garbage files
                with open_image(path) as image:
                    size = image.size
                    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                    image.convert("RGB").load()
            except ImageTooLargeError as error:
                scan.skipped.append((path, f"too large: {error}"))
                continue
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
                scan.skipped.append((path, f"unreadable image ({type(error).__name__}: {error})"))
                continue
            if min(size) < min_size:
                scan.skipped.append((path, f"{size[0]}x{size[1]} is smaller than the training size {min_size}; "
                                           f"use a larger image or a smaller --size"))
                continue
            mask, why = _mask_of(path, size, has_alpha)
            if why:
                scan.skipped.append((path, why))
                continue
            digest = hashlib.sha256(path.read_bytes() + (mask.read_bytes() if mask and mask != path else b"")).hexdigest()
            scan.items.append(Item(path=path, caption=_caption_of(path, words, trigger), repeats=repeats,
                                   size=size, sha256=digest, regularisation=regularisation, mask=mask))
    if not scan.items:
        found = sorted(p.name for p in folder.rglob("*") if p.is_file())[:5]
        reasons = "; ".join(f"{p.name}: {why}" for p, why in scan.skipped[:3])
        raise DatasetError(
            f"no usable images in {str(folder)!r} ({len(scan.skipped)} skipped{': ' + reasons if reasons else ''}; "
            f"files seen: {found or 'none'}). Put .png/.jpg/.webp images there, flat or in kohya `N_name` subfolders."
        )
    return scan


def buckets(size: int, factor: int, *, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs with about size^2 pixels, sides multiples of `factor`, aspect <= max_ratio
    (kohya's bucketing, simplified to one area)."""
    out = set()
    side = factor
    while side <= size * max_ratio:
        other = int(size * size / side) // factor * factor
        if other >= factor and max(side, other) / min(side, other) <= max_ratio:
            out.add((side, other))
        side += factor
    out.add((size, size))
    return sorted(out)


def bucket_of(image_size: tuple[int, int], choices: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (log-ratio distance)."""
    import math

    ratio = math.log(image_size[0] / image_size[1])
    return min(choices, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def _mask_image(item: Item) -> Image.Image:
    """The item's mask as a greyscale image: its mask file, or its own alpha where the mask is the image."""
    from PIL import Image

    with Image.open(item.mask) as source:
        return source.convert("RGBA").getchannel("A") if item.mask == item.path else source.convert("L")


# a subject whose masks match their own mirror images this closely (median IoU) is one a mirror leaves the same:
# world renders give 0.84-1.00 for stars and hearts (pixelation of small ones), 0.17-0.20 for crescents
MIRROR_IOU = 0.7


def mirror_iou(item: Item) -> float | None:
    """How closely the subject's mask, cropped to its box, matches its own mirror image (IoU: a star, a face
    seen from the front near 1; a crescent, a profile, text far below); None without a mask."""
    import numpy as np

    if item.mask is None:
        return None
    mask = np.asarray(_mask_image(item)) > 127
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    box = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    return float((box & box[:, ::-1]).sum() / (box | box[:, ::-1]).sum())


def mask_weights(item: Item, bucket: tuple[int, int], latent_size: tuple[int, int], *, flip: bool,
                 floor: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (1, h, w): `floor` outside the subject, 1 on it, the mask fitted
    like its image and averaged over each latent pixel's area."""
    import numpy as np
    import torch

    fitted = fit(_mask_image(item), bucket, flip=flip, mode="L")
    mask = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255)[None, None]
    mask = torch.nn.functional.adaptive_avg_pool2d(mask, latent_size)[0]
    return floor + (1 - floor) * mask


class LatentCache:
    """Per-item latents and text conditioning on disk, keyed by content and backbone."""

    def __init__(self, backbone: Any):
        from studio.home import cache_dir

        self.backbone = backbone
        self.root = cache_dir("train")
        self.prefix = backbone.fingerprint()[:16]

    def _path(self, kind: str, key: str) -> Path:
        digest = hashlib.sha256(f"{self.prefix}|{kind}|{key}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(kind, key)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def check_size(size: int, factor: int) -> int:
    if not isinstance(size, int) or size < factor or size % factor:
        raise InvalidArgumentError(f"size={size!r} must be a positive multiple of {factor} for this backbone.")
    return size


def training_map(item: Any, condition: str) -> tuple[Path | None, str]:
    """Where an image's training map comes from: (path, preprocessor). `paired`: conditions/NAME.* beside it
    (None when missing); `mask`: its NAME.mask.png when there is one (exact), else the mask preprocessor;
    canny / soft_edge: the image itself through the preprocessor."""
    if condition == "paired":
        for suffix in IMAGE_SUFFIXES:
            candidate = item.path.parent / "conditions" / (item.path.stem + suffix)
            if candidate.is_file():
                return candidate, "none"
        return None, "none"
    if condition == "mask" and item.mask is not None and item.mask != item.path:
        return item.mask, "none"
    return item.path, condition
