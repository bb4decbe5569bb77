"""The offline CLIP tokenizer, the sampler registry and device/dtype choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pixels
from studio.pipelines import StudioPipeline

from studio.backbones import resolve_device, resolve_dtype
from studio.schedulers import SCHEDULERS, build_scheduler
from studio.tokenizer import clip_tokenizer


def test_clip_tokenizer_reproduces_open_clip_ids():
    tokenizer = clip_tokenizer()
    ids = tokenizer("a red circle on a striped background").input_ids
    assert ids == [49406, 320, 736, 7117, 525, 320, 22192, 5994, 49407]
    assert len(tokenizer) == 49408
    padded = tokenizer("a star", padding="max_length", max_length=8).input_ids
    star = tokenizer.convert_tokens_to_ids("star</w>")
    assert padded == [49406, 320, star, 49407, 49407, 49407, 49407, 49407]  # padded with <|endoftext|>


def test_clip_tokenizer_matches_open_clip_itself():
    open_clip = pytest.importorskip("open_clip")
    text = "a Yellow HEART, top-left; on waves!"
    reference = open_clip.get_tokenizer("ViT-B-32")([text])[0]
    ours = clip_tokenizer()(text, padding="max_length", max_length=77).input_ids
    n = int((reference != 0).sum())
    assert ours[:n] == reference[:n].tolist()


def test_trimmed_tokenizer_splits_the_world_words_as_clip_does():
    from studio.world.captions import caption, vocabulary, world_tokenizer
    from studio.world.render import sample_labels

    trimmed, full = world_tokenizer(), clip_tokenizer()
    assert 520 < len(trimmed) < 1000  # 512 byte symbols, the world's merges, two specials
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = caption(sample_labels(rng, held_out=True), template=int(rng.integers(3)), trigger="sks")
        assert trimmed.tokenize(text) == full.tokenize(text)
    assert set(vocabulary()) >= {"checkered", "wavy", "star", "dotted", "background", ","}
    # a word outside the vocabulary falls back to pieces, never to an unknown token
    pieces = trimmed.tokenize("zebra")
    assert "".join(pieces).replace("</w>", "") == "zebra" and len(pieces) > 1
    ids = trimmed("a zebra").input_ids
    assert ids[0] == len(trimmed) - 2 and ids[-1] == len(trimmed) - 1  # <|startoftext|>, <|endoftext|>


@pytest.mark.parametrize("name", [s for s in SCHEDULERS if SCHEDULERS[s].kind == "discrete"])
def test_each_discrete_sampler_is_built_with_its_options(backbones, name):
    base = backbones("sd1").base_scheduler_config
    scheduler = build_scheduler(name, base)
    assert type(scheduler).__name__ == SCHEDULERS[name].cls
    assert scheduler.config.beta_schedule == "scaled_linear"  # the backbone's own betas are kept
    for key, value in SCHEDULERS[name].options.items():
        assert scheduler.config[key] == value


def test_samplers_change_the_image_and_karras_changes_dpmpp(backbones):
    pipeline = StudioPipeline(backbones("sd1"))
    images = {name: pixels(pipeline.generate("a star", seed=1, steps=4, scheduler=name).images[0])
              for name in ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")}
    assert abs(images["dpmpp_2m"] - images["dpmpp_2m_karras"]).max() > 0
    assert abs(images["ddim"] - images["euler"]).max() > 0
    # the backbone's own scheduler is never mutated: the same call again gives the same pixels
    again = pixels(pipeline.generate("a star", seed=1, steps=4, scheduler="ddim").images[0])
    assert abs(again - images["ddim"]).max() == 0


def test_flow_families_sample_with_flow_euler(backbones):
    for family in ("sd3", "flux"):
        assert type(backbones(family).pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert backbones(family).family.scheduler == "flow_euler"


def test_device_and_dtype_defaults():
    assert resolve_device(None) in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype(None, "cpu", None) == torch.float32
    assert resolve_dtype("bf16", "cpu", None) == torch.bfloat16
    assert resolve_dtype("fp16", "cpu", None) == torch.float16


def test_explicit_dtype_loads_in_that_dtype():
    from studio.backbones import load_backbone

    backbone = load_backbone("tiny-sd3", dtype="bf16")
    assert backbone.dtype == torch.bfloat16 and backbone.pipe.vae.dtype == torch.bfloat16
