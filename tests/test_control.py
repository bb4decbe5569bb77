"""Control adapters: ControlNet and T2I-Adapter made, saved as diffusers folders plain diffusers reads, attached
with control images to the pixels diffusers' own control pipelines make, composed with the other kinds, trained
from a folder, and bad inputs refused before anything changes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image
from studio.adapters.base import IncompatibleAdapterError, load_adapter
from studio.adapters.control import (
    ControlConfig,
    ControlError,
    ControlNet,
    T2iAdapter,
    attached,
    control_map,
    preview,
)
from studio.pipelines import StudioPipeline

from studio.errors import InvalidArgumentError
from studio.world.render import render, sample_labels

STEPS = 4


@pytest.fixture(scope="module")
def world():
    return StudioPipeline("world-sd")


def scene(seed: int = 0, **fixed):
    image, mask = render(sample_labels(np.random.default_rng(seed), **fixed), seed=seed)
    return image, Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"), mask


def made(cls, backbone, name: str, seed: int = 0, noise: float = 0.02):
    """A new control model with every weight nudged, so its zero convolutions add something."""
    adapter = cls.create(backbone, ControlConfig(family=backbone.family.name, name=name), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    adapter.sync_from(backbone)
    return adapter


def plain_components(pipe, *names):
    return {k: v for k, v in pipe.components.items() if k in names}


SD_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
XL_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")


def same(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


def diffusers_call(pipe, recipe, **extra):
    gens = [torch.Generator("cpu").manual_seed(recipe.seed + i) for i in range(recipe.n)]
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, num_images_per_prompt=recipe.n,
                generator=gens, num_inference_steps=recipe.steps, guidance_scale=recipe.guidance, width=recipe.width,
                height=recipe.height, **extra).images


def decoded(pipe, latents):
    """Latents to images as StableDiffusionPipeline decodes them: StableDiffusionAdapterPipeline still decodes
    with its deprecated `decode_latents` (latents x (1 / scale), not latents / scale: a rounding apart, one
    pixel level here and there), so its denoising is compared through the same decoder."""
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def test_controlnet_and_t2i_folders_load_in_plain_diffusers_and_give_its_pixels(world, tmp_path):
    """studio's generation with a control is diffusers' StableDiffusionControlNetPipeline /
    StableDiffusionAdapterPipeline on the same weights and seed, to the pixel; detaching restores the backbone."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionAdapterPipeline,
        StableDiffusionControlNetPipeline,
        T2IAdapter,
    )

    _, control, _ = scene(1)
    base = world.generate("a red circle", seed=3, steps=STEPS, n=2)
    for cls in (ControlNet, T2iAdapter):
        folder = made(cls, world.backbone, cls.kind).save(tmp_path / cls.kind)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        world.attach(str(folder), 0.7, image=control)
        ours = world.generate("a red circle", seed=3, steps=STEPS, n=2)
        world.detach()
        assert not attached(world.backbone) and not world.backbone.denoiser._forward_pre_hooks
        assert same(ours.images, base.images) > 10  # the control changes the image
        parts = plain_components(world.pipe, *SD_PARTS)
        if cls is ControlNet:
            plain = StableDiffusionControlNetPipeline(**parts, controlnet=ControlNetModel.from_pretrained(folder),
                                                      safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False)
            theirs = diffusers_call(plain, ours.recipe, image=control, controlnet_conditioning_scale=0.7)
        else:
            plain = StableDiffusionAdapterPipeline(**parts, adapter=T2IAdapter.from_pretrained(folder),
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
            theirs = decoded(world.pipe, diffusers_call(plain, ours.recipe, image=control, adapter_conditioning_scale=0.7,
                                                        output_type="latent"))
        assert same(ours.images, theirs) == 0
        assert same(world.generate("a red circle", seed=3, steps=STEPS, n=2).images, base.images) == 0


def test_start_end_and_two_controlnets_match_diffusers_multicontrolnet(world, tmp_path):
    """Each control acts within its [start, end] fraction of the steps (diffusers' control_guidance_start/end)
    and several sum their residuals as MultiControlNetModel does."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    _, first, _ = scene(2)
    _, second, _ = scene(3)
    folders = [made(ControlNet, world.backbone, f"c{i}", seed=i).save(tmp_path / f"c{i}") for i in range(2)]
    world.attach(str(folders[0]), 1.0, image=first, end=0.5)
    world.attach(str(folders[1]), 0.6, image=second, start=0.25)
    calls = []
    model = attached(world.backbone)["c0"]["adapter"].model
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    ours = world.generate("a blue square", seed=4, steps=STEPS)
    handle.remove()
    world.detach()
    assert len(calls) == STEPS // 2
    plain = StableDiffusionControlNetPipeline(**plain_components(world.pipe, *SD_PARTS),
                                              controlnet=[ControlNetModel.from_pretrained(f) for f in folders],
                                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs = diffusers_call(plain, ours.recipe, image=[first, second], controlnet_conditioning_scale=[1.0, 0.6],
                            control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0])
    assert same(ours.images, theirs) == 0


def test_control_lora_ip_adapter_and_eraser_in_one_call_and_the_recipe_remakes_it(world, tmp_path):
    from studio.adapters.ip_adapter import default_ip_adapter
    from test_lora import random_lora

    from studio.recipe import read_recipe
    from studio.training.erasing import erase

    control_path = tmp_path / "map.png"
    reference_path = tmp_path / "ref.png"
    image, control, _ = scene(5)
    control.save(control_path)
    image.save(reference_path)
    folder = made(ControlNet, world.backbone, "pose").save(tmp_path / "cn")
    t2i = made(T2iAdapter, world.backbone, "edges").save(tmp_path / "t2i")
    lora = random_lora(world.backbone, name="look").save(tmp_path / "look.safetensors")
    eraser = erase("circle", method="uce", backbone=world.backbone, out=str(tmp_path / "no-circle.safetensors")).path
    world.attach(str(lora), 0.5)
    world.attach(str(eraser), 1.0)
    world.attach(str(default_ip_adapter(world.backbone)), 0.6, image=reference_path)
    world.attach(str(folder), 0.9, image=control_path, preprocess="none")
    world.attach(str(t2i), 0.5, image=control_path, preprocess="mask", end=0.5)
    generation = world.generate("a green circle", seed=8, steps=STEPS)
    world.detach(world.adapters[-1]["adapter"])
    world.detach(world.adapters[-1]["adapter"])
    without = world.generate("a green circle", seed=8, steps=STEPS)
    assert same(generation.images, without.images) > 10
    path = generation.save(tmp_path / "out.png")[0]
    recipe = read_recipe(path)
    record = recipe.adapters[-1]
    assert record["kind"] == "t2i_adapter" and record["inputs"]["preprocess"] == "mask" and record["inputs"]["end"] == 0.5
    world.detach()
    again = StudioPipeline(world.backbone)
    assert same([again.replay(recipe)], generation.images) == 0
    again.detach()
    Image.new("RGB", (64, 64), "white").save(control_path)
    broken = StudioPipeline(world.backbone)
    with pytest.raises(InvalidArgumentError, match="map.png.*changed"):
        broken.replay(recipe)
    broken.detach()
    assert not attached(world.backbone)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_sdxl_sd3_and_flux_controls_match_diffusers_pipelines(backbones, family, tmp_path, monkeypatch):
    """tiny-sdxl: ControlNet and T2I-Adapter (the XL layout) against StableDiffusionXLControlNetPipeline /
    StableDiffusionXLAdapterPipeline; tiny-sd3 and tiny-flux: a ControlNet against StableDiffusion3ControlNetPipeline
    / FluxControlNetPipeline (whose map latent diffusers samples: here its mean, as studio takes it)."""
    import diffusers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    backbone = backbones(family)
    pipeline = StudioPipeline(backbone)
    _, control, _ = scene(6)
    kinds = (ControlNet, T2iAdapter) if family == "sdxl" else (ControlNet,)
    for cls in kinds:
        folder = made(cls, backbone, f"{family}-{cls.kind}").save(tmp_path / cls.kind)
        pipeline.attach(str(folder), 0.8, image=control)
        ours = pipeline.generate("a cat", seed=2, steps=2)
        pipeline.detach()
        parts = {k: v for k, v in backbone.pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
        monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
        if family == "sd3":
            plain = diffusers.StableDiffusion3ControlNetPipeline(
                **parts, controlnet=diffusers.SD3ControlNetModel.from_pretrained(folder))
            extra = dict(control_image=control, controlnet_conditioning_scale=0.8)
        elif family == "flux":
            plain = diffusers.FluxControlNetPipeline(
                **parts, controlnet=diffusers.FluxControlNetModel.from_pretrained(folder))
            extra = dict(control_image=control, controlnet_conditioning_scale=0.8)
        elif cls is ControlNet:
            plain = diffusers.StableDiffusionXLControlNetPipeline(
                **parts, controlnet=diffusers.ControlNetModel.from_pretrained(folder))
            extra = dict(image=control, controlnet_conditioning_scale=0.8)
        else:
            plain = diffusers.StableDiffusionXLAdapterPipeline(
                **parts, adapter=diffusers.T2IAdapter.from_pretrained(folder))
            extra = dict(image=control, adapter_conditioning_scale=0.8)
        if family == "sd3":
            from studio.backbones import t5_free_options

            extra |= t5_free_options(backbone.pipe)
        # SD3 on a CPU with AVX-512 rounds some pixels of this image one level apart (the commit before this one
        # does the same there; exact on AVX2): float summation order, not a different computation
        assert same(ours.images, diffusers_call(plain, ours.recipe, **extra)) <= (1 if family == "sd3" else 0)


def test_preprocessors_find_the_edges_and_the_object_offline():
    import cv2

    image, _, mask = scene(7, size="large", background="plain")
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    shrunk = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    outline = mask & ~(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    edges = np.asarray(preview(image, "canny"))[..., 0] > 0
    assert edges.sum() > 0.5 * outline.sum() and (edges & ~(grown & ~shrunk)).sum() <= 0.05 * edges.sum()
    ious = []
    for seed in range(40):  # on patterned backgrounds too, the foreground mask recovers the object (most of it)
        image, _, mask = scene(30 + seed)
        found = np.asarray(preview(image, "mask"))[..., 0] > 0
        ious.append((found & mask).sum() / (found | mask).sum())
    assert np.mean(ious) > 0.85 and np.mean(np.array(ious) > 0.8) >= 0.85
    soft = np.asarray(preview(image, "soft_edge"))[..., 0]
    assert soft.max() == 255 and soft[mask].mean() < soft.max()
    assert np.array_equal(np.asarray(preview(image, "none")), np.asarray(image))
    with pytest.raises(InvalidArgumentError, match="preprocess='sketch'"):
        preview(image, "sketch")


def test_bad_control_inputs_are_resized_with_a_note_or_refused_before_any_change(world, backbones, tmp_path):
    adapter = made(ControlNet, world.backbone, "bad")
    _, control, _ = scene(8)
    world.attach(adapter, 1.0, image=control.resize((96, 80)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        world.generate("a red circle", seed=1, steps=2)
    world.detach()
    assert any("96x80: resized to 64x64" in str(w.message) and "aspect ratio" in str(w.message) for w in caught)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        control_map(np.zeros((64, 64, 2), dtype=np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rgba = np.dstack([np.asarray(control), np.full((64, 64), 255, np.uint8)])
        assert control_map(rgba)[0].mode == "RGB"
    assert any("alpha" in str(w.message) for w in caught)
    black = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(black)
    with pytest.raises(InvalidArgumentError, match="black.png.*all-black"):
        world.attach(adapter, 1.0, image=black)
    with pytest.raises(InvalidArgumentError, match="no edges"):
        world.attach(adapter, 1.0, image=Image.new("RGB", (64, 64), "white"), preprocess="canny")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        world.attach(adapter, 1.0, image=tmp_path / "missing.png")
    with pytest.raises(InvalidArgumentError, match="start=0.6 and end=0.5"):
        world.attach(adapter, 1.0, image=control, start=0.6, end=0.5)
    assert not attached(world.backbone) and not world.adapters
    # another family: a studio folder by its manifest, a published folder by its shapes
    folder = adapter.save(tmp_path / "sd1-net")
    dit = StudioPipeline(backbones("sd3"))
    with pytest.raises(IncompatibleAdapterError, match="made for sd1"):
        dit.attach(str(folder), 1.0, image=control)
    published = tmp_path / "published"
    folder.rename(published)
    weights = published / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(weights), weights)  # no studio manifest, as on the hub
    xl = StudioPipeline(backbones("sdxl"))
    with pytest.raises(IncompatibleAdapterError, match="block_out_channels"):
        xl.attach(load_adapter(published, xl.backbone), 1.0, image=control)
    with pytest.raises(IncompatibleAdapterError, match="t2i_adapter on .*not supported"):
        T2iAdapter.create(backbones("sd3"), ControlConfig(family="sd3"))
    assert not attached(dit.backbone) and not attached(xl.backbone)
    published_adapter = load_adapter(published, world.backbone)  # the right backbone reads it: family from it
    with pytest.raises(ControlError, match="load the folder"):
        load_adapter(adapter.save(tmp_path / "again") / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ControlError, match="hf download nobody/no-such-controlnet"):
        load_adapter("nobody/no-such-controlnet", world.backbone)  # a hub id, offline in tests: named, with the fix
    assert published_adapter.config.family == "sd1" and published_adapter.kind == "controlnet"


def test_training_writes_folders_diffusers_loads_from_masks_or_paired_maps_and_resumes(tmp_path):
    from diffusers import ControlNetModel, SD3ControlNetModel, T2IAdapter

    from studio.training.trainer import TrainConfig, train
    from studio.world.folder import write_reference_folder

    folder = tmp_path / "refs"
    write_reference_folder(folder, n=6, masks=True)
    logs: list[str] = []
    for kind, backbone, loader in (("controlnet", "world-sd", ControlNetModel), ("t2i_adapter", "world-sd", T2IAdapter),
                                   ("controlnet", "world-dit", SD3ControlNetModel)):
        out = tmp_path / f"{kind}-{backbone}"
        path = train(folder=str(folder), out=str(out), kind=kind, backbone=backbone, condition="mask", steps=2,
                     batch=2, log=logs.append)
        model = loader.from_pretrained(path)
        manifest = load_adapter(path)
        assert manifest.kind == kind and manifest.config.condition == "mask"
        assert manifest.config.training["caption_dropout"] == (0.5 if kind == "controlnet" else 0.0)
        assert manifest.config.training["timestep_bias"] == ("content" if kind == "t2i_adapter" else "none")
        assert sum(p.numel() for p in model.parameters()) > 0
    # paired maps: conditions/NAME.png beside the images; one image without its map is left out and said
    (folder / "conditions").mkdir()
    for i in range(5):
        _, control, _ = scene(20 + i)
        control.save(folder / "conditions" / f"{i:03d}.png")
    out = tmp_path / "paired"
    config = TrainConfig(folder=str(folder), out=str(out), kind="controlnet", condition="paired", steps=4, batch=2,
                         checkpoint_every=2)
    with pytest.raises(InvalidArgumentError, match="folder name"):
        TrainConfig(folder=str(folder), out=str(tmp_path / "x.safetensors"), kind="controlnet")
    with pytest.raises(InvalidArgumentError, match="condition='depth'"):
        TrainConfig(folder=str(folder), out=str(out), kind="controlnet", condition="depth")

    stops = iter([False, True])
    from studio.training.trainer import TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train(config, log=logs.append, should_stop=lambda: next(stops))
    assert any("skipped 1 images without a map" in line and "005.png" in line for line in logs)
    finished = train(config, resume=True, log=logs.append)
    assert any("resumed at step 2" in line for line in logs)
    state = json.loads((finished / "config.json").read_text())
    assert state["_class_name"] == "ControlNetModel"


def test_cli_generate_with_the_shipped_controls_and_train_a_control(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.recipe import read_recipe
    from studio.world.folder import write_reference_folder

    _, control, _ = scene(9)
    control.save(tmp_path / "mask.png")
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "a red square", "--steps", "2", "--seed", "1", "--control",
                                 f"controlnet:{tmp_path / 'mask.png'}:0.8", "--control",
                                 f"t2i_adapter:{tmp_path / 'mask.png'}", "--control-end", "0.5",
                                 "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    recipe = read_recipe(tmp_path / "a.png")
    assert [a["kind"] for a in recipe.adapters] == ["controlnet", "t2i_adapter"]
    assert recipe.adapters[0]["weight"] == 0.8 and recipe.adapters[1]["inputs"]["end"] == 0.5
    bad = runner.invoke(app, ["generate", "x", "--steps", "1", "--control", "controlnet"])
    assert bad.exit_code != 0 and "KIND:IMAGE" in str(bad.exception or bad.output)
    folder = tmp_path / "refs"
    write_reference_folder(folder, n=4, masks=True)
    result = runner.invoke(app, ["train", str(folder), "--kind", "t2i_adapter", "--condition", "mask", "--steps", "2",
                                 "--batch", "2", "--out", str(tmp_path / "t2i")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t2i" / "config.json").is_file()
    shown = runner.invoke(app, ["inspect", str(tmp_path / "t2i")])
    assert shown.exit_code == 0 and "studio adapter (t2i_adapter)" in shown.output and "full_adapter_xl" in shown.output
