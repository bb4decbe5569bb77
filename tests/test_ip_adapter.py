"""IP-Adapter: made, trained, saved in the official layout, read by plain diffusers, attached with
reference images, routed (InstantStyle), several at once, refused when made for another family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image
from studio.adapters.base import IncompatibleAdapterError, load_adapter
from studio.adapters.ip_adapter import (
    IpAdapter,
    IpAdapterConfig,
    IpAdapterError,
    attached,
    default_ip_adapter,
    open_reference,
    scale_config,
)
from studio.pipelines import StudioPipeline

from studio.world.render import render, sample_labels


@pytest.fixture(scope="module")
def world():
    return StudioPipeline("world-sd")


def reference(seed: int = 0, **fixed):
    labels = sample_labels(np.random.default_rng(seed), **fixed)
    return render(labels, seed=seed)[0], labels


def tiny_encoder(folder, hidden: int = 32, projection: int = 24):
    """A small CLIP vision model of the real class, saved as a folder (what IP-Adapter repos ship)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=32, patch_size=8,
                                                           projection_dim=projection))
    model.save_pretrained(folder)
    return str(folder)


def official_file(path, tensors):
    """What h94/IP-Adapter publishes: the two prefixes, no studio manifest."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def plus_tensors(backbone, plain: dict, encoder_hidden: int, tokens: int = 8, width: int = 64):
    """An IP-Adapter Plus state in the official layout (the Resampler of tencent-ailab/IP-Adapter: latents,
    proj_in/out, norm_out, 4 layers of (norm1, norm2, to_q, to_kv, to_out) and a feed-forward)."""
    g = torch.Generator().manual_seed(1)
    cross = backbone.denoiser.config.cross_attention_dim
    t = {"image_proj.latents": torch.randn(1, tokens, width, generator=g) / width**0.5,
         "image_proj.proj_in.weight": torch.randn(width, encoder_hidden, generator=g) * 0.1,
         "image_proj.proj_in.bias": torch.zeros(width), "image_proj.proj_out.weight": torch.randn(cross, width, generator=g) * 0.1,
         "image_proj.proj_out.bias": torch.zeros(cross), "image_proj.norm_out.weight": torch.ones(cross),
         "image_proj.norm_out.bias": torch.zeros(cross)}
    for i in range(4):
        p = f"image_proj.layers.{i}"
        t.update({f"{p}.0.norm1.weight": torch.ones(width), f"{p}.0.norm1.bias": torch.zeros(width),
                  f"{p}.0.norm2.weight": torch.ones(width), f"{p}.0.norm2.bias": torch.zeros(width),
                  f"{p}.0.to_q.weight": torch.randn(64, width, generator=g) * 0.1,
                  f"{p}.0.to_kv.weight": torch.randn(128, width, generator=g) * 0.1,
                  f"{p}.0.to_out.weight": torch.randn(width, 64, generator=g) * 0.1,
                  f"{p}.1.0.weight": torch.ones(width), f"{p}.1.0.bias": torch.zeros(width),
                  f"{p}.1.1.weight": torch.randn(4 * width, width, generator=g) * 0.1,
                  f"{p}.1.3.weight": torch.randn(width, 4 * width, generator=g) * 0.1})
    t.update({k: v for k, v in plain.items() if k.startswith("ip_adapter.")})  # the attention layers: as a plain one
    return t


def processors(backbone):
    return {name: type(p).__name__ for name, p in backbone.denoiser.attn_processors.items()}


def test_a_new_adapter_starts_from_the_layers_own_keys_and_values(world):
    adapter = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1"))
    unet = world.backbone.denoiser
    attention = unet.get_submodule("up_blocks.0.attentions.2.transformer_blocks.0.attn2")
    crosses = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    index = crosses.index("up_blocks.0.attentions.2.transformer_blocks.0.attn2.processor")
    key = f"ip_adapter.{2 * index + 1}"
    assert torch.equal(adapter.tensors[f"{key}.to_k_ip.weight"], attention.to_k.weight.float())
    assert torch.equal(adapter.tensors[f"{key}.to_v_ip.weight"], attention.to_v.weight.float())
    assert adapter.tensors["image_proj.proj.weight"].shape == (4 * 64, 64)  # 4 tokens from world-clip's 64-d embedding


def test_attach_generate_detach_restores_the_backbone(world):
    before = processors(world.backbone)
    plain = world.generate("a red circle", seed=3, steps=4).images[0]
    image, _ = reference(1)
    adapter = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1", name="t1"))
    world.attach(adapter, 1.0, image=image)
    steered = world.generate("a red circle", seed=3, steps=4)
    assert processors(world.backbone) != before and "ip_adapter" in steered.recipe.adapters[0]["kind"]
    assert np.abs(pixels(steered.images[0]) - pixels(plain)).mean() > 1  # the image prompt changed the image
    world.set_weight(adapter, 0.0)  # λ = 0: the image branch adds nothing
    assert np.abs(pixels(world.generate("a red circle", seed=3, steps=4).images[0]) - pixels(plain)).max() <= 1
    world.detach(adapter)
    assert processors(world.backbone) == before and world.backbone.denoiser.encoder_hid_proj is None
    assert world.backbone.pipe.image_encoder is None and not attached(world.backbone)
    assert np.array_equal(pixels(world.generate("a red circle", seed=3, steps=4).images[0]), pixels(plain))


def test_the_file_is_the_official_layout_and_plain_diffusers_reads_it_to_the_same_pixels(world, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from studio.world.models import world_folder

    adapter = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1", name="official"), seed=5)
    path = adapter.save(tmp_path / "ip.safetensors")
    tensors = load_adapter(path).tensors
    assert {k.split(".")[0] for k in tensors} == {"image_proj", "ip_adapter"}
    image, _ = reference(2)
    world.attach(path, 0.8, image=image)
    ours = world.generate("a blue square", seed=9, steps=5, scheduler="ddim", guidance=7.0).images[0]
    world.detach()
    clip = world_folder("world-clip")
    pipe = StableDiffusionPipeline.from_pretrained(world_folder("world-sd"), safety_checker=None,
                                                   image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip),
                                                   feature_extractor=CLIPImageProcessor.from_pretrained(clip))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe("a blue square", ip_adapter_image=image, num_inference_steps=5, guidance_scale=7.0,
                  generator=[torch.Generator().manual_seed(9)]).images[0]
    assert np.array_equal(pixels(ours), pixels(theirs))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_published_files_plain_and_plus_attach_like_diffusers_loads_them(backbones, family, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    backbone = backbones(family)
    encoder = tiny_encoder(tmp_path / "image_encoder")
    pipeline = StudioPipeline(backbone)
    image, _ = reference(3)
    plain = IpAdapter.create(backbone, IpAdapterConfig(family=family, image_encoder=encoder), seed=2).tensors
    for kind, tensors in (("plain", plain), ("plus", plus_tensors(backbone, plain, encoder_hidden=32))):
        path = official_file(tmp_path / f"ip-{kind}.safetensors", tensors)
        adapter = load_adapter(path, backbone)
        assert isinstance(adapter, IpAdapter) and adapter.config.plus == (kind == "plus")
        pipeline.attach(adapter, 0.7, image=image, image_encoder=encoder)
        ours = pipeline.generate("a cat", seed=4, steps=2, guidance=5.0, scheduler="ddim").images[0]
        pipeline.detach()
        pipe = backbone.pipe
        pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
                              feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
        pipe.set_ip_adapter_scale(0.7)
        pipe.scheduler = backbone.scheduler("ddim")
        side = backbone.default_size
        theirs = pipe("a cat", ip_adapter_image=image, num_inference_steps=2, guidance_scale=5.0, negative_prompt="",
                      width=side, height=side, generator=[torch.Generator().manual_seed(4)]).images[0]
        pipe.unload_ip_adapter()
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1, kind


def test_weights_for_another_family_or_with_missing_keys_are_refused_before_any_change(world, backbones, tmp_path):
    xl = backbones("sdxl")
    encoder = tiny_encoder(tmp_path / "enc")
    xl_file = official_file(tmp_path / "xl.safetensors",
                            IpAdapter.create(xl, IpAdapterConfig(family="sdxl", image_encoder=encoder)).tensors)
    before = processors(world.backbone)
    with pytest.raises(IncompatibleAdapterError, match="another family|for a larger UNet|to_k_ip of shape"):
        world.attach(xl_file, 1.0, image=reference(0)[0])
    tensors = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1")).tensors
    del tensors["ip_adapter.5.to_v_ip.weight"]
    broken = official_file(tmp_path / "broken.safetensors", tensors)
    with pytest.raises(IpAdapterError, match=r"lacks 1 of the 24 tensors .*ip_adapter\.5\.to_v_ip\.weight"):
        world.attach(broken, 1.0, image=reference(0)[0])
    with pytest.raises(IncompatibleAdapterError, match="not supported yet"):
        IpAdapter.create(backbones("pixart"), IpAdapterConfig(family="pixart"))
    assert processors(world.backbone) == before and not attached(world.backbone) and not world.adapters


def test_references_with_alpha_grey_odd_and_huge_sizes_are_read_and_bad_files_named(world, tmp_path):
    image, _ = reference(4)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.new("L", image.size, 0))  # fully transparent: composited on white
    cases = {"alpha": rgba, "grey": image.convert("L"), "odd": image.resize((37, 91)),
             "huge": image.resize((4000, 3000)), "palette": image.convert("P")}
    for name, case in cases.items():
        case.save(tmp_path / f"{name}.png")
        opened, record = open_reference(tmp_path / f"{name}.png")
        assert opened.mode == "RGB" and max(opened.size) <= 1024 and len(record["sha256"]) == 64, name
    assert np.asarray(open_reference(tmp_path / "alpha.png")[0]).min() == 255
    adapter = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1", name="refs"))
    world.attach(adapter, 1.0, images=[tmp_path / f"{n}.png" for n in cases])  # five references read together
    assert attached(world.backbone)["refs"]["embeds"].shape == (2, 5, 64)
    world.detach()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="bad.png.*not a readable image"):
        world.attach(adapter, 1.0, image=tmp_path / "bad.png")
    with pytest.raises(Exception, match="missing.png.*does not exist"):
        world.attach(adapter, 1.0, image=tmp_path / "missing.png")
    assert not attached(world.backbone)


def test_style_routing_reaches_only_the_style_layers_and_two_adapters_stack(world):
    a = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1", name="a"), seed=1)
    b = IpAdapter.create(world.backbone, IpAdapterConfig(family="sd1", name="b"), seed=2)
    world.attach(a, 0.8, image=reference(5)[0], routing="style")
    world.attach(b, 0.5, image=reference(6)[0])
    scales = {n.removesuffix(".processor"): list(p.scale) for n, p in world.backbone.denoiser.attn_processors.items()
              if n.endswith("attn2.processor")}
    on = {n for n, s in scales.items() if s[0] > 0}
    assert on == {f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in range(3)}  # world-sd's style block
    assert scales["up_blocks.1.attentions.2.transformer_blocks.0.attn2"] == [0.8, 0.5]
    assert all(s[1] == 0.5 for s in scales.values())
    world.detach(a)
    assert all(len(p.scale) == 1 for n, p in world.backbone.denoiser.attn_processors.items()
               if n.endswith("attn2.processor"))
    world.detach()
    with pytest.raises(Exception, match="routing='styel'"):
        scale_config(world.backbone, "styel", 1.0)


def test_the_recipe_remakes_an_image_prompted_image(world, tmp_path):
    image, _ = reference(7)
    image.save(tmp_path / "ref.png")
    world.attach(default_ip_adapter(world.backbone), 0.9, image=tmp_path / "ref.png", routing="style",
                 content="a red circle")
    first = world.generate("a green square", seed=2, steps=4)
    record = first.recipe.adapters[0]
    assert record["inputs"]["images"] == [str((tmp_path / "ref.png").resolve())]
    assert record["inputs"]["routing"] == "style" and record["inputs"]["content"] == "a red circle"
    world.detach()
    again = world.replay(first.recipe)  # attaches the adapter with the same reference, routing and content
    assert np.array_equal(pixels(again), pixels(first.images[0]))
    world.detach()
    render(sample_labels(np.random.default_rng(99)), seed=99)[0].save(tmp_path / "ref.png")  # the file changed
    with pytest.raises(Exception, match="not the ones the recipe"):
        world.replay(first.recipe)
    world.detach()


def test_the_shipped_world_sd_adapter_draws_the_references_colour_and_background(world):
    """The IP-Adapter in assets/ (bench/image_prompt.py trained it): an empty prompt and 8 references."""
    from studio.world.evaluator import predict

    refs = [reference(100 + i) for i in range(8)]
    adapter = load_adapter(default_ip_adapter(world.backbone))
    images = []
    for i, (image, _) in enumerate(refs):
        world.attach(adapter, 1.0, image=image)
        images += world.generate("", seed=i, steps=20).images
        world.detach()
    seen = predict(images)
    for attribute in ("colour", "background"):
        hits = sum(p == getattr(r, attribute) for p, (_, r) in zip(seen[attribute], refs, strict=True))
        assert hits >= 6, (attribute, seen[attribute], [getattr(r, attribute) for _, r in refs])


def test_training_writes_an_adapter_plain_diffusers_loads(tmp_path):
    from studio.training.trainer import TrainConfig, train
    from studio.world.folder import write_reference_folder

    write_reference_folder(tmp_path / "refs", n=8, seed=1)
    path = train(TrainConfig(folder=str(tmp_path / "refs"), out=str(tmp_path / "ip.safetensors"), kind="ip_adapter",
                             steps=3, batch=4, lr=1e-3, checkpoint_every=2), log=lambda _: None)
    adapter = load_adapter(path)
    assert adapter.kind == "ip_adapter" and adapter.config.training["steps"] == 3
    start = IpAdapter.create(StudioPipeline("world-sd").backbone, IpAdapterConfig(family="sd1"))
    assert not torch.equal(adapter.tensors["image_proj.proj.weight"], start.tensors["image_proj.proj.weight"])
    assert not torch.equal(adapter.tensors["ip_adapter.1.to_k_ip.weight"], start.tensors["ip_adapter.1.to_k_ip.weight"])


def test_cli_image_prompt_with_style_routing_and_from_remakes_it(tmp_path):
    from test_cli import run_cli

    from studio.recipe import read_recipe

    reference(8)[0].save(tmp_path / "ref.png")
    first = run_cli("generate", "a green square", "--ip-image", str(tmp_path / "ref.png"), "--style-only",
                    "--ip-scale", "0.7", "--seed", "3", "--steps", "4", "--out", str(tmp_path / "out.png"))
    assert first.returncode == 0, first.stderr
    record = read_recipe(tmp_path / "out.png").adapters[0]
    assert record["kind"] == "ip_adapter" and record["weight"] == 0.7 and record["inputs"]["routing"] == "style"
    again = run_cli("generate", "--from", str(tmp_path / "out.png"), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(Image.open(tmp_path / "again.png")), pixels(Image.open(tmp_path / "out.png")))
    lost = run_cli("generate", "x", "--style-only", "--out", str(tmp_path / "x.png"))
    assert lost.returncode == 2 and "add --ip-image" in lost.stderr


def test_a_mask_limits_the_image_prompt_to_its_white_part(world):
    """diffusers' IP-Adapter masks: outside the mask the image tokens add nothing."""
    image, _ = reference(9)
    adapter = load_adapter(default_ip_adapter(world.backbone))
    plain = pixels(world.generate("a red circle", seed=6, steps=6).images[0])
    results = {}
    for name, mask in (("none", None), ("left", Image.fromarray(np.tile((np.arange(64) < 32) * 255, (64, 1)).astype(np.uint8))),
                       ("black", Image.new("L", (64, 64), 0))):
        world.attach(adapter, 1.0, image=image, mask=mask)
        results[name] = pixels(world.generate("a red circle", seed=6, steps=6).images[0])
        world.detach()
    assert np.abs(results["none"] - plain).mean() > 2
    assert np.abs(results["black"] - plain).max() <= 1  # masked out everywhere: the base model's image
    assert np.abs(results["left"] - plain).mean() > 1 and np.abs(results["left"] - results["none"]).mean() > 1
