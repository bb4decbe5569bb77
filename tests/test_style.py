"""Style: B-LoRA halves trained together and attached apart; training-free style injection (shared
attention with a DDIM-inverted reference) attached, weighted, saved and detached."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import pixels
from studio.adapters.base import IncompatibleAdapterError, load_adapter
from studio.adapters.style import BLoraAdapter, BLoraConfig, StyleInjection, StyleInjectionConfig
from studio.pipelines import StudioPipeline

from studio.world.render import render, sample_labels


@pytest.fixture(scope="module")
def world():
    return StudioPipeline("world-sd")


def reference(seed: int):
    return render(sample_labels(np.random.default_rng(seed)), seed=seed)[0]


def test_blora_trains_only_its_two_blocks_and_attaches_either_half(world, tmp_path):
    from studio.training.trainer import TrainConfig, train
    from studio.world.folder import write_reference_folder

    write_reference_folder(tmp_path / "refs", n=4, seed=2, shape="star", trigger="sks")
    path = train(TrainConfig(folder=str(tmp_path / "refs"), out=str(tmp_path / "b.safetensors"), kind="blora", rank=4,
                             steps=3, batch=2, lr=1e-2, checkpoint_every=100), log=lambda _: None)
    adapter = load_adapter(path)
    blocks = adapter.config.blocks
    assert isinstance(adapter, BLoraAdapter) and set(blocks) == {"content", "style"}
    assert {k.split(".attentions.")[0] + ".attentions." + k.split(".attentions.")[1].split(".")[0]
            for k in adapter.tensors} == {f"unet.{b}" for part in blocks.values() for b in part}
    assert all(float(v.abs().sum()) > 0 for k, v in adapter.tensors.items() if k.endswith("lora_B.weight"))
    plain = world.generate("a red sks star", seed=1, steps=4).images[0]
    images = {}
    for part in ("content", "style", "both"):
        world.attach(adapter, 1.0, part=part)
        wrapped = {n for n, m in world.backbone.denoiser.named_modules() if n.endswith(".lora_B")}
        allowed = tuple(b for p in (("content", "style") if part == "both" else (part,)) for b in blocks[p])
        assert wrapped and all(n.startswith(allowed) for n in wrapped)
        generation = world.generate("a red sks star", seed=1, steps=4)
        assert generation.recipe.adapters[0]["inputs"] == {"part": part}
        images[part] = pixels(generation.images[0])
        world.detach()
    assert all(np.abs(images[p] - pixels(plain)).mean() > 0.1 for p in images)
    assert np.abs(images["content"] - images["style"]).mean() > 0.1
    assert np.array_equal(pixels(world.generate("a red sks star", seed=1, steps=4).images[0]), pixels(plain))


def test_blora_trains_and_splits_on_the_sdxl_layout_it_was_found_on(tmp_path):
    """The paper's blocks (SDXL: up_blocks.0.attentions.0 content, .1 style) on a random SDXL-layout UNet: training
    touches only them, and each half changes the image alone (world-sd's SD1 layout has no such split, README)."""
    from studio.training.trainer import TrainConfig, train
    from studio.world.folder import write_reference_folder

    write_reference_folder(tmp_path / "refs", n=2, seed=2, shape="star", trigger="sks")
    path = train(TrainConfig(folder=str(tmp_path / "refs"), out=str(tmp_path / "xl.safetensors"), kind="blora",
                             backbone="tiny-sdxl", rank=2, steps=2, batch=2, lr=1e-2, checkpoint_every=100),
                 log=lambda _: None)
    adapter = load_adapter(path)
    assert adapter.config.blocks == {"content": ["up_blocks.0.attentions.0"], "style": ["up_blocks.0.attentions.1"]}
    assert {k.split(".", 1)[1].split(".transformer_blocks")[0] for k in adapter.tensors} == {
        "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"}
    assert all(float(v.abs().sum()) > 0 for k, v in adapter.tensors.items() if k.endswith("lora_B.weight"))
    pipe = StudioPipeline("tiny-sdxl")
    plain = pixels(pipe.generate("a sks star", seed=1, steps=2).images[0])
    for part in ("content", "style"):
        pipe.attach(adapter, 1.0, part=part)
        wrapped = {n for n, m in pipe.backbone.denoiser.named_modules() if n.endswith(".lora_B")}
        assert wrapped and all(n.startswith(adapter.config.blocks[part][0] + ".") for n in wrapped)
        assert not np.array_equal(pixels(pipe.generate("a sks star", seed=1, steps=2).images[0]), plain)
        pipe.detach()


def test_blora_content_of_one_and_style_of_another_attach_together(world):
    a = BLoraAdapter.create(world.backbone, BLoraConfig(family="sd1", name="a", rank=2), seed=1)
    b = BLoraAdapter.create(world.backbone, BLoraConfig(family="sd1", name="b", rank=2), seed=2)
    world.attach(a, 1.0, part="content")
    world.attach(b, 0.8, part="style")
    assert [r["inputs"] for r in world.generate("x", steps=1).recipe.adapters] == [{"part": "content"}, {"part": "style"}]
    world.detach()
    with pytest.raises(Exception, match="part='colour'"):
        world.attach(a, 1.0, part="colour")
    assert not world.adapters


def test_blora_is_refused_where_its_blocks_are_unknown(backbones):
    with pytest.raises(IncompatibleAdapterError, match="which blocks"):
        BLoraAdapter.create(backbones("sd1"), BLoraConfig(family="sd1"))


def test_style_injection_changes_the_image_and_detaches_to_the_same_pixels(world, tmp_path):
    before = dict(world.backbone.denoiser.attn_processors)
    plain = world.generate("a blue square", seed=4, steps=6).images[0]
    injection = StyleInjection.create(world.backbone, StyleInjectionConfig(family="sd1", name="look"))
    path = injection.save(tmp_path / "look.safetensors")
    reference(3).save(tmp_path / "ref.png")
    world.attach(path, 1.0, image=tmp_path / "ref.png")
    styled = world.generate("a blue square", seed=4, steps=6)
    assert np.abs(pixels(styled.images[0]) - pixels(plain)).mean() > 0.5
    assert styled.recipe.adapters[0]["inputs"]["image"] == str((tmp_path / "ref.png").resolve())
    world.set_weight("look", 0.0)  # weight 0: the reference's keys get no attention
    assert np.abs(pixels(world.generate("a blue square", seed=4, steps=6).images[0]) - pixels(plain)).max() <= 1
    world.detach()
    assert {n: type(p) for n, p in world.backbone.denoiser.attn_processors.items()} == \
        {n: type(p) for n, p in before.items()}
    assert np.array_equal(pixels(world.generate("a blue square", seed=4, steps=6).images[0]), pixels(plain))
    again = world.replay(styled.recipe)  # the recipe attaches it again with the same reference
    assert np.array_equal(pixels(again), pixels(styled.images[0]))
    world.detach()


def test_style_injection_shared_batch_and_bad_input(world, backbones):
    injection = StyleInjection.create(world.backbone, StyleInjectionConfig(family="sd1", name="shared"))
    world.attach(injection, 1.0, shared=True)
    batch = world.generate("a green circle", n=3, seed=2, steps=4).images
    world.detach()
    alone = world.generate("a green circle", n=3, seed=2, steps=4).images
    assert np.array_equal(pixels(batch[0]), pixels(alone[0]))  # the reference itself is drawn as it was
    assert np.abs(pixels(batch[2]) - pixels(alone[2])).mean() > 0.1  # the others read it
    with pytest.raises(Exception, match="needs a reference"):
        world.attach(injection, 1.0)
    with pytest.raises(IncompatibleAdapterError, match="not supported yet"):
        StyleInjection.create(backbones("sd3"), StyleInjectionConfig(family="sd3")).attach(backbones("sd3"), 1.0,
                                                                                           shared=True)


def test_cli_style_image_and_a_blora_half_and_from_remakes_it(tmp_path):
    from test_cli import run_cli

    from studio.world.folder import write_reference_folder

    reference(5).save(tmp_path / "ref.png")
    write_reference_folder(tmp_path / "refs", n=2, seed=1, shape="heart", trigger="zwx")
    trained = run_cli("train", str(tmp_path / "refs"), "--kind", "blora", "--rank", "2", "--steps", "2",
                      "--out", str(tmp_path / "b.safetensors"))
    assert trained.returncode == 0, trained.stderr
    # piped, the progress is a line per 10% with the time left
    assert "training: 1/2 (50%), loss " in trained.stderr and "training: 2/2 (100%)" in trained.stderr
    assert "ETA 0:0" in trained.stderr
    first = run_cli("generate", "a blue square", "--style-image", str(tmp_path / "ref.png"), "--adapter",
                    f"{tmp_path / 'b.safetensors'}:0.8@style", "--seed", "2", "--steps", "3",
                    "--out", str(tmp_path / "out.png"))
    assert first.returncode == 0, first.stderr
    again = run_cli("generate", "--from", str(tmp_path / "out.png"), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    from PIL import Image

    assert np.array_equal(pixels(Image.open(tmp_path / "again.png")), pixels(Image.open(tmp_path / "out.png")))
