"""Concept erasers (ESD, SPM, UCE): the closed form, the training target, transport, stacking, files."""

from __future__ import annotations

import re

import pytest
import torch
from studio.adapters.base import IncompatibleAdapterError, load_adapter
from studio.adapters.erase import EraseConfig, EraseError, method_targets, transport_factors
from studio.adapters.lora import attached_adapters, without
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone
from studio.errors import InvalidArgumentError
from studio.training.erasing import concept_rows, erase, text_states
from studio.training.objectives import objective_for
from tests.test_lora import denoise, random_lora

WORLD_TEMPLATES = ["a small red {} on a plain background, in the centre", "a large blue {} on a dotted background, top left"]


@pytest.fixture(scope="module")
def world():
    return load_backbone("world-sd")


def states(backbone, template, word):
    """The text states a UCE target reads for `template` filled with `word`, from the concept's first token."""
    return text_states(backbone, template.format(word))[concept_rows(backbone, template, word)[0]:]


@pytest.mark.parametrize("source", ["world-sd", "world-dit", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_uce_maps_the_concept_to_the_null_text_and_holds_the_preserved(source):
    backbone = load_backbone(source)
    templates = WORLD_TEMPLATES if source.startswith("world") else ["a {}", "a photo of a {}"]
    template = templates[0]
    concept = states(backbone, template, "circle")[:1]  # the concept's token
    kept = states(backbone, template, "square")
    null = text_states(backbone, template.format(""))[:1]  # the start token (T5: the first word)
    changes = {}
    for preserve in ([], ["square"]):
        adapter = erase("circle", method="uce", backbone=backbone, preserve=preserve, templates=templates, push=0)
        assert adapter.config.method == "uce" and adapter.config.family == backbone.family.name
        component = "unet" if backbone.family.arch == "unet" else "transformer"
        assert adapter.config.targets and all(t.startswith(component) for t in adapter.config.targets)
        name = adapter.config.targets[0]
        module = dict(backbone.denoiser.named_modules())[name.split(".", 1)[1]]
        with torch.no_grad():
            before_concept, before_kept, destination = module(concept), module(kept), module(null)
            delta = adapter.deltas()[name].dense()
            after_concept = before_concept + concept @ delta.T
            after_kept = before_kept + kept @ delta.T
        moved = (after_concept - destination).norm() / (before_concept - destination).norm()
        assert moved < 0.2, moved  # the concept's key/value went most of the way to the null text's
        changes[bool(preserve)] = float((after_kept - before_kept).norm() / before_kept.norm())
    # with "square" in the preserve list its keys/values stay within 10 % and move less than half as far
    # as without (world-sd: 4 % against 116 %; the random tiny encoders tell the words apart less)
    assert changes[True] < 0.1 and changes[True] * 2 < changes[False], changes


def test_uce_push_maps_the_concept_past_the_destination(world):
    """push p: the concept's key/value goes to d + p·(d - c), away from the concept (the default, p = 1,
    took world-sd's triangle below the null text's own rate of triangles: README, Erasing benchmark)."""
    template = WORLD_TEMPLATES[0]
    concept = states(world, template, "circle")[:1]
    null = text_states(world, template.format(""))[:1]
    adapter = erase("circle", method="uce", backbone=world, templates=WORLD_TEMPLATES)
    assert adapter.config.push == 1.0  # the method's default
    for name in adapter.config.targets:
        module = dict(world.denoiser.named_modules())[name.split(".", 1)[1]]
        with torch.no_grad():
            before, destination = module(concept), module(null)
            after = before + concept @ adapter.deltas()[name].dense().T
        wanted = destination + (destination - before)
        assert (after - wanted).norm() < 0.2 * (before - wanted).norm(), name


def test_uce_rank_truncation_keeps_the_largest_directions(world):
    exact = erase("circle", method="uce", backbone=world, templates=WORLD_TEMPLATES)
    small = erase("circle", method="uce", backbone=world, templates=WORLD_TEMPLATES, rank=4)
    assert small.config.rank == 4 < exact.config.rank
    name = exact.config.targets[0]
    full, cut = exact.deltas()[name].dense(), small.deltas()[name].dense()
    s = torch.linalg.svdvals(full)
    assert torch.allclose((full - cut).norm(), s[4:].norm(), rtol=1e-3)  # Eckart-Young: the best rank-4


# steps: SPM on the short-prompt world-sd (issue 33) moves "a circle" 2% of the way in 30 steps, 21% in 60
# (the first world-sd: 50% and 57%); ESD there 16% in 30
@pytest.mark.parametrize("source,method,variant,steps", [("world-sd", "esd", "x", 30), ("world-sd", "spm", "x", 60),
                                                         ("world-dit", "esd", "x", 30), ("tiny-sdxl", "spm", "x", 30),
                                                         ("tiny-sd3", "esd", "x", 30), ("world-dit", "esd", "kv", 30)])
def test_training_moves_the_concept_prediction_towards_negative_guidance(source, method, variant, steps):
    """After a few steps the eraser's prediction for the concept prompt is closer to
    ε(x) - η(ε(x, c) - ε(x)) than the base model's, on bank states it was not trained on."""
    from studio.training.erasing import trajectory_bank

    backbone = load_backbone(source)
    adapter = erase("circle", method=method, backbone=backbone, steps=steps, lr=5e-3, templates=["a {}"], seed=0,
                    variant=variant)
    if variant == "kv":  # only the projections that read the text: keys and values of its tokens
        assert adapter.target_names() and all(re.search(r"attn\.add_[kv]_proj$", n) for n in adapter.target_names())
        unet = method_targets(load_backbone("world-sd"), EraseConfig(family="sd1", method="esd", concepts=["a"],
                                                                     variant="kv"))
        assert unet and all(re.search(r"attn2\.to_[kv]$", n) for n in unet)
    assert not attached_adapters(backbone)  # training detaches what it attached
    objective = objective_for(backbone)
    bank = trajectory_bank(backbone, ["a circle"], images=2, steps=6, seed=99)
    xt = torch.stack([b[0] for b in bank[::3]])
    t = torch.stack([torch.as_tensor(b[1]) for b in bank[::3]])
    cond = {k: v.expand(len(xt), *v.shape[1:]) for k, v in objective.encode(["a circle"]).items()}
    null = {k: v.expand(len(xt), *v.shape[1:]) for k, v in objective.encode([""]).items()}
    with torch.no_grad():
        e_c, e_u = objective.predict(backbone.denoiser, xt, t, **cond), objective.predict(backbone.denoiser, xt, t, **null)
        target = e_u - (e_c - e_u)
        adapter.attach(backbone)
        erased = objective.predict(backbone.denoiser, xt, t, **cond)
        adapter.detach(backbone)
    assert (erased - target).square().mean() < 0.9 * (e_c - target).square().mean()
    if method == "spm":
        assert adapter.config.rank == 1 and adapter.config.transport and adapter.config.training["anchors"] > 0


def test_transport_factors_and_row_scaling(world):
    adapter = erase("circle", method="spm", backbone=world, steps=5, lr=1e-2, templates=["a {}"])
    factors = transport_factors(world, ["a small red circle on a plain background, in the centre",
                                        "a large blue square on a dotted background, top left"], ["circle"])
    assert factors[0] == 1.0 and factors[1] < 1.0
    raw = transport_factors(world, ["a ring", "a large square", "a circle"], ["circle"])
    assert max(raw[:2]) > 0  # without the floor the kept prompts would get part of the eraser
    # the preserve list sets the cosine floor: its own prompts get 0, the concept's still 1 (any method)
    for method in ("spm", "uce"):
        kept = erase("circle", method=method, backbone=world, steps=2, lr=1e-2, templates=["a {}", "a large {}"],
                     preserve=["square", "ring"], transport=True)
        assert 0 < kept.config.transport_floor < 1
        kept.attach(world)
        try:
            assert kept.prepare(world, ["a ring", "a large square", "a circle"]) == [0.0, 0.0, 1.0], method
        finally:
            kept.release()
            kept.detach(world)
    adapter.attach(world)
    try:
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ctx = objective_for(world).encode(["a circle", "a square"])["context"]
        run = lambda: world.denoiser(x, torch.tensor([500, 500]), ctx).sample  # noqa: E731
        with torch.no_grad():
            full = run()
            with without(world, adapter):
                base = run()
            adapter.prepare(world, ["p", "q"], 1)
            adapter._scales = torch.tensor([1.0, 0.0])  # row 0 erased fully, row 1 untouched
            mixed = run()
            adapter.release()
        assert not torch.allclose(full, base)
        assert torch.allclose(mixed[0], full[0], atol=1e-6) and torch.allclose(mixed[1], base[1], atol=1e-6)
    finally:
        adapter.detach(world)


def test_three_erasers_and_a_lora_stack_then_detach_exactly(tmp_path):
    backbone = load_backbone("tiny-sd1")
    base = denoise(backbone)
    paths = [erase(c, method="uce", backbone=backbone, name=f"no-{c}", out=str(tmp_path / f"{c}.safetensors")).path
             for c in ("cat", "dog", "car")]
    pipeline = StudioPipeline(backbone)
    for path in paths:
        pipeline.attach(path, 0.8)
    pipeline.attach(random_lora(backbone, name="style"))
    assert len(attached_adapters(backbone)) == 4
    image = pipeline.generate("a cat and a car", steps=2, seed=1).images[0]
    assert image.size == (backbone.default_size,) * 2
    pipeline.detach()
    assert torch.equal(denoise(backbone), base)


def test_file_round_trip_kohya_export_and_family_refusal(tmp_path, world):
    from studio.lora_formats import convert_file

    adapter = erase(["circle", "ring"], method="uce", backbone=world, templates=WORLD_TEMPLATES,
                    out=str(tmp_path / "e.safetensors"))
    loaded = load_adapter(tmp_path / "e.safetensors")
    assert loaded.kind == "erase" and loaded.config.concepts == ["circle", "ring"]
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    kohya = convert_file(tmp_path / "e.safetensors", "kohya", tmp_path / "e.kohya.safetensors", backbone="world-sd")
    from safetensors import safe_open

    with safe_open(str(kohya), framework="pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())
    dit = load_backbone("tiny-sd3")
    before = {k: v.clone() for k, v in dit.denoiser.state_dict().items()}
    with pytest.raises(IncompatibleAdapterError, match="sd1.*sd3"):
        StudioPipeline(dit).attach(loaded)
    assert all(torch.equal(before[k], v) for k, v in dit.denoiser.state_dict().items())
    with pytest.raises(Exception, match="exists"):
        erase("circle", method="uce", backbone=world, out=str(tmp_path / "e.safetensors"))


def test_bad_concepts_are_refused_or_warned(world):
    with pytest.raises(EraseError, match="empty"):
        erase("  ", method="uce", backbone=world)
    with pytest.raises(EraseError, match="preserve list names.*Circle"):
        erase("circle", method="uce", backbone=world, preserve="square,Circle")
    with pytest.raises(EraseError, match="one concept per adapter"):
        EraseConfig(family="sd1", method="esd", concepts=["circle", "ring"])
    warnings = []
    erase("zebra", method="uce", backbone=world, templates=["a {}"], warn=warnings.append)
    assert warnings and "zebra" in warnings[0]
    with pytest.raises(EraseError, match="not supported yet"):
        erase("cat", method="uce", backbone=load_backbone("tiny-pixart"))


def test_cli_erase_writes_a_loadable_eraser(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path / "no-circle.safetensors"
    result = CliRunner().invoke(app, ["erase", "circle", "--method", "uce", "--preserve", "square",
                                      "--template", "a {}", "--transport", "--out", str(out)])
    assert result.exit_code == 0, result.output
    adapter = load_adapter(out)
    assert adapter.config.preserve == ["square"] and adapter.config.templates == ["a {}"]
    assert adapter.config.transport and 0 < adapter.config.transport_floor < 1


def test_cli_erase_to_a_file_shows_each_stage_with_an_eta(tmp_path):
    """`studio erase ... > log`: the trajectory bank's sampling and the training each write a line per 10%."""
    import os
    import subprocess
    import sys

    out = tmp_path / "no-circle.safetensors"
    log = tmp_path / "erase.log"
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "studio.cli", "erase", "circle", "--method", "esd",
                                 "--steps", "10", "--out", str(out)], stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert result.returncode == 0, text[-2000:]
    bank = [line for line in text.splitlines() if line.startswith("trajectory bank: ")]
    training = [line for line in text.splitlines() if line.startswith("esd: ")]
    assert len(bank) == 10 and bank[-1].startswith("trajectory bank: 20/20 (100%)") and "ETA" in bank[0]
    assert len(training) == 10 and training[-1].startswith("esd: 10/10 (100%)") and "ETA" in training[0]
    assert text.index(bank[-1]) < text.index(training[0])


def test_a_cancelled_eraser_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    """ESD trains through the one run loop: a stop leaves a checkpoint, calling erase again goes on from it, and
    the eraser is the one an uninterrupted run makes, bit for bit; a checkpoint of another request is refused."""
    from studio.training.trainer import TrainingCancelled

    backbone = load_backbone("tiny-sd1")
    options = dict(method="spm", backbone=backbone, steps=6, lr=1e-2, templates=["a {}"], seed=3)
    whole = erase("cat", out=str(tmp_path / "whole.safetensors"), **options)
    out = tmp_path / "cut.safetensors"
    seen = []
    with pytest.raises(TrainingCancelled):
        erase("cat", out=str(out), should_stop=lambda: len(seen) >= 3, progress=lambda s, n, loss: seen.append(s),
              **options)
    assert seen == [1, 2, 3] and not out.exists() and (tmp_path / "cut.checkpoint" / "state.json").is_file()
    assert not attached_adapters(backbone)  # the stopped run detached its eraser
    with pytest.raises(InvalidArgumentError, match="other options"):  # another request: its checkpoint is refused
        erase("cat", out=str(out), **{**options, "lr": 2e-2})
    resumed = erase("cat", out=str(out), progress=lambda s, n, loss: seen.append(s), **options)
    assert seen == [1, 2, 3, 4, 5, 6] and not (tmp_path / "cut.checkpoint").exists()
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
