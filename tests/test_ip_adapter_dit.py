"""IP-Adapter on SD3-class DiTs: diffusers' SD3 layout (timestep-aware resampler, joint-attention image
keys/values), made and trained on world-dit, read by plain diffusers, routed per transformer block, and
with a SigLIP encoder on the real SD3 architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pixels
from studio.adapters.base import IncompatibleAdapterError, load_adapter
from studio.adapters.ip_adapter import IpAdapter, IpAdapterConfig, IpAdapterError, attached
from studio.pipelines import StudioPipeline

from studio.errors import InvalidArgumentError
from studio.world.render import render, sample_labels


@pytest.fixture(scope="module")
def dit():
    return StudioPipeline("world-dit")


def reference(seed: int = 0):
    return render(sample_labels(np.random.default_rng(seed)), seed=seed)[0]


def ip_processors(backbone):
    return {n: p for n, p in backbone.denoiser.attn_processors.items() if hasattr(p, "to_k_ip")}


def test_a_new_dit_adapter_reads_like_the_layers_own_keys_and_leaves_the_backbone_as_it_was(dit):
    transformer = dit.backbone.denoiser
    adapter = IpAdapter.create(dit.backbone, IpAdapterConfig(family="sd3", name="d"), seed=1)
    assert adapter.config.tokens == 16 and adapter.tensors["image_proj.latents"].shape == (1, 16, 128)
    attention = transformer.transformer_blocks[2].attn
    assert torch.equal(adapter.tensors["ip_adapter.2.to_k_ip.weight"], attention.to_k.weight.float())
    assert torch.equal(adapter.tensors["ip_adapter.2.to_v_ip.weight"], attention.to_v.weight.float())
    assert not adapter.tensors["ip_adapter.2.norm_ip.linear.weight"].any()  # a plain layer norm at the start
    plain = dit.generate("a red circle", seed=3, steps=4).images[0]
    dit.attach(adapter, 1.0, image=reference(1))
    assert len(ip_processors(dit.backbone)) == transformer.config.num_layers
    assert np.abs(pixels(dit.generate("a red circle", seed=3, steps=4).images[0]) - pixels(plain)).mean() > 1
    dit.set_weight(adapter, 0.0)
    assert np.array_equal(pixels(dit.generate("a red circle", seed=3, steps=4).images[0]), pixels(plain))
    dit.detach(adapter)
    assert not ip_processors(dit.backbone) and transformer.image_proj is None and not attached(dit.backbone)
    assert np.array_equal(pixels(dit.generate("a red circle", seed=3, steps=4).images[0]), pixels(plain))


def test_the_file_is_sd3s_layout_and_plain_diffusers_reads_it_to_the_same_pixels(dit, tmp_path):
    """`StableDiffusion3Pipeline.load_ip_adapter` reads the file; the timestep-aware resampler runs at
    every step (as training sees each step's timestep), and the pixels are diffusers' own."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from studio.world.models import world_folder

    path = IpAdapter.create(dit.backbone, IpAdapterConfig(family="sd3", name="official"), seed=5).save(
        tmp_path / "ip.safetensors")
    assert {k.split(".")[0] for k in load_adapter(path).tensors} == {"image_proj", "ip_adapter"}
    image = reference(2)
    dit.attach(path, 0.8, image=image)
    calls = []
    hook = dit.backbone.denoiser.image_proj.register_forward_hook(lambda *_: calls.append(1))
    dit.generate("a blue square", seed=9, steps=4, guidance=5.0)
    hook.remove()
    assert len(calls) == 4
    ours = dit.generate("a blue square", seed=9, steps=4, guidance=5.0).images[0]
    dit.detach()
    clip = world_folder("world-clip")
    pipe = StableDiffusion3Pipeline.from_pretrained(world_folder("world-dit"), text_encoder_3=None, tokenizer_3=None,
                                                    image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip),
                                                    feature_extractor=CLIPImageProcessor.from_pretrained(clip))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    side = dit.backbone.default_size
    theirs = pipe("a blue square", ip_adapter_image=image, num_inference_steps=4, guidance_scale=5.0, width=side,
                  height=side, max_sequence_length=20, negative_prompt="",
                  generator=[torch.Generator().manual_seed(9)]).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_style_routing_scales_only_the_style_blocks(dit):
    from studio.adapters.ip_adapter import ROUTES

    adapter = IpAdapter.create(dit.backbone, IpAdapterConfig(family="sd3", name="r"))
    dit.attach(adapter, 0.6, image=reference(3), routing="style")
    scales = {int(n.split(".")[1]): p.scale for n, p in ip_processors(dit.backbone).items()}
    assert {i for i, s in scales.items() if s} == set(ROUTES["world-dit"]["style"])
    assert all(s in (0.0, 0.6) for s in scales.values())
    dit.set_weight(adapter, 0.3)
    assert max(p.scale for p in ip_processors(dit.backbone).values()) == 0.3
    dit.detach()
    dit.attach(adapter, 1.0, image=reference(3), routing={0: 1.0, 5: 0.5})
    assert [p.scale for p in ip_processors(dit.backbone).values()] == [1.0, 0, 0, 0, 0, 0.5]
    dit.detach()
    with pytest.raises(InvalidArgumentError, match="block index"):
        dit.attach(adapter, 1.0, image=reference(3), routing={9: 1.0})
    with pytest.raises(InvalidArgumentError, match="no layout blocks for 'world-dit'"):  # the sweep found none
        dit.attach(adapter, 1.0, image=reference(3), routing="style+layout")
    assert not ip_processors(dit.backbone)


def test_what_the_dit_adapter_cannot_take_is_refused_before_any_change(dit, backbones, tmp_path):
    a = IpAdapter.create(dit.backbone, IpAdapterConfig(family="sd3", name="a"))
    b = IpAdapter.create(dit.backbone, IpAdapterConfig(family="sd3", name="b"))
    with pytest.raises(InvalidArgumentError, match="masks work on UNet IP-Adapters only"):
        dit.attach(a, 1.0, image=reference(0), mask=reference(1))
    with pytest.raises(InvalidArgumentError, match="content subtraction"):
        dit.attach(a, 1.0, image=reference(0), content="a red circle")
    dit.attach(a, 1.0, image=reference(0))
    with pytest.raises(InvalidArgumentError, match="one IP-Adapter at a time"):
        dit.attach(b, 1.0, image=reference(0))
    dit.detach()
    tensors = dict(a.tensors)
    del tensors["ip_adapter.3.norm_ip_k.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(IpAdapterError, match=r"lacks 1 of .*ip_adapter\.3\.norm_ip_k\.weight"):
        dit.attach(tmp_path / "broken.safetensors", 1.0, image=reference(0))
    with pytest.raises(IncompatibleAdapterError, match="made for sd3"):  # world-dit's adapter on world-sd
        StudioPipeline("world-sd").attach(a, 1.0, image=reference(0))
    with pytest.raises(IncompatibleAdapterError, match="not supported yet"):
        IpAdapter.create(backbones("flux"), IpAdapterConfig(family="flux"))
    assert not ip_processors(dit.backbone) and not dit.adapters


def test_the_real_sd3_architecture_takes_a_siglip_encoder_like_sd35s(backbones, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "siglip")
    backbone = backbones("sd3")
    pipeline = StudioPipeline(backbone)
    adapter = IpAdapter.create(backbone, IpAdapterConfig(family="sd3", image_encoder=str(tmp_path / "siglip")), seed=3)
    assert adapter.tensors["image_proj.proj_in.weight"].shape[1] == 48  # the SigLIP width
    plain = pipeline.generate("a cat", seed=1, steps=2).images[0]
    pipeline.attach(adapter, 1.0, image=reference(4))
    assert type(backbone.pipe.image_encoder).__name__ == "SiglipVisionModel"
    steered = pipeline.generate("a cat", seed=1, steps=2).images[0]
    pipeline.detach()
    assert np.abs(pixels(steered) - pixels(plain)).mean() > 0.5


def test_training_on_world_dit_writes_an_adapter_plain_diffusers_loads(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from studio.training.trainer import TrainConfig, train
    from studio.world.folder import write_reference_folder
    from studio.world.models import world_folder

    write_reference_folder(tmp_path / "refs", n=8, seed=1)
    path = train(TrainConfig(folder=str(tmp_path / "refs"), out=str(tmp_path / "ip.safetensors"), kind="ip_adapter",
                             backbone="world-dit", steps=3, batch=4, lr=1e-3, checkpoint_every=2), log=lambda _: None)
    adapter = load_adapter(path)
    start = IpAdapter.create(StudioPipeline("world-dit").backbone, IpAdapterConfig(family="sd3"))
    for key in ("image_proj.latents", "ip_adapter.0.to_k_ip.weight", "ip_adapter.5.norm_ip.linear.weight"):
        assert not torch.equal(adapter.tensors[key], start.tensors[key]), key
    pipe = StableDiffusion3Pipeline.from_pretrained(world_folder("world-dit"), text_encoder_3=None, tokenizer_3=None)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    assert torch.equal(pipe.transformer.image_proj.latents.detach().float(), adapter.tensors["image_proj.latents"])
