"""The shapes-world evaluator reads fresh renders and VAE round trips; both world backbones follow their prompts
(a check an untrained model fails)."""

from __future__ import annotations

import numpy as np
import pytest

from studio.world.data import labels_at, render_set
from studio.world.evaluator import OUTCOMES, evaluate, load_evaluator
from studio.world.train import load_vae, vae_roundtrip
from studio.world.vocab import ATTRIBUTES, VALUES


@pytest.fixture(scope="module")
def fresh():
    return render_set(300, seed=77, held_out=True)  # held-out values included


def test_evaluator_reads_fresh_renders(fresh):
    expected = [labels_at(fresh, i) for i in range(len(fresh["images"]))]
    metrics = evaluate(list(fresh["images"]), expected, masks=fresh["masks"])
    for attribute in ATTRIBUTES:
        assert metrics["accuracy"][attribute] >= 0.99, (attribute, metrics["accuracy"])
    assert metrics["mask_iou"] >= 0.85


def test_vae_round_trip_keeps_colours_for_the_evaluator(fresh):
    trips = vae_roundtrip(load_vae(), fresh["images"])
    expected = [{"colour": labels_at(fresh, i).colour} for i in range(len(trips))]
    assert evaluate(list(trips), expected)["accuracy"]["colour"] >= 0.97


def test_evaluator_is_not_fooled_by_noise_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
    truth = [{"shape": "circle"}] * 64
    assert evaluate(list(noise), truth)["accuracy"]["shape"] < 0.6
    # every value has an outcome, and the shape also "none" (no single clear shape)
    assert {a: h.out_features for a, h in load_evaluator().heads.items()} == {a: len(v) for a, v in OUTCOMES.items()}
    assert OUTCOMES["shape"] == [*VALUES["shape"], "none"]


WORLD_BACKBONES = ("world-sd", "world-dit")


def _fidelity(name: str, **fixed: str) -> dict:
    from studio.backbones import load_backbone
    from studio.world.fidelity import fidelity

    backbone = load_backbone(name)
    return fidelity(backbone.pipe, n=16, steps=20, scheduler=backbone.scheduler(backbone.family.scheduler), **fixed)


@pytest.mark.parametrize("name", WORLD_BACKBONES)
def test_world_backbone_follows_prompts_on_16_samples(name):
    accuracy = _fidelity(name)["accuracy"]
    # chance: shape 1/6, colour 1/8, background 1/5, position 1/5, size 1/2; an untrained model stays near it
    for attribute in ("shape", "colour", "background", "position"):
        assert accuracy[attribute] >= 0.7, accuracy


@pytest.mark.parametrize("name", WORLD_BACKBONES)
def test_held_out_shapes_are_not_drawn_by_the_base_model(name):
    assert _fidelity(name, shape="star")["accuracy"]["shape"] <= 0.25  # the star is what customization must teach


# the short prompts the first world-sd drew wrong (issue 33: "a blue square" drew blue triangles 8 of 8, pink
# circles and squares came out as diamonds and triangles); its fine-tune on partial captions draws them
HARD_SHORT_PROMPTS = [("blue", "square"), ("cyan", "square"), ("pink", "circle"), ("pink", "square")]


def test_world_sd_draws_short_prompts_it_once_missed():
    from studio.backbones import load_backbone
    from studio.world.fidelity import combinations

    backbone = load_backbone("world-sd")
    cells = combinations(backbone.pipe, samples=8, seed=99, steps=20, guidance=backbone.family.guidance,
                         scheduler=backbone.scheduler(backbone.family.scheduler), cells=HARD_SHORT_PROMPTS)["cells"]
    assert sum(cells.values()) / len(cells) >= 0.75, cells
