"""Adapters through the CLI and the pipeline: generate --adapter with weights and --from, convert to
kohya and diffusers (read back by plain diffusers), the recipe's LoRA fields."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from studio.adapters.base import load_adapter
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone
from studio.recipe import read_recipe

STUDIO = [sys.executable, "-m", "studio.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def world_lora(tmp_path_factory):
    """A world-sd LoRA with random (non-identity) factors, saved."""
    from test_lora import random_lora

    adapter = random_lora(load_backbone("world-sd"), name="blob", seed=5)
    return adapter.save(tmp_path_factory.mktemp("lora") / "blob.safetensors")


def test_generate_with_adapter_weights_and_remake_from_png(tmp_path, world_lora):
    base = run_cli("generate", "a red circle", "--seed", "3", "--steps", "3", "--out", str(tmp_path / "base.png"))
    full = run_cli("generate", "a red circle", "--seed", "3", "--steps", "3", "--adapter", f"{world_lora}:1.0",
                   "--out", str(tmp_path / "full.png"))
    half = run_cli("generate", "a red circle", "--seed", "3", "--steps", "3", "--adapter", f"{world_lora}:0.5",
                   "--out", str(tmp_path / "half.png"))
    for done in (base, full, half):
        assert done.returncode == 0, done.stderr
    px = {k: np.asarray(Image.open(tmp_path / f"{k}.png")).astype(int) for k in ("base", "full", "half")}
    assert np.abs(px["full"] - px["base"]).mean() > np.abs(px["half"] - px["base"]).mean() > 0
    recipe = read_recipe(tmp_path / "half.png")
    assert recipe.adapters[0]["weight"] == 0.5 and recipe.adapters[0]["name"] == "blob"
    assert "<lora:blob:0.5>" in recipe.parameters() and "Lora hashes" in recipe.parameters()
    again = run_cli("generate", "--from", str(tmp_path / "half.png"), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "half.png").read_bytes()


def test_block_weights_on_the_command_line_are_recorded_and_replayed(tmp_path, world_lora):
    routed = run_cli("generate", "a red circle", "--seed", "3", "--steps", "2", "--adapter",
                     f"{world_lora}:0.8,up_blocks=0", "--out", str(tmp_path / "routed.png"))
    assert routed.returncode == 0, routed.stderr
    recipe = read_recipe(tmp_path / "routed.png")
    assert recipe.adapters[0]["weight"] == "0.8,up_blocks=0"
    assert "<lora:blob:0.8:lbw=up_blocks=0>" in recipe.parameters()
    again = run_cli("generate", "--from", str(tmp_path / "routed.png"), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "routed.png").read_bytes()


def test_bad_adapter_weight_and_missing_file_are_clear(tmp_path, world_lora):
    bad = run_cli("generate", "a star", "--steps", "1", "--adapter", f"{world_lora}:lots")
    said = " ".join(bad.stderr.split())  # the message wraps where the temporary path's length puts it
    assert bad.returncode == 2 and "the weight after ':'" in said and "'lots' is not a number" in said
    missing = run_cli("generate", "a star", "--steps", "1", "--adapter", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "does not exist" in " ".join(missing.stderr.split())


def test_convert_to_diffusers_loads_in_plain_diffusers_and_matches_studio(tmp_path):
    from test_lora import denoise, random_lora

    backbone = load_backbone("tiny-sdxl")
    adapter = random_lora(backbone, text_encoder=True, name="x")
    path = adapter.save(tmp_path / "x.safetensors")
    done = run_cli("convert", str(path), "--to", "diffusers", "--backbone", "tiny-sdxl",
                   "--out", str(tmp_path / "x.diffusers.safetensors"))
    assert done.returncode == 0, done.stderr
    pipeline = StudioPipeline(backbone)
    pipeline.attach(path, 0.9)
    ours = denoise(backbone)
    plain = load_backbone("tiny-sdxl").pipe  # from here on, diffusers alone
    plain.load_lora_weights(str(tmp_path / "x.diffusers.safetensors"), adapter_name="x")
    plain.set_adapters(["x"], [0.9])
    assert (denoise(plain) - ours).abs().max() <= 1e-4
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(plain.text_encoder_2(ids)[0], backbone.pipe.text_encoder_2(ids)[0], atol=1e-4)


def test_convert_to_kohya_reads_back_the_same_adapter(tmp_path):
    from safetensors import safe_open
    from test_lora import random_lora

    backbone = load_backbone("tiny-sd1")
    adapter = random_lora(backbone, text_encoder=True, name="k")
    path = adapter.save(tmp_path / "k.safetensors")
    done = run_cli("convert", str(path), "--to", "kohya", "--out", str(tmp_path / "k.kohya.safetensors"))
    assert done.returncode == 0, done.stderr
    with safe_open(str(tmp_path / "k.kohya.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) and meta["ss_network_module"] == "networks.lora"
    back = load_adapter(tmp_path / "k.kohya.safetensors", backbone)
    for name, delta in back.deltas().items():
        assert torch.allclose(delta.dense(), adapter.deltas()[name].dense(), atol=1e-6)
    exists = run_cli("convert", str(path), "--to", "kohya", "--out", str(tmp_path / "k.kohya.safetensors"))
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
