"""Concept tokens (pivotal tuning): a trigger learned as token vectors, carried by the adapter file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from studio.adapters.base import load_adapter
from studio.adapters.lora import LoraAdapter, LoraConfig, attached_adapters

from studio import concept_tokens
from studio.backbones import load_backbone
from studio.errors import InvalidArgumentError
from studio.inspection import inspect_path
from studio.training.objectives import objective_for
from studio.training.trainer import train
from studio.world.folder import write_reference_folder


def encode(backbone, prompt: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return objective_for(backbone).encode([concept_tokens.expand(backbone, prompt)])


def with_tokens(backbone, name: str, trigger: str, n: int = 2, seed: int = 0) -> LoraAdapter:
    """A LoRA at identity (lora_B zero) whose only change is `trigger` as n random token vectors."""
    generator = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter.create(backbone, LoraConfig(family=backbone.family.name, rank=2, name=name))
    adapter.tokens = {trigger: {c: torch.randn(n, e.get_input_embeddings().embedding_dim, generator=generator)
                                for c, (_, e) in concept_tokens.encoders(backbone).items()}}
    return adapter


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tokens_change_only_their_trigger_and_detach_restores_exactly(backbones, family):
    backbone = backbones(family)
    parts = concept_tokens.encoders(backbone)
    sizes = {c: len(t) for c, (t, _) in parts.items()}
    tables = {c: e.get_input_embeddings().weight.detach().clone() for c, (_, e) in parts.items()}
    plain, other = encode(backbone, "a photo of sks dog"), encode(backbone, "a photo of a cat")
    words = {c: t.tokenize("he asks Sksy") for c, (t, _) in parts.items()}
    adapter = with_tokens(backbone, "a", "sks")
    adapter.attach(backbone)
    try:
        assert concept_tokens.expand(backbone, "a sks dog, sks.") == "a sks sks+1 dog, sks sks+1."
        assert concept_tokens.expand(backbone, "asks sksx") == "asks sksx"  # whole words only
        assert concept_tokens.expand(backbone, "Sks") == "sks sks+1"
        for component, (tokenizer, encoder) in parts.items():
            ids = tokenizer.convert_tokens_to_ids(["sks", "sks+1"])
            assert ids == [sizes[component], sizes[component] + 1]
            assert ids[0] in tokenizer("a photo of sks dog").input_ids
            assert tokenizer.tokenize("he asks Sksy") == words[component]  # words that contain it keep theirs
            rows = encoder.get_input_embeddings().weight[ids]
            assert torch.equal(rows, adapter.tokens["sks"][component])
        assert all(torch.equal(v, other[k]) for k, v in encode(backbone, "a photo of a cat").items())
        changed = encode(backbone, "a photo of sks dog")
        assert any((v - plain[k]).abs().max() > 1e-3 for k, v in changed.items())
    finally:
        adapter.detach(backbone)
    for component, (tokenizer, encoder) in parts.items():
        assert len(tokenizer) == sizes[component]
        assert encoder.config.vocab_size == tables[component].shape[0]  # what a saved copy loads with
        assert torch.equal(encoder.get_input_embeddings().weight, tables[component])
    assert all(torch.equal(v, plain[k]) for k, v in encode(backbone, "a photo of sks dog").items())


def test_a_clashing_or_misfit_token_is_refused_before_anything_changes(backbones):
    backbone = backbones("sd1")
    first = with_tokens(backbone, "first", "sks")
    first.attach(backbone)
    try:
        size = len(backbone.pipe.tokenizer)
        with pytest.raises(InvalidArgumentError, match="'sks'.*'first' already brought"):
            with_tokens(backbone, "second", "sks").attach(backbone)
        narrow = with_tokens(backbone, "narrow", "zwx")
        narrow.tokens["zwx"]["text_encoder"] = torch.zeros(1, 7)
        with pytest.raises(InvalidArgumentError, match="7 wide for text_encoder"):
            narrow.attach(backbone)
        assert list(attached_adapters(backbone)) == ["first"] and len(backbone.pipe.tokenizer) == size
        assert not any("second" in n or "narrow" in n for n, _ in backbone.pipe.unet.named_modules())
    finally:
        first.detach(backbone)


def test_tokens_survive_the_file_a_merge_and_both_exports(backbones, saved_folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    from studio.lora_formats import convert_file
    from studio.merge.engine import merge

    backbone = backbones("sd1")
    star, heart = with_tokens(backbone, "star", "sks"), with_tokens(backbone, "heart", "zwx", seed=1)
    path = star.save(tmp_path / "star.safetensors")
    with safe_open(str(path), "pt") as handle:
        assert "bundle_emb.sks.text_encoder" in handle.keys()
    assert inspect_path(path)["concept_tokens"] == {"sks": 2}
    loaded = load_adapter(path)
    assert torch.equal(loaded.tokens["sks"]["text_encoder"], star.tokens["sks"]["text_encoder"])
    assert not any(k.startswith("bundle_emb") for k in loaded.tensors)
    merged = merge([loaded, heart], method="linear", backbone=backbone).adapter
    assert sorted(merged.tokens) == ["sks", "zwx"]
    size, rows = len(backbone.pipe.tokenizer), backbone.pipe.text_encoder.get_input_embeddings().num_embeddings
    merged.attach(backbone)  # two triggers of two vectors each, in and out
    assert len(backbone.pipe.tokenizer) == size + 4
    merged.detach(backbone)
    assert len(backbone.pipe.tokenizer) == size
    assert backbone.pipe.text_encoder.get_input_embeddings().num_embeddings == rows
    with pytest.raises(InvalidArgumentError, match="'star' and 'again' both learned the token 'sks'"):
        merge([loaded, with_tokens(backbone, "again", "sks")], backbone=backbone)

    kohya = load_file(str(convert_file(path, "kohya", tmp_path / "k.safetensors", backbone=backbone)))
    assert torch.equal(kohya["bundle_emb.sks.string_to_param.*"], star.tokens["sks"]["text_encoder"])
    back = load_adapter(tmp_path / "k.safetensors", backbone)  # a kohya file read back: tokens and all
    assert torch.equal(back.tokens["sks"]["text_encoder"], star.tokens["sks"]["text_encoder"])
    convert_file(path, "diffusers", tmp_path / "d.safetensors", backbone=backbone)
    embedding = tmp_path / "d.sks.safetensors"
    assert list(load_file(str(embedding))) == ["emb_params"]

    plain = StableDiffusionPipeline.from_pretrained(saved_folders("sd1"))  # diffusers only from here
    plain.load_textual_inversion(str(embedding), token="sks")
    prompt = "a photo of sks dog"
    theirs, _ = plain.encode_prompt(prompt, "cpu", 1, False)
    loaded.attach(backbone)
    try:
        ours = encode(backbone, prompt)["context"]
    finally:
        loaded.detach(backbone)
    assert (ours - theirs).abs().max() <= 1e-5


def test_pivotal_tuning_trains_the_tokens_and_resumes_to_the_same_result(tmp_path):
    refs = tmp_path / "refs"
    # seed 23: not test_training's renders, whose test counts the latents it finds in the shared cache
    write_reference_folder(refs / "5_sks star", n=4, seed=23, shape="star", trigger="sks")
    options = dict(folder=str(refs), steps=4, batch=2, rank=2, lr=1e-3, trigger="sks", tokens=2, token_lr=1e-2,
                   checkpoint_every=2, log=lambda line: None)
    straight = load_adapter(train(out=str(tmp_path / "a.safetensors"), **options))
    vectors = straight.tokens["sks"]["text_encoder"]
    backbone = load_backbone("world-sd")
    tokenizer, encoder = concept_tokens.encoders(backbone)["text_encoder"]
    start = encoder.get_input_embeddings().weight[tokenizer("sks", add_special_tokens=False).input_ids].mean(0)
    assert vectors.shape == (2, start.shape[0])
    assert (vectors - start).abs().max() > 1e-3  # both trained away from the word's own embedding
    assert (vectors[0] - vectors[1]).abs().max() > 1e-4  # and apart: each position has its own gradient
    assert straight.config.training["tokens"] == 2
    assert any(v.abs().max() > 0 for k, v in straight.tensors.items() if "lora_B" in k)

    stop = iter([True])
    with pytest.raises(Exception, match="cancelled at step 1"):
        train(out=str(tmp_path / "b.safetensors"), should_stop=lambda: next(stop, False), **options)
    resumed = load_adapter(train(out=str(tmp_path / "b.safetensors"), resume=True, **options))
    assert torch.allclose(resumed.tokens["sks"]["text_encoder"], vectors, atol=1e-6)
    assert all(torch.allclose(v, straight.tensors[k], atol=1e-6) for k, v in resumed.tensors.items())


def test_tokens_need_a_trigger():
    with pytest.raises(InvalidArgumentError, match="tokens > 0 .* set trigger"):
        train(folder="x", out="x.safetensors", tokens=2)
    with pytest.raises(InvalidArgumentError, match="tokens=-1"):
        train(folder="x", out="x.safetensors", tokens=-1, trigger="sks")


def test_a1111_names_read_back_for_one_and_two_text_encoders():
    sdxl = {"sks": {"text_encoder": torch.ones(2, 4), "text_encoder_2": torch.zeros(2, 6)}}
    bundled = concept_tokens.to_a1111(sdxl, "sdxl")
    assert sorted(bundled) == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]
    weights, back = concept_tokens.split({**bundled, "unet.x.lora_A.weight": torch.ones(1)})
    assert list(weights) == ["unet.x.lora_A.weight"]
    assert all(torch.equal(back["sks"][c], v) for c, v in sdxl["sks"].items()) and len(back["sks"]) == 2
    sd1 = concept_tokens.to_a1111({"my-cat": {"text_encoder": torch.ones(1, 4)}}, "sd1")
    assert list(sd1) == ["bundle_emb.my-cat.string_to_param.*"]
    assert list(concept_tokens.split(sd1)[1]["my-cat"]) == ["text_encoder"]
