"""Every supported family: a random-initialised config of its real architecture loads, is detected,
names its blocks and generates through StudioPipeline; the same model saved as a diffusers folder
loads back to the same pixels."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, pixels
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone

EXPECTED_BLOCKS = {
    "sd1": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sd2": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sdxl": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["transformer_blocks.0", "single_transformer_blocks.0"],
    "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
             "pixart": "PixArtSigmaPipeline"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generates_two_steps(backbones, family):
    backbone = backbones(family)
    assert backbone.family.name == family
    assert type(backbone.pipe).__name__ == PIPELINES[family]
    assert [b.name for b in backbone.blocks] == EXPECTED_BLOCKS[family]
    steps_seen = []
    result = StudioPipeline(backbone).generate("a red star on a dotted background", n=2, seed=7, steps=2,
                                               width=64, height=64, progress=lambda d, t: steps_seen.append((d, t)))
    assert steps_seen == [(1, 2), (2, 2)]
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    first, second = (pixels(im) for im in result.images)
    assert first.std() > 1  # a real decoded image, not a constant
    assert abs(first - second).max() > 0  # seeds 7 and 8 differ
    assert result.recipe.family == family and result.recipe.seed == 7 and result.recipe.n == 2
    assert [r.image_seed for r in result.recipes] == [7, 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_back_to_the_same_pixels(backbones, saved_folders, family):
    folder = saved_folders(family)
    loaded = load_backbone(str(folder))
    assert loaded.family.name == family and loaded.origin == "folder"
    assert type(loaded.pipe).__name__ == PIPELINES[family]
    kwargs = dict(seed=3, steps=2, width=64, height=64)
    original = StudioPipeline(backbones(family)).generate("a blue ring", **kwargs).images[0]
    again = StudioPipeline(loaded).generate("a blue ring", **kwargs).images[0]
    assert abs(pixels(original) - pixels(again)).max() == 0


def test_block_of_maps_module_names_to_blocks(backbones):
    unet = backbones("sdxl")
    assert unet.block_of("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "up_blocks.1"
    assert unet.block_of("unet.mid_block.resnets.0.conv1") == "mid_block"
    assert unet.block_of("conv_in") is None
    dit = backbones("flux")
    assert dit.block_of("single_transformer_blocks.0.attn.to_q") == "single_transformer_blocks.0"
    assert dit.block_of("transformer_blocks.0.attn.to_q") == "transformer_blocks.0"


def test_family_override_reloads_with_that_pipeline(saved_folders):
    # an SD1 folder forced to sd2 keeps its weights but is treated as the sd2 family
    loaded = load_backbone(str(saved_folders("sd1")), family="sd2")
    assert loaded.family.name == "sd2"


def test_size_factor_and_default_size_follow_the_architecture(backbones):
    assert backbones("sd1").size_factor == 8
    assert backbones("sd3").size_factor == 16  # VAE 8 x patch 2
    assert backbones("flux").size_factor == 16  # VAE 8 x 2x2 packing
    assert backbones("pixart").size_factor == 16
    assert backbones("sd1").default_size == 64  # sample_size 8 x VAE 8


def test_hub_id_loads_from_the_local_hub_cache(saved_folders, tmp_path):
    """The real hub code path (`from_pretrained(repo_id)`, offline), fed by a Hugging Face cache built here."""
    import os
    import shutil
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--studio-test--tiny-sdxl"
    shutil.copytree(saved_folders("sdxl"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = ("from studio.backbones import load_backbone\n"
            "b = load_backbone('studio-test/tiny-sdxl')\n"
            "print('LOADED', b.family.name, b.origin, b.path.name, b.short_hash)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert f"LOADED sdxl hub {revision}" in done.stdout, done.stderr
