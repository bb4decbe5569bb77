"""Single-file checkpoints in the original SD/SDXL key layout (what A1111/ComfyUI users keep)."""

from __future__ import annotations

import pytest
from conftest import pixels
from studio.pipelines import StudioPipeline

from studio.backbones import detect_family_from_keys, load_backbone, read_safetensors_header
from studio.errors import BackboneNotFoundError
from studio.formats import save_single_file


@pytest.fixture(scope="module")
def single_files(backbones, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return {family: save_single_file(backbones(family), folder / f"{family}.safetensors") for family in ("sd1", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_original_layout_keys_and_detection(single_files, family):
    keys, shapes, metadata = read_safetensors_header(single_files[family])
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0") for k in keys) or \
        any(k.startswith("model.diffusion_model.input_blocks.4.1.transformer_blocks.0") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert not any(k.startswith(("unet.", "down_blocks.", "vae.")) for k in keys)  # no diffusers names left
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    else:
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert detect_family_from_keys(keys, shapes.__getitem__, name="x") == family
    assert metadata["studio.family"] == family


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_loads_and_matches_the_folder(backbones, saved_folders, single_files, family):
    loaded = load_backbone(str(single_files[family]), config=str(saved_folders(family)))
    assert loaded.family.name == family and loaded.origin == "single_file"
    kwargs = dict(seed=11, steps=2, width=64, height=64)
    reference = StudioPipeline(backbones(family)).generate("a green moon", **kwargs).images[0]
    again = StudioPipeline(loaded).generate("a green moon", **kwargs).images[0]
    assert abs(pixels(reference) - pixels(again)).max() == 0


def test_single_file_without_config_offline_says_what_to_pass(single_files):
    with pytest.raises(BackboneNotFoundError, match=r"--config") as info:
        load_backbone(str(single_files["sd1"]))
    assert "sd1.safetensors" in str(info.value) and "Stable Diffusion 1.x" in str(info.value)


def test_sd2_is_told_from_sd1_by_its_text_encoder_and_width():
    shape = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    keys = list(shape) + ["model.diffusion_model.input_blocks.0.0.weight"]
    assert detect_family_from_keys(keys, shape.__getitem__, name="x") == "sd2"
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"]
    assert detect_family_from_keys(keys, {}.__getitem__, name="x") == "sd2"
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"]
    assert detect_family_from_keys(keys, {}.__getitem__, name="x") == "sd1"


@pytest.mark.parametrize(("keys", "family"), [
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "flux"),
    (["y_embedder.y_proj.fc1.weight", "t_block.1.weight", "blocks.0.attn.qkv.weight"], "pixart"),
])
def test_dit_single_files_are_detected(keys, family):
    assert detect_family_from_keys(keys, {}.__getitem__, name="x") == family


def test_from_replays_a_single_file_recipe_without_repeating_config(single_files, saved_folders, tmp_path,
                                                                    monkeypatch):
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.recipe import read_recipe

    monkeypatch.chdir(single_files["sd1"].parent)  # a relative path on the command line
    runner = CliRunner()
    made = runner.invoke(app, ["generate", "a cat", "--backbone", "sd1.safetensors", "--config",
                               str(saved_folders("sd1")), "--seed", "3", "--steps", "2",
                               "--out", str(tmp_path / "a.png")])
    assert made.exit_code == 0, made.output
    recipe = read_recipe(tmp_path / "a.png")
    assert recipe.backbone == str(single_files["sd1"].resolve())
    assert recipe.backbone_config == str(saved_folders("sd1").resolve())
    monkeypatch.chdir(tmp_path)
    again = runner.invoke(app, ["generate", "--from", "a.png", "--out", "b.png"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
