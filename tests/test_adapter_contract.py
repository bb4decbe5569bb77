"""The contract every registered weight-space kind keeps (STYLE.md #12): made non-identity so the
checks can fail, attach -> detach restores outputs and keys exactly, fused == unfused, unfuse is
exact, save -> load round-trips, another family is refused before any weight changes. The eraser is
an SPM one, so its transport hooks are attached and removed too."""

from __future__ import annotations

import pytest
import torch
from studio.adapters.base import IncompatibleAdapterError, adapter_kinds, load_adapter
from test_lora import denoise

from studio.backbones import load_backbone

KINDS = {"lora": {}, "dora": {"dora": True}, "orthogonal": {"concept_seed": 3, "rank": 4},
         "oft": {"block_size": 4}, "boft": {"block_size": 4},
         "erase": {"method": "spm", "concepts": ["cat"], "rank": 1, "transport": True}}


def make(kind: str, backbone, seed: int = 0):
    """A fresh adapter of `kind` with its trainable tensors randomised (created ones are identities)."""
    options = dict(KINDS[kind])
    cls = adapter_kinds().get_or_raise("lora" if kind == "dora" else kind)
    config = cls.config_class(family=backbone.family.name, name=f"{kind}-{seed}", **options)
    adapter = cls.create(backbone, config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    frozen = ("lora_A",) if kind == "orthogonal" else ()
    adapter.tensors = {k: v if any(f in k for f in frozen) or "magnitude" in k
                       else v + torch.randn(v.shape, generator=g) * 0.2 for k, v in adapter.tensors.items()}
    return adapter


def test_every_registered_kind_is_covered():
    assert set(adapter_kinds()) == {k for k in KINDS if k != "dora"}


@pytest.mark.parametrize("kind", KINDS)
def test_contract(kind, tmp_path):
    backbone = load_backbone("tiny-sd1")
    keys = list(backbone.denoiser.state_dict())
    base = denoise(backbone)
    adapter = make(kind, backbone)
    adapter.attach(backbone)
    attached = denoise(backbone)
    assert (attached - base).abs().max() > 1e-3  # non-identity
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
