"""The merge engine: methods as math, per-block weights, the interference plan, outputs, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from studio.adapters.base import IncompatibleAdapterError, load_adapter, module_table
from studio.adapters.lora import LoraAdapter, LoraConfig, target_modules
from studio.adapters.oft import OftAdapter, OftConfig
from studio.adapters.orthogonal import OrthogonalAdapter, OrthogonalConfig
from test_lora import denoise, random_lora

import studio
from studio.backbones import load_backbone
from studio.blocks import block_name, parse_weight
from studio.deltas import Dense, LowRank
from studio.errors import InvalidArgumentError
from studio.merge import methods as M
from studio.merge.engine import bake
from studio.merge.interference import plan
from studio.merge.learned import search_weights


def low(out=24, inp=16, rank=4, seed=0, conv=False):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, *([1, 1] if conv else []), generator=g)
    down = torch.randn(rank, inp, *([3, 3] if conv else []), generator=g)
    return LowRank(up=up, down=down, alpha=rank / 2)


# ------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("conv", [False, True])
def test_concat_and_linear_are_the_exact_weighted_sum_at_mixed_ranks(conv):
    a, b, c = low(rank=2, seed=1, conv=conv), low(rank=6, seed=2, conv=conv), Dense(low(rank=3, seed=3, conv=conv).dense())
    want = 0.7 * a.dense() + 0.5 * b.dense() - 0.2 * c.dense()
    merged = M.merge_concat([a, b, c], [0.7, 0.5, -0.2])
    assert merged.rank == 2 + 6 + 3 and torch.allclose(merged.dense(), want, atol=1e-4)
    assert torch.allclose(M.merge_linear([a, b, c], [0.7, 0.5, -0.2]).dense(), want, atol=1e-4)


def test_svd_rerank_is_the_best_approximation_without_the_dense_matrix(monkeypatch):
    a, b = low(out=300, inp=200, rank=8, seed=1), low(out=300, inp=200, rank=8, seed=2)
    want = a.dense() + 0.5 * b.dense()
    u, s, vh = torch.linalg.svd(want)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    seen = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: seen.append(tuple(x.shape)) or original(x, **kw))
    merged = M.merge_svd([a, b], [1.0, 0.5], rank=5)
    assert merged.rank == 5 and torch.allclose(merged.dense(), best, atol=1e-3)
    assert seen and max(max(shape) for shape in seen) <= 16  # only the 16 x 16 core was decomposed


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    a = Dense(torch.tensor([[4.0, -1.0, 3.0, 0.1]]))
    b = Dense(torch.tensor([[2.0, -5.0, -1.0, 0.2]]))
    merged = M.merge_ties([a, b], [1.0, 1.0], density=0.5).dense()
    # trimmed: a -> [4, 0, 3, 0], b -> [2, -5, 0, 0]; signs: +, -, +, 0; disjoint means: 3, -5, 3, 0
    assert torch.equal(merged, torch.tensor([[3.0, -5.0, 3.0, 0.0]]))


def test_dare_keeps_the_expected_change_and_density_one_is_the_plain_sum():
    a, b = low(seed=1), low(seed=2)
    plain = (a.dense() + b.dense())
    assert torch.allclose(M.merge_dare_linear([a, b], [1, 1], density=1.0).dense(), plain, atol=1e-5)
    runs = torch.stack([M.merge_dare_linear([a, b], [1, 1], density=0.3, seed=s).dense() for s in range(300)])
    assert (runs.mean(0) - plain).abs().mean() < 0.2 * plain.abs().mean()
    sparse = M.merge_dare_linear([a], [1], density=0.3, seed=0).dense()
    assert 0.2 < (sparse != 0).float().mean() < 0.4
    assert M.merge_dare_ties([a, b], [1, 1], density=0.5).shape == a.shape


def test_magnitude_prune_keeps_each_adapters_largest_entries():
    a = Dense(torch.tensor([[5.0, 1.0, -4.0, 0.5]]))
    assert torch.equal(M.merge_magnitude_prune([a], [2.0], density=0.5).dense(), torch.tensor([[10.0, 0, -8.0, 0]]))


def test_orthogonal_sum_is_exact_for_orthogonal_inputs_and_refuses_overlapping_ones():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    a = LowRank(up=torch.randn(8, 4), down=q[:4], alpha=4.0)
    b = LowRank(up=torch.randn(8, 4), down=q[4:8], alpha=4.0)
    assert M.subspace_overlap(a, b) < 1e-10 and M.crosstalk(a, b) < 1e-5
    merged = M.merge_orthogonal([a, b], [1.0, 0.6])
    assert torch.allclose(merged.dense(), a.dense() + 0.6 * b.dense(), atol=1e-5)
    shared = LowRank(up=torch.randn(8, 4), down=q[2:6], alpha=4.0)
    assert M.subspace_overlap(a, shared) == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(InvalidArgumentError, match="share 50% of their input subspace"):
        M.merge_orthogonal([a, shared], [1.0, 1.0])


def test_inner_product_from_factors_equals_the_dense_one():
    a, b = low(seed=1, conv=True), low(seed=2, conv=True)
    assert M.inner(a, b) == pytest.approx(float((a.dense() * b.dense()).sum()), rel=1e-4)


# ------------------------------------------------------------------------------ block weights


def test_block_weight_specs_match_the_most_specific_rule():
    w = parse_weight("0.5,up_blocks.1=0,down_blocks=2,up_blocks.1.attentions.0=0.25,transformer_blocks.0-3=0.3")
    assert w("unet.up_blocks.1.resnets.0.conv1") == 0
    assert w("unet.up_blocks.1.attentions.0.proj_in") == 0.25
    assert w("unet.down_blocks.0.attentions.0.to_q") == 2
    assert w("unet.mid_block.attentions.0.to_q") == 0.5
    assert w("transformer.transformer_blocks.3.attn.to_q") == 0.3
    assert w("transformer.transformer_blocks.4.attn.to_q") == 0.5
    assert parse_weight(str(w))("unet.up_blocks.1.attentions.0.x") == 0.25  # round trip
    assert parse_weight("0.8") == 0.8 and parse_weight(1) == 1.0
    assert block_name("transformer.single_transformer_blocks.2.attn.to_k") == "transformer.single_transformer_blocks.2"
    assert block_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == "text_encoder_2"
    for bad in ("up_blocks.1=x", "fast", "up blocks=1"):
        with pytest.raises(InvalidArgumentError, match="weight"):
            parse_weight(bad)
    for bad in ("inf", float("nan"), "1,up_blocks=inf", True):
        with pytest.raises(InvalidArgumentError, match="finite|must be a number"):
            parse_weight(bad)


@pytest.mark.parametrize("family,block", [("sd1", "up_blocks"), ("sd3", "transformer_blocks.0")])
def test_block_weights_at_attach_equal_an_adapter_without_those_blocks(family, block):
    backbone = load_backbone(f"tiny-{family}")
    adapter = random_lora(backbone, name="full")
    adapter.attach(backbone, f"1,{block}=0")
    routed = denoise(backbone)
    adapter.set_weight(backbone, 1.0)
    assert not torch.allclose(denoise(backbone), routed)
    adapter.detach(backbone)
    kept = {k: v for k, v in adapter.tensors.items() if not parse_weight(f"1,{block}=0")(k) == 0}
    assert len(kept) < len(adapter.tensors)
    partial = LoraAdapter(LoraConfig(family=family, name="partial", rank=4), kept)
    partial.attach(backbone, 1.0)
    assert torch.allclose(denoise(backbone), routed, atol=1e-6)
    partial.detach(backbone)


# ----------------------------------------------------------------------------- adapter merges


def test_merged_file_fuses_like_its_sources_at_mixed_ranks_and_kinds(tmp_path):
    backbone = load_backbone("tiny-sd1")
    a = random_lora(backbone, name="a", rank=2, seed=1)
    b = random_lora(backbone, name="b", rank=8, seed=2, target="all-linear")
    c = random_lora(backbone, name="c", rank=4, seed=3, dora=True)
    oft = OftAdapter.create(backbone, OftConfig(family="sd1", name="o", block_size=4), seed=0)
    for t in oft.tensors.values():
        t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    paths = [x.save(tmp_path / f"{x.name}.safetensors") for x in (a, b, c, oft)]
    weights = [0.7, 0.5, 1.0, 0.8]
    result = studio.merge(paths, method="linear", weights=weights, backbone=backbone, out=tmp_path / "m.safetensors")
    assert result.max_truncation < 1e-5
    fresh = load_backbone("tiny-sd1")
    merged = load_adapter(result.path)
    sources = [x.deltas(fresh) for x in (a, b, c, oft)]  # each change relative to the base weights
    for module, delta in merged.deltas().items():
        want = sum(w * d[module].dense() for d, w in zip(sources, weights, strict=True) if module in d)
        assert torch.allclose(delta.dense(), want, atol=1e-4), module
    record = merged.config.merge
    assert record["method"] == "linear" and [s["weight"] for s in record["sources"]] == ["0.7", "0.5", "1.0", "0.8"]
    assert all(len(s["sha256"]) == 64 for s in record["sources"])
    # the merged file attaches like any LoRA: for linear kinds, the same outputs as fusing each source
    two = studio.merge(paths[:2], weights=weights[:2]).adapter
    two.attach(fresh, 1.0)
    attached = denoise(fresh)
    two.detach(fresh)
    a.fuse(fresh, weights[0])
    b.fuse(fresh, weights[1])
    assert torch.allclose(denoise(fresh), attached, atol=1e-4)


def test_ties_merge_with_a_rank_limit_reports_its_truncation(tmp_path):
    backbone = load_backbone("tiny-sd1")
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    # trimming breaks the low-rank structure: the dense TIES result is stored at a rank, and the cut is reported
    errors = [studio.merge([a, b], method="ties", density=0.5, rank=r).max_truncation for r in (2, 8, 64)]
    assert 0.3 < errors[0] < 1 and errors[1] < errors[0] and errors[2] < 1e-5
    default = studio.merge([a, b], method="ties", density=0.5)
    assert default.adapter.config.rank == 8 and default.max_truncation == pytest.approx(errors[1], rel=1e-5)  # float32 SVD
    assert default.adapter.config.merge["parameters"] == {"density": 0.5}


def test_per_block_merge_weights_on_a_dit(tmp_path):
    backbone = load_backbone("tiny-sd3")
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    result = studio.merge([a, b], weights=["transformer_blocks.0=0", 1.0])
    deltas = result.adapter.deltas()
    name = next(n for n in deltas if ".transformer_blocks.0." in n)
    assert torch.allclose(deltas[name].dense(), b.deltas()[name].dense(), atol=1e-5)
    other = next(n for n in deltas if ".transformer_blocks.1." in n)
    assert torch.allclose(deltas[other].dense(), a.deltas()[other].dense() + b.deltas()[other].dense(), atol=1e-5)


def test_plan_tells_orthogonal_adapters_from_overlapping_loras():
    backbone = load_backbone("tiny-sd1")
    config = dict(family="sd1", rank=4, target="locon")  # linear and conv layers
    o1 = OrthogonalAdapter.create(backbone, OrthogonalConfig(name="o1", concept_seed=0, **config))
    o2 = OrthogonalAdapter.create(backbone, OrthogonalConfig(name="o2", concept_seed=1, **config))
    assert any(t.dim() == 4 for t in o1.tensors.values())
    for adapter, seed in ((o1, 1), (o2, 2)):  # train-like: non-zero up factors
        for k, t in adapter.tensors.items():
            if "lora_B" in k:
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)))
    ortho = plan([o1, o2])
    assert ortho.method == "orthogonal" and max(s.overlap for s in ortho.pairs.values()) < 1e-6
    assert ortho.score < 1e-3
    merged = studio.merge([o1, o2], method="orthogonal").adapter
    name = next(n for n in merged.target_names() if "conv" in n)
    assert torch.allclose(merged.deltas()[name].dense(), o1.deltas()[name].dense() + o2.deltas()[name].dense(),
                          atol=1e-5)
    a = random_lora(backbone, name="a", seed=1)
    b = LoraAdapter(LoraConfig(family="sd1", name="b", rank=4), {  # same input subspace as a, other outputs
        k: (torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) if "lora_B" in k else v.clone())
        for k, v in a.tensors.items()})
    clash = plan([a, b])
    assert clash.pairs["a+b"].overlap > 0.99 and clash.score > 0.5 and clash.method == "ties"
    assert "unet.down_blocks.0" in clash.blocks and "recommended method 'ties'" in clash.table()
    assert json.loads(json.dumps(clash.to_dict()))["method"] == "ties"


def test_orthogonal_adapters_merge_exactly_and_loras_are_refused_by_the_orthogonal_method():
    backbone = load_backbone("tiny-sd1")
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    with pytest.raises(InvalidArgumentError, match="not orthogonal"):
        studio.merge([a, b], method="orthogonal")


def test_orthogonal_slots_give_wide_layers_more_rank_and_keep_the_slots_disjoint():
    backbone = load_backbone("tiny-sd1")
    made = [OrthogonalAdapter.create(backbone, OrthogonalConfig(family="sd1", rank=64, slots=3, concept_seed=seed,
                                                                target="locon")) for seed in range(3)]
    sizes = {name: module.weight[0].numel() for name, module in module_table(backbone).items()}
    for name, columns in made[0].config.columns.items():
        assert len(columns) == min(64, sizes[name] // 3)
        assert made[0].factors()[name]["down"].shape[0] == len(columns)
        assert not set(columns) & (set(made[1].config.columns[name]) | set(made[2].config.columns[name]))
    assert len({len(c) for c in made[0].config.columns.values()}) > 1  # the rank follows each layer's width
    base = denoise(backbone)
    made[0].tensors = {k: v + 0.1 if "lora_B" in k else v for k, v in made[0].tensors.items()}
    made[0].attach(backbone)
    assert not torch.allclose(denoise(backbone), base)
    made[0].detach(backbone)
    assert torch.equal(denoise(backbone), base)
    with pytest.warns(UserWarning, match="with 3 slots shares columns with seed 0"):
        OrthogonalAdapter.create(backbone, OrthogonalConfig(family="sd1", rank=8, slots=3, concept_seed=3))
    with pytest.raises(InvalidArgumentError, match="slots=-1"):
        OrthogonalConfig(family="sd1", slots=-1)


def test_bake_into_a_folder_and_a_single_file_matches_the_attached_merge(tmp_path):
    backbone = load_backbone("tiny-sd1")
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    merged = studio.merge([a, b], weights=[0.6, 0.9]).adapter
    base = denoise(backbone)
    merged.attach(backbone, 1.0)
    attached = denoise(backbone)
    merged.detach(backbone)
    folder = bake([(merged, 1.0)], backbone, tmp_path / "baked")
    assert torch.equal(denoise(backbone), base)  # the in-memory backbone is put back
    assert torch.allclose(denoise(load_backbone(str(folder))), attached, atol=1e-5)
    single = bake([(merged, 1.0)], backbone, tmp_path / "baked.safetensors", single_file=True)
    assert torch.allclose(denoise(load_backbone(str(single), config=str(folder))), attached, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="exists"):
        bake([(merged, 1.0)], backbone, folder)


def test_learned_merge_search_finds_the_weights_of_a_known_loss():
    target = np.array([0.8, -0.4, 1.2])
    best, value, history = search_weights(lambda w: float(((w - target) ** 2).sum()), np.ones(3), evaluations=200)
    assert np.abs(best - target).max() < 0.1 and value < history[0] and len(history) == 200


def test_learned_merge_lowers_the_reference_loss_and_records_it(tmp_path):
    from studio.world.folder import write_reference_folder

    backbone = load_backbone("tiny-sd1")
    refs = write_reference_folder(tmp_path / "refs", n=4, seed=1)[0].parent
    a, b = random_lora(backbone, name="a", seed=1), random_lora(backbone, name="b", seed=2)
    result = studio.merge([a, b], method="learned", reference=refs, backbone=backbone, evaluations=12,
                          out=tmp_path / "l.safetensors")
    record = load_adapter(result.path).config.merge
    start, end = record["parameters"]["objective"]
    assert record["method"] == "learned" and end <= start and len(record["parameters"]["weights"]) == 2
    assert [a.name, b.name] == ["a", "b"]  # the names given while searching are put back


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    sd1, sdxl = load_backbone("tiny-sd1"), load_backbone("tiny-sdxl")
    a, b = random_lora(sd1, name="a", seed=1), random_lora(sd1, name="b", seed=2)
    out = tmp_path / "m.safetensors"
    with pytest.raises(IncompatibleAdapterError, match=r"'a' is for sd1.*'x' is for sdxl"):
        studio.merge([a, random_lora(sdxl, name="x")], out=out)
    narrow = LoraAdapter(LoraConfig(family="sd1", name="n", rank=4), {
        k: v[:, :3] if k.endswith("lora_A.weight") else v for k, v in b.tensors.items()})
    with pytest.raises(IncompatibleAdapterError, match="different architectures"):
        studio.merge([a, narrow], out=out)
    for kwargs, match in (({"rank": 0}, "rank=0"), ({"method": "ties", "density": 1.5}, "density=1.5"),
                          ({"method": "ties", "density": 0}, "density=0"), ({"method": "nope"}, "choose one of"),
                          ({"weights": [1.0]}, "2 adapters but 1 weights"), ({"method": "svd", "density": 0.3},
                                                                              "takes no density")):
        with pytest.raises(InvalidArgumentError, match=match):
            studio.merge([a, b], out=out, **kwargs)
    poisoned = LoraAdapter(LoraConfig(family="sd1", name="p", rank=4), {k: v.clone() for k, v in b.tensors.items()})
    next(t for k, t in poisoned.tensors.items() if "lora_B" in k)[0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match="NaN"):
        studio.merge([a, poisoned], out=out)
    assert not out.exists()
    studio.merge([a, b], out=out)
    with pytest.raises(InvalidArgumentError, match="exists"):
        studio.merge([a, b], out=out)
    studio.merge([a, b], out=out, overwrite=True)
    assert not list(tmp_path.glob(".*.tmp"))


def _studio(*args, cwd):
    return subprocess.run([sys.executable, "-m", "studio.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_plan_merge_and_export(tmp_path):
    backbone = load_backbone("tiny-sd1")
    paths = [random_lora(backbone, name=n, seed=s).save(tmp_path / f"{n}.safetensors") for n, s in (("a", 1), ("b", 2))]
    shown = _studio("merge", "plan", *paths, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "interference score" in shown.stdout and "unet.up_blocks" in shown.stdout
    as_json = json.loads(_studio("merge", "plan", *paths, "--json", cwd=tmp_path).stdout)
    assert as_json["adapters"] == ["a", "b"] and as_json["method"] in studio.merge.METHODS
    made = _studio("merge", *paths, "--method", "ties", "--weights", "0.7,0.5", "--rank", "4",
                   "--block-weights", "1,up_blocks.1=0", "--out", tmp_path / "ab.safetensors", "--export", "kohya",
                   "--backbone", "tiny-sd1", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    merged = load_adapter(tmp_path / "ab.safetensors")
    assert merged.config.merge["method"] == "ties" and merged.config.rank == 4
    assert merged.config.merge["sources"][0]["weight"] == "0.7,up_blocks.1=0"
    assert not any(".up_blocks.1." in k for k in merged.tensors)
    assert (tmp_path / "ab.kohya.safetensors").exists()
    again = _studio("merge", *paths, "--out", tmp_path / "ab.safetensors", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    other = _studio("merge", *paths, "--weights", "1", cwd=tmp_path)
    assert other.returncode == 2 and "give 2 --weights" in " ".join(other.stderr.split())


def test_merge_uses_the_real_module_names(tmp_path):
    backbone = load_backbone("tiny-sdxl")
    a = random_lora(backbone, name="a", seed=1, text_encoder=True)
    result = studio.merge([a, random_lora(backbone, name="b", seed=2, text_encoder=True)])
    modules = module_table(backbone)
    assert set(result.adapter.target_names()) <= set(modules)
    assert any(n.startswith("text_encoder_2.") for n in result.adapter.target_names())
    assert set(result.adapter.target_names()) == set(target_modules(backbone, "attention", text_encoder=True))
