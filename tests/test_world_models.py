"""The shipped shapes-world models load with the plain diffusers/transformers classes and work."""

from __future__ import annotations

import numpy as np
import pytest

from studio.errors import InvalidArgumentError
from studio.world.data import render_set
from studio.world.models import ASSETS
from studio.world.train import load_vae, vae_roundtrip


def test_vae_round_trip_is_close_to_the_render():
    images = render_set(64, seed=78)["images"]
    trips = vae_roundtrip(load_vae(), images)
    assert np.abs(trips.astype(int) - images).mean() < 8  # mean abs error in 0..255 levels


def test_world_clip_pairs_renders_with_their_captions():
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from studio.world.captions import caption, world_tokenizer
    from studio.world.data import labels_at, to_tensor

    data = render_set(64, seed=79)
    vision = CLIPVisionModelWithProjection.from_pretrained(ASSETS / "world-clip", dtype=torch.float32)
    text = CLIPTextModelWithProjection.from_pretrained(ASSETS / "world-clip" / "text", dtype=torch.float32)
    tokens = world_tokenizer()([caption(labels_at(data, i)) for i in range(64)], padding="max_length",
                               max_length=20, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vision(pixel_values=to_tensor(data["images"])).image_embeds
        text_embeds = text(input_ids=tokens.input_ids).text_embeds
    similarity = torch.nn.functional.normalize(image_embeds, dim=-1) @ torch.nn.functional.normalize(text_embeds, dim=-1).T
    # each image's own caption ranks in its top 5 of 64 far more often than chance (5/64)
    top5 = (similarity.topk(5, dim=1).indices == torch.arange(64)[:, None]).any(1).float().mean()
    assert top5 > 0.5, float(top5)


def _prompted(pipe, n: int = 8, **options):
    """n world prompts through a plain diffusers pipeline at its own defaults, and what the evaluator reads."""
    import torch

    from studio.world.captions import caption
    from studio.world.evaluator import evaluate
    from studio.world.render import sample_labels

    rng = np.random.default_rng(5)
    expected = [sample_labels(rng) for _ in range(n)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([caption(e) for e in expected], generator=[torch.Generator().manual_seed(i) for i in range(n)],
                  **options).images
    return evaluate(images, expected)["accuracy"]


def _one_dtype(pipe) -> set:
    import torch

    return {part.dtype for part in pipe.components.values() if isinstance(part, torch.nn.Module)}


def test_world_sd_runs_in_plain_diffusers_with_no_dtype_argument():
    import torch
    from diffusers import StableDiffusionPipeline

    # the README's line: no torch_dtype (an fp16 text encoder beside an fp32 UNet once crashed here)
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "world-sd", safety_checker=None)
    assert _one_dtype(pipe) == {torch.float32}
    accuracy = _prompted(pipe, num_inference_steps=25)
    assert accuracy["shape"] >= 0.75 and accuracy["colour"] >= 0.75, accuracy


def test_world_dit_runs_in_plain_diffusers_with_no_dtype_argument():
    import torch
    from diffusers import StableDiffusion3Pipeline

    # diffusers' documented way to load SD3 without its T5 encoder
    pipe = StableDiffusion3Pipeline.from_pretrained(ASSETS / "world-dit", text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert _one_dtype(pipe) == {torch.float32}
    accuracy = _prompted(pipe, num_inference_steps=28, max_sequence_length=20)
    assert accuracy["shape"] >= 0.75 and accuracy["colour"] >= 0.75, accuracy


def test_every_world_folder_loads_with_its_plain_class_in_one_dtype():
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from studio.world.evaluator import WorldEvaluator

    for cls, folder in ((AutoencoderKL, "vae"), (WorldEvaluator, "evaluator"),
                        (CLIPVisionModelWithProjection, "world-clip"), (CLIPTextModelWithProjection, "world-clip/text")):
        model = cls.from_pretrained(ASSETS / folder)
        assert {p.dtype for p in model.parameters()} == {torch.float32}, folder


def test_a_broken_world_folder_is_named_by_studio(tmp_path):
    import shutil

    from studio.backbones import load_backbone
    from studio.errors import NotACheckpointError
    from studio.inspection import inspect_path

    truncated, missing = tmp_path / "truncated", tmp_path / "missing"
    for folder in (truncated, missing):
        shutil.copytree(ASSETS / "world-sd", folder)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 5_000_000])
    shutil.rmtree(missing / "vae")
    for folder, said in ((truncated, r"unet/diffusion_pytorch_model.safetensors is truncated: 5,000,000 bytes"),
                         (missing, r"names the component 'vae' \(AutoencoderKL\), but .*missing/vae is missing")):
        with pytest.raises(NotACheckpointError, match=said):
            load_backbone(str(folder))
        with pytest.raises(NotACheckpointError, match=said):
            inspect_path(folder)
    shutil.copytree(ASSETS / "world-sd" / "vae", missing / "vae")
    (missing / "text_encoder" / "config.json").unlink()
    with pytest.raises(NotACheckpointError, match=r"text_encoder/config.json is missing"):
        load_backbone(str(missing))
    header_cut = tmp_path / "cut.safetensors"
    header_cut.write_bytes(weights.read_bytes()[:100])
    from studio.folders import check_safetensors_complete

    with pytest.raises(NotACheckpointError, match="header is cut"):
        check_safetensors_complete(header_cut)


def test_world_weights_fit_the_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file() and "checkpoint-" not in str(f))
    assert total <= 40 * 2**20, total / 2**20


def test_world_training_saves_in_the_dtypes_plain_loaders_join(tmp_path):
    import json
    import struct

    import torch
    from diffusers import StableDiffusionPipeline

    from studio.world.models import world_sd
    from studio.world.train import save_for_plain_loaders

    save_for_plain_loaders(world_sd(), tmp_path / "world-sd")  # what `studio world train` writes

    def dtypes(path):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        return {v["dtype"] for k, v in header.items() if k != "__metadata__"}

    assert dtypes(tmp_path / "world-sd/unet/diffusion_pytorch_model.safetensors") == {"F16"}
    assert dtypes(tmp_path / "world-sd/text_encoder/model.safetensors") == {"F32"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "world-sd", safety_checker=None)
    assert _one_dtype(pipe) == {torch.float32}


def test_world_training_resumes_only_the_run_it_was_given(tmp_path):
    """A rerun with other settings, or --resume where there is nothing to resume, says which and changes nothing."""
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.world.train import _run_record, train_world_sd

    checkpoint = tmp_path / "checkpoint-world-sd"
    record = {"model": "world-sd", "steps": 2000, "batch": 32, "lr": 3e-4, "seed": 0, "init": None, "partial": 0.3,
              "warmup": 50}
    _run_record(checkpoint, record)
    (checkpoint / "step.json").write_text('{"step": 500}')
    _run_record(checkpoint, {**record, "steps": 4000})  # a longer cosine on the same run: a warm restart
    with pytest.raises(InvalidArgumentError, match=r"lr: 0.0003 there, 0.001 now.*Nothing was changed"):
        _run_record(checkpoint, {**record, "steps": 4000, "lr": 1e-3})
    with pytest.raises(InvalidArgumentError, match="model: 'world-sd' there, 'world-dit' now"):
        _run_record(checkpoint, {**record, "model": "world-dit"})
    with pytest.raises(InvalidArgumentError, match="not a diffusers backbone folder"):
        train_world_sd(tmp_path / "fresh", init=tmp_path, steps=1, log=lambda line: None)
    result = CliRunner().invoke(app, ["world", "train", "--model", "world-dit", "--out", str(tmp_path), "--resume"])
    assert result.exit_code != 0 and "holds no checkpoint of world-dit" in str(result.exception)
    result = CliRunner().invoke(app, ["world", "train", "--model", "vae", "--out", str(tmp_path), "--partial", "0.3"])
    assert result.exit_code != 0 and "for world-sd and world-dit" in str(result.exception)
