"""Images as the backbones take them: the suffixes studio reads, fitting to a size, VAE latents.

Core: adapters (style injection's reference), training (folders) and merges (learned weights) share them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit(image: Image.Image, bucket: tuple[int, int], *, flip: bool = False, crop_at: tuple[float, float] = (0.5, 0.5),
        mode: str = "RGB"):
    """Resize to cover the bucket, crop to it (centre unless `crop_at` says where), optionally mirror."""
    from PIL import Image as PILImage

    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.convert(mode).resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                                          PILImage.LANCZOS)
    left = round((resized.width - width) * crop_at[0])
    top = round((resized.height - height) * crop_at[1])
    out = resized.crop((left, top, left + width, top + height))
    return out.transpose(PILImage.FLIP_LEFT_RIGHT) if flip else out


def encode_images(backbone: Any, images: list[Image.Image]) -> torch.Tensor:
    """Latents as the family's denoiser sees them: (sample mean - shift) * scale."""
    import numpy as np
    import torch

    vae = backbone.pipe.vae
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
