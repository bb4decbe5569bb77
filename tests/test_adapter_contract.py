"""The contract every registered kind keeps (README, Adapters: one module per kind, the same verbs). Weight-space kinds: made non-identity so the
checks can fail, attach -> detach restores outputs and keys exactly, fused == unfused, unfuse is
exact, save -> load round-trips, another family is refused before any weight changes. The eraser is
an SPM one, so its transport hooks are attached and removed too. Attention-space kinds (image prompts,
style injection) take run-time inputs: attach changes the image, detach gives back the same pixels and
processors, save -> load round-trips, another family is refused before anything changes. Residual-space kinds
(ControlNet, T2I-Adapter) likewise, with a control image, saved as diffusers folders, their hook removed on detach."""

from __future__ import annotations

import pytest
import torch
from studio.adapters.base import IncompatibleAdapterError, adapter_kinds, load_adapter
from test_lora import denoise

from studio.backbones import load_backbone
from studio.errors import InvalidArgumentError

ATTENTION_KINDS = ("ip_adapter", "style_injection")
RESIDUAL_KINDS = ("controlnet", "t2i_adapter")


def weight_kinds() -> dict[str, tuple[str, dict]]:
    """Every registered weight-space kind and alias: name -> (the kind that trains it, its sample options)."""
    from studio.adapters.base import KIND_ALIASES, WeightAdapter

    kinds = {name: (name, dict(cls.sample_options)) for name, cls in adapter_kinds().items()
             if issubclass(cls, WeightAdapter)}
    for name, alias in KIND_ALIASES.items():
        kinds[name] = (alias.kind, {**kinds[alias.kind][1], **alias.options})
    return kinds


KINDS = weight_kinds()


def make(kind: str, backbone, seed: int = 0):
    """A fresh adapter of `kind` with its trainable tensors randomised (created ones are identities)."""
    base, options = KINDS[kind]
    cls = adapter_kinds().get_or_raise(base)
    config = cls.config_class(family=backbone.family.name, name=f"{kind}-{seed}", **options)
    adapter = cls.create(backbone, config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    adapter.tensors = {k: v if "magnitude" in k or any(not adapter.trains(part) for part in k.split("."))
                       else v + torch.randn(v.shape, generator=g) * 0.2 for k, v in adapter.tensors.items()}
    return adapter


def test_every_registered_kind_is_covered():
    assert set(adapter_kinds()) == {k for k, (base, _) in KINDS.items() if k == base} | set(ATTENTION_KINDS) \
        | set(RESIDUAL_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_contract(kind, tmp_path):
    backbone = load_backbone("tiny-sd1")
    keys = list(backbone.denoiser.state_dict())
    base = denoise(backbone)
    adapter = make(kind, backbone)
    adapter.attach(backbone)
    attached = denoise(backbone)
    assert (attached - base).abs().max() > 1e-3  # non-identity
    try:  # every hook of the table runs: set_weight's
        adapter.set_weight(backbone, 0.5)
    except InvalidArgumentError:  # a rotation has no partial strength: refused, nothing changed
        pass
    else:
        assert not torch.equal(denoise(backbone), attached)
    adapter.set_weight(backbone, 1.0)
    assert torch.equal(denoise(backbone), attached)
    adapter.prepare(backbone, ["a cat"], 1)  # the optional hooks, declared on the base class
    adapter.release()
    assert adapter.inputs_record(backbone) in (None, {"part": "both"})
    assert type(adapter).call_arguments(backbone, 7.5) == {}
    adapter.detach(backbone)
    assert torch.equal(denoise(backbone), base) and list(backbone.denoiser.state_dict()) == keys
    adapter.fuse(backbone)
    assert torch.allclose(denoise(backbone), attached, atol=1e-5)
    adapter.unfuse(backbone)
    assert torch.equal(denoise(backbone), base)
    loaded = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    loaded.attach(backbone)
    assert torch.equal(denoise(backbone), attached)
    loaded.detach(backbone)
    other = load_backbone("tiny-sdxl")
    before = {k: v.clone() for k, v in other.denoiser.state_dict().items()}
    with pytest.raises(IncompatibleAdapterError, match="sd1.*sdxl"):
        loaded.attach(other)
    with pytest.raises(IncompatibleAdapterError, match="sd1.*sdxl"):
        loaded.fuse(other)
    after = other.denoiser.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_attention_contract(kind, tmp_path):
    import numpy as np
    from conftest import pixels
    from studio.pipelines import StudioPipeline
    from test_ip_adapter import reference

    backbone = load_backbone("world-sd")  # a trained UNet: tiny-sd1's random one barely moves its pixels
    pipeline = StudioPipeline(backbone)
    processors = {n: type(p) for n, p in backbone.denoiser.attn_processors.items()}
    keys = list(backbone.denoiser.state_dict())
    base = pixels(pipeline.generate("a cat", seed=3, steps=3).images[0])
    cls = adapter_kinds()[kind]
    adapter = cls.create(backbone, cls.config_class(family="sd1", name=kind), seed=1)
    if kind == "ip_adapter":  # non-identity: a created IP-Adapter reads the image like the text
        adapter.tensors = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) * 0.2
                           for k, v in adapter.tensors.items()}
    image = reference(1)[0]
    pipeline.attach(adapter, 1.0, image=image)
    attached = pixels(pipeline.generate("a cat", seed=3, steps=3).images[0])
    assert np.abs(attached - base).mean() > 1  # non-identity
    pipeline.detach()
    assert {n: type(p) for n, p in backbone.denoiser.attn_processors.items()} == processors
    assert list(backbone.denoiser.state_dict()) == keys
    assert np.array_equal(pixels(pipeline.generate("a cat", seed=3, steps=3).images[0]), base)
    loaded = load_adapter(adapter.save(tmp_path / "a.safetensors"), backbone)
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    pipeline.attach(loaded, 1.0, image=image)
    assert np.array_equal(pixels(pipeline.generate("a cat", seed=3, steps=3).images[0]), attached)
    pipeline.detach()
    other = load_backbone("tiny-sdxl")
    before = {n: type(p) for n, p in other.denoiser.attn_processors.items()}
    with pytest.raises(IncompatibleAdapterError, match="sd1.*sdxl"):
        loaded.attach(other, 1.0, image=image)
    assert {n: type(p) for n, p in other.denoiser.attn_processors.items()} == before


@pytest.mark.parametrize("kind", RESIDUAL_KINDS)
def test_residual_contract(kind, tmp_path):
    import numpy as np
    from conftest import pixels
    from studio.pipelines import StudioPipeline
    from test_control import scene

    backbone = load_backbone("world-sd")
    pipeline = StudioPipeline(backbone)
    keys = list(backbone.denoiser.state_dict())
    base = pixels(pipeline.generate("a cat", seed=3, steps=3).images[0])
    cls = adapter_kinds()[kind]
    adapter = cls.create(backbone, cls.config_class(family="sd1", name=kind), seed=1)
    with torch.no_grad():  # non-identity: a created ControlNet's zero convolutions add nothing
        for p in adapter.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    adapter.sync_from(backbone)
    _, control, _ = scene(1)
    pipeline.attach(adapter, 1.0, image=control)
    attached = pixels(pipeline.generate("a cat", seed=3, steps=3).images[0])
    assert np.abs(attached - base).mean() > 1  # non-identity
    pipeline.detach()
    assert not backbone.denoiser._forward_pre_hooks and list(backbone.denoiser.state_dict()) == keys
    assert np.array_equal(pixels(pipeline.generate("a cat", seed=3, steps=3).images[0]), base)
    loaded = load_adapter(adapter.save(tmp_path / kind), backbone)
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    pipeline.attach(loaded, 1.0, image=control)
    assert np.array_equal(pixels(pipeline.generate("a cat", seed=3, steps=3).images[0]), attached)
    pipeline.detach()
    other = load_backbone("tiny-sdxl")
    with pytest.raises(IncompatibleAdapterError, match="sd1.*sdxl"):
        loaded.attach(other, 1.0, image=control)
    assert not other.denoiser._forward_pre_hooks
