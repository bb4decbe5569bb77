"""LoRA / DoRA: attach, weight, fuse, detach; the file; reading diffusers, kohya and LyCORIS layouts."""

from __future__ import annotations

import pytest
import torch
from studio.adapters.base import IncompatibleAdapterError, UnknownKeysError, load_adapter, module_table
from studio.adapters.lora import LoraAdapter, LoraConfig, target_modules

from studio.backbones import load_backbone
from studio.deltas import LowRank
from studio.errors import UnsafeFileError
from studio.lora_formats import kohya_names, to_kohya


def random_deltas(backbone, names, rank=4, seed=0, alpha=None):
    g = torch.Generator().manual_seed(seed)
    modules = module_table(backbone)
    deltas = {}
    for name in names:
        weight = modules[name].weight
        out, rest = weight.shape[0], weight.shape[1:]
        up = torch.randn(out, rank, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.2
        deltas[name] = LowRank(up=up, down=torch.randn(rank, *rest, generator=g) * 0.2, alpha=alpha or float(rank))
    return deltas


def random_lora(backbone, *, target="attention", text_encoder=False, rank=4, seed=0, name="a", dora=False):
    names = target_modules(backbone, target, text_encoder=text_encoder)
    config = LoraConfig(family=backbone.family.name, base=backbone.source, name=name, rank=rank, dora=dora)
    adapter = LoraAdapter.from_deltas(random_deltas(backbone, names, rank, seed, alpha=rank / 2), config)
    if dora:
        modules = module_table(backbone)
        for n in names:  # magnitudes away from the base norms, so the DoRA path does something
            norm = modules[n].weight.detach().flatten(1).norm(dim=1)
            adapter.tensors[f"{n}.lora_magnitude_vector"] = norm * 1.3
    return adapter


def denoise(backbone, seed=0):
    """One denoiser call on fixed random inputs (the family's own signature); a Backbone or a pipe."""
    g = torch.Generator().manual_seed(seed)
    pipe = getattr(backbone, "pipe", backbone)
    with torch.no_grad():
        if hasattr(pipe, "unet"):
            unet = pipe.unet
            ctx = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
            extra = {}
            if unet.config.addition_embed_type == "text_time":
                text_embeds = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
                time_ids = torch.randn(1, 6, generator=g)
                extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
            x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
            return unet(x, torch.tensor([500]), ctx, **extra).sample
        t = pipe.transformer
        x = torch.randn(1, t.config.in_channels, 8, 8, generator=g)
        ctx = torch.randn(1, 6, t.config.joint_attention_dim, generator=g)
        pooled = torch.randn(1, t.config.pooled_projection_dim, generator=g)
        return t(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ctx,
                 pooled_projections=pooled).sample


def encode_text(backbone, component="text_encoder"):
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        return getattr(backbone.pipe, component)(ids)[0]


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux", "pixart"])
def test_blocks_target_is_the_transformer_blocks_attention_and_feed_forward(family):
    backbone = load_backbone(f"tiny-{family}")
    blocks = set(target_modules(backbone, "blocks"))
    linear = set(target_modules(backbone, "all-linear"))
    assert blocks < linear and blocks >= set(target_modules(backbone, "attention"))
    assert any(".ff." in n or n.endswith("proj_mlp") for n in blocks)  # the feed-forward layers too
    # not the modulation (adaLN), the timestep/text embedders nor the output layer: every prompt goes through them
    left = [n.split(".", 1)[1] for n in linear - blocks]
    assert left and all("transformer_blocks" not in n or ".norm" in n for n in left)
    assert not any(("norm" in n and "linear" in n) or "embed" in n or n == "proj_out" for n in
                   (b.split(".", 1)[1] for b in blocks))


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_attach_weight_detach_restores_exactly(family):
    backbone = load_backbone(f"tiny-{family}")
    keys = list(backbone.denoiser.state_dict())
    base = denoise(backbone)
    adapter = random_lora(backbone)
    adapter.attach(backbone, weight=1.0)
    full = denoise(backbone)
    assert (full - base).abs().max() > 1e-3
    adapter.set_weight(backbone, 0.5)
    half = denoise(backbone)
    assert (half - base).abs().max() < (full - base).abs().max()
    adapter.set_weight(backbone, 0.0)
    assert torch.equal(denoise(backbone), base)
    adapter.set_weight(backbone, 1.0)
    assert torch.allclose(denoise(backbone), full)
    adapter.detach(backbone)
    assert torch.equal(denoise(backbone), base)
    assert list(backbone.denoiser.state_dict()) == keys  # PEFT wrappers gone


@pytest.mark.parametrize("dora", [False, True])
def test_fused_equals_unfused_and_unfuse_is_exact(dora):
    backbone = load_backbone("tiny-sd1")
    base = denoise(backbone)
    adapter = random_lora(backbone, dora=dora)
    adapter.attach(backbone, weight=0.8)
    unfused = denoise(backbone)
    adapter.detach(backbone)
    adapter.fuse(backbone, weight=0.8)
    fused = denoise(backbone)
    assert (fused - base).abs().max() > 1e-3
    assert torch.allclose(fused, unfused, atol=1e-5), (fused - unfused).abs().max()
    adapter.unfuse(backbone)
    assert torch.equal(denoise(backbone), base)


def test_two_adapters_stack_and_detach_in_any_order():
    backbone = load_backbone("tiny-sd1")
    base = denoise(backbone)
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    a.attach(backbone, 1.0)
    only_a = denoise(backbone)
    b.attach(backbone, 1.0)
    both = denoise(backbone)
    fresh = load_backbone("tiny-sd1")  # fusing both into a fresh backbone gives the same
    a.fuse(fresh, 1.0)
    b.fuse(fresh, 1.0)
    assert torch.allclose(denoise(fresh), both, atol=1e-5)
    a.detach(backbone)
    b.detach(backbone)
    assert torch.equal(denoise(backbone), base)
    assert not torch.allclose(only_a, both)


@pytest.mark.parametrize("kind", ["lora", "dora", "oft"])
def test_without_gives_the_output_without_that_adapter_and_restores_it(kind):
    from studio.adapters.lora import without
    from studio.adapters.oft import OftAdapter, OftConfig

    backbone = load_backbone("tiny-sd1")
    base = denoise(backbone)
    if kind == "oft":
        adapter = OftAdapter.create(backbone, OftConfig(family="sd1", name="sks.v2", block_size=4), seed=0)
        for t in adapter.tensors.values():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    else:  # a dotted name, as a file sks.v2.safetensors gives: torch refuses dots in module names
        adapter = random_lora(backbone, name="sks.v2", dora=kind == "dora")
    adapter.attach(backbone)
    assert adapter.name == "sks_v2"
    full = denoise(backbone)
    assert (full - base).abs().max() > 1e-3
    with without(backbone, adapter):
        assert torch.allclose(denoise(backbone), base, atol=1e-6)
    assert torch.equal(denoise(backbone), full)
    if kind == "lora":  # LoRA layers go to scale 0, so another adapter in the same layers stays on
        other = random_lora(backbone, name="other", seed=5)
        other.attach(backbone)
        adapter.set_weight(backbone, 0.0)
        only_other = denoise(backbone)
        adapter.set_weight(backbone, 1.0)
        with without(backbone, adapter):
            assert torch.allclose(denoise(backbone), only_other, atol=1e-6)
        other.detach(backbone)
    adapter.detach(backbone)
    assert torch.equal(denoise(backbone), base)


def test_save_load_round_trip_with_manifest_and_modelspec(tmp_path):
    from safetensors import safe_open

    backbone = load_backbone("tiny-sdxl")
    adapter = random_lora(backbone, text_encoder=True)
    adapter.config.trigger_words = ["sks"]
    path = adapter.save(tmp_path / "a.safetensors")
    loaded = load_adapter(path)
    assert type(loaded) is LoraAdapter and loaded.config == adapter.config
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks" and "studio.manifest" in meta
    with pytest.raises(ValueError, match="exists"):
        adapter.save(path)


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_plain_diffusers_loads_the_file_and_matches(tmp_path, family):
    backbone = load_backbone(f"tiny-{family}")
    adapter = random_lora(backbone)
    path = adapter.save(tmp_path / "a.safetensors")
    adapter.attach(backbone, 0.7)
    ours = denoise(backbone)
    plain = load_backbone(f"tiny-{family}").pipe  # diffusers only from here
    plain.load_lora_weights(str(path), adapter_name="x")
    plain.set_adapters(["x"], [0.7])
    theirs = denoise(plain)
    assert (ours - theirs).abs().max() <= 1e-4


def kohya_file(adapter, backbone, names_of):
    """A kohya-layout state dict written by hand (not by studio's exporter)."""
    out = {}
    for name, delta in adapter.deltas().items():
        base = names_of[name]
        out[f"{base}.lora_down.weight"] = delta.down
        out[f"{base}.lora_up.weight"] = delta.up * 2.0  # stored unscaled; alpha carries rank/2
        out[f"{base}.alpha"] = torch.tensor(delta.rank / 2.0)
    return out


@pytest.mark.parametrize("family,ldm", [("sd1", False), ("sdxl", True)])
def test_kohya_locon_file_with_text_encoders_reads_back(tmp_path, family, ldm):
    from safetensors.torch import save_file

    backbone = load_backbone(f"tiny-{family}")
    adapter = random_lora(backbone, target="locon", text_encoder=True)
    names = kohya_names(backbone)
    written = {}
    for name in adapter.deltas():
        # SD1 kohya files use diffusers module names, SDXL files the LDM ones (input_blocks...)
        pick = [c for c in names[name] if ("input_blocks" in c or "output_blocks" in c or "middle_block" in c) == ldm]
        written[name] = (pick or names[name])[0]
    state = kohya_file(adapter, backbone, written)
    assert any(k.startswith("lora_te2_" if family == "sdxl" else "lora_te_") for k in state)
    assert any("conv" in k for k in state)  # LoCon
    save_file(state, tmp_path / "k.safetensors")
    loaded = load_adapter(tmp_path / "k.safetensors", backbone)
    assert loaded.config.source_format == "kohya" and set(loaded.config.targets) == set(adapter.config.targets)
    expected = adapter.deltas()
    for name, delta in loaded.deltas().items():
        assert torch.allclose(delta.dense(), expected[name].dense(), atol=1e-6)
    # and studio's own kohya export reads back the same
    save_file(to_kohya(adapter, backbone), tmp_path / "ours.safetensors")
    again = load_adapter(tmp_path / "ours.safetensors", backbone)
    for name, delta in again.deltas().items():
        assert torch.allclose(delta.dense(), expected[name].dense(), atol=1e-6)


def test_lycoris_loha_and_lokr_become_exact_deltas(tmp_path):
    from safetensors.torch import save_file

    backbone = load_backbone("tiny-sd1")
    g = torch.Generator().manual_seed(3)
    names = kohya_names(backbone)
    modules = module_table(backbone)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    v = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    out_q, in_q = modules[q].weight.shape
    w1a, w1b, w2a, w2b = (torch.randn(out_q, 2, generator=g), torch.randn(2, in_q, generator=g),
                          torch.randn(out_q, 2, generator=g), torch.randn(2, in_q, generator=g))
    out_v, in_v = modules[v].weight.shape
    k1 = torch.randn(2, 2, generator=g)
    k2 = torch.randn(out_v // 2, in_v // 2, generator=g)
    state = {f"{names[q][0]}.hada_w1_a": w1a, f"{names[q][0]}.hada_w1_b": w1b, f"{names[q][0]}.hada_w2_a": w2a,
             f"{names[q][0]}.hada_w2_b": w2b, f"{names[q][0]}.alpha": torch.tensor(1.0),
             f"{names[v][0]}.lokr_w1": k1, f"{names[v][0]}.lokr_w2": k2}
    save_file(state, tmp_path / "ly.safetensors")
    adapter = load_adapter(tmp_path / "ly.safetensors", backbone)
    deltas = {n: d.dense() for n, d in adapter.deltas().items()}
    assert adapter.config.source_format == "lycoris"
    # LoHa: entry (i, j) is (w1a w1b)_ij * (w2a w2b)_ij * alpha / rank
    i, j = 3, 5
    expect = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * 0.5
    assert torch.allclose(deltas[q][i, j], expect, atol=1e-5)
    # LoKr: block (a, b) of the Kronecker product is k1[a, b] * k2
    rows, cols = k2.shape
    assert torch.allclose(deltas[v][rows:, :cols], k1[1, 0] * k2, atol=1e-5)
    # attached, the module's output moves by exactly x @ deltaW^T
    x = torch.randn(2, in_q, generator=g)
    before = modules[q](x)
    adapter.attach(backbone)
    after = backbone.pipe.unet.get_submodule(q.split(".", 1)[1])(x)  # the PEFT wrapper
    assert torch.allclose(after - before, x @ deltas[q].T, atol=1e-4)


def test_unknown_keys_are_listed_and_allow_partial_loads_the_rest(tmp_path):
    from safetensors.torch import save_file

    backbone = load_backbone("tiny-sd1")
    adapter = random_lora(backbone)
    state = {k: v for k, v in adapter.tensors.items()}
    state["unet.not_a_block.lora_A.weight"] = torch.zeros(4, 8)
    state["unet.not_a_block.lora_B.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "x.safetensors")
    with pytest.raises(UnknownKeysError, match="not_a_block"):
        load_adapter(tmp_path / "x.safetensors", backbone)
    partial = load_adapter(tmp_path / "x.safetensors", backbone, allow_partial=True)
    assert set(partial.config.targets) == set(adapter.config.targets)


def test_adapter_for_another_family_is_refused_before_any_change(tmp_path):
    sdxl = load_backbone("tiny-sdxl")
    adapter = random_lora(sdxl)
    sd1 = load_backbone("tiny-sd1")
    before = {k: v.clone() for k, v in sd1.denoiser.state_dict().items()}
    for act in (lambda: adapter.attach(sd1), lambda: adapter.fuse(sd1)):
        with pytest.raises(IncompatibleAdapterError, match="sdxl.*sd1"):
            act()
    after = sd1.denoiser.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_same_family_other_shapes_is_refused():
    world = load_backbone("world-sd")
    adapter = random_lora(load_backbone("tiny-sd1"))
    with pytest.raises(IncompatibleAdapterError, match="world-sd"):
        adapter.attach(world)


def test_pickle_adapter_files_are_refused(tmp_path):
    path = tmp_path / "lora.ckpt"
    path.write_bytes(b"not even read")
    with pytest.raises(UnsafeFileError, match="safetensors"):
        load_adapter(path)


def test_dit_lora_in_kohya_names_reads_back(tmp_path):
    from safetensors.torch import save_file

    backbone = load_backbone("tiny-sd3")
    adapter = random_lora(backbone, target="all-linear")
    names = kohya_names(backbone)
    state = kohya_file(adapter, backbone, {n: names[n][0] for n in adapter.deltas()})
    assert all(k.startswith("lora_transformer_") for k in state)
    save_file(state, tmp_path / "dit.safetensors")
    loaded = load_adapter(tmp_path / "dit.safetensors", backbone)
    expected = adapter.deltas()
    assert set(loaded.deltas()) == set(expected)
    for name, delta in loaded.deltas().items():
        assert torch.allclose(delta.dense(), expected[name].dense(), atol=1e-6)
