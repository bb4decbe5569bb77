"""The shapes-world backbones as embedded names: `world-sd` (SD1 layout) and `world-dit` (SD3 layout)."""

from __future__ import annotations

from pathlib import Path

from studio.errors import BackboneNotFoundError
from studio.folders import check_pipeline_folder
from studio.world import ASSETS


def world_folder(name: str) -> Path:
    folder = ASSETS / name
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        raise BackboneNotFoundError(
            f"{name} is not in {ASSETS}; retrain it with `studio world train --model {name} --out {ASSETS.parent}`."
        )
    if (folder / "model_index.json").is_file():
        check_pipeline_folder(folder)
    return folder


def world_sd():
    """The shapes-world UNet backbone (SD1.x layout, world-clip text tower, f=4 VAE)."""
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(world_folder("world-sd"), dtype=torch.float32,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def world_dit():
    """The shapes-world DiT backbone (SD3 layout: world-clip's text tower in both CLIP slots, no T5)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(world_folder("world-dit"), dtype=torch.float32,
                                                    text_encoder_3=None, tokenizer_3=None)


BUILDERS = {"world-sd": world_sd, "world-dit": world_dit}
# what each world backbone ships beside its weights, by adapter kind (or "image_encoder"), under assets/world:
# the IP-Adapter (bench/image_prompt.py trained it), the mask control models (bench/control.py) and the CLIP
# image encoder both read
SHIPS = {"world-sd": {"ip_adapter": "ip-adapter/world-sd.safetensors", "controlnet": "control/controlnet-world-sd",
                      "t2i_adapter": "control/t2i_adapter-world-sd", "image_encoder": "world-clip"},
         "world-dit": {"image_encoder": "world-clip"}}
