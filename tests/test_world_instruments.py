"""The two instruments (the trained evaluator and the geometric reader) against the eye-labelled set of
generated images and against renders; evaluate() reports both readings and flags where they part."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from studio.errors import InvalidArgumentError
from studio.world import geometry
from studio.world.data import labels_at, render_set
from studio.world.evaluator import WorldEvaluator, as_pixels, evaluate, predict
from studio.world.labelled import FOLDER, check, load_set
from studio.world.vocab import ATTRIBUTES

# The goals on the labelled set are shape 0.95, colour and background 0.97; not met yet (README, "The
# instruments"). These floors are what the shipped instruments measure on the test half (thresholds fitted on
# the other half) less 2 points: a retrained or recalibrated instrument that reads worse fails here.
EVALUATOR_FLOOR = {"shape": 0.67, "colour": 0.93, "background": 0.85}  # measured 0.693, 0.956, 0.869
GEOMETRY_FLOOR = {"shape": 0.74, "colour": 0.91, "background": 0.85}  # measured 0.760, 0.929, 0.875


def test_the_labelled_set_is_whole_and_varied():
    entries = load_set()
    assert len(entries) >= 300
    made = [e.made for e in entries]
    assert all(m.get("backbone") in ("world-sd", "world-dit") for m in made)  # every image says how it was made
    assert sum(m.get("adapter") is not None for m in made) >= 100  # with adapters and without
    assert sum(e.labels["shape"] == "none" for e in entries) >= 30  # failures: blobs, two shapes, nothing
    # held-out shapes as people saw them (few stars: the adapters trained to draw them mostly drew blobs)
    assert sum(e.labels["shape"] in ("star", "heart", "moon") for e in entries) >= 30
    assert sum(e.labels["background"] in ("checker", "waves") for e in entries) >= 8


def test_a_missing_labelled_image_is_named(tmp_path):
    copy = tmp_path / "labelled"
    shutil.copytree(FOLDER, copy)
    (copy / "images" / "007.png").unlink()
    with pytest.raises(InvalidArgumentError, match=r"007\.png is missing"):
        load_set(copy)


def test_a_label_outside_the_vocabulary_is_refused(tmp_path):
    copy = tmp_path / "labelled"
    shutil.copytree(FOLDER, copy)
    table = copy / "labels.csv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",blob,red,plain,yes"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgumentError, match=r"line 2: shape='blob'"):
        load_set(copy)


@pytest.mark.parametrize("name", ["evaluator", "geometry"])
def test_the_instruments_read_the_labelled_generated_images(name):
    read, floors = {"evaluator": (predict, EVALUATOR_FLOOR), "geometry": (geometry.predict, GEOMETRY_FLOOR)}[name]
    result = check(read, half="test")
    for attribute, floor in floors.items():
        assert result["accuracy"][attribute] >= floor, (attribute, result["accuracy"])


def test_the_geometric_reader_reads_renders_with_nothing_trained():
    fresh = render_set(120, seed=78, held_out=True)
    seen = geometry.predict(list(fresh["images"]))
    for attribute in ATTRIBUTES:
        truth = [labels_at(fresh, i).as_dict()[attribute] for i in range(120)]
        assert np.mean([p == t for p, t in zip(seen[attribute], truth, strict=True)]) >= 0.99, attribute


def test_the_geometric_reader_says_none_without_a_single_shape():
    from studio.world.render import compose, coverage, layers, sample_labels

    rng = np.random.default_rng(3)
    labels = sample_labels(rng)
    background, alpha, colour = layers(labels, seed=5)
    empty = compose(background, np.zeros_like(alpha), colour)
    two = compose(background, np.maximum(coverage("circle", 64, 0.28, 0.28, 0.12),
                                         coverage("square", 64, 0.72, 0.72, 0.12)), colour)
    seen = geometry.predict([empty, two, compose(background, alpha, colour)])
    assert seen["shape"] == ["none", "none", labels.shape]


def test_evaluate_reports_both_readings_and_flags_a_disagreement():
    fresh = render_set(24, seed=79, held_out=True)
    expected = [labels_at(fresh, i) for i in range(24)]
    metrics = evaluate(list(fresh["images"]), expected)
    assert metrics["geometric"]["accuracy"]["shape"] >= 0.95
    assert metrics["agreement"]["shape"] >= 0.9 and "shape" not in metrics["flagged"]
    untrained = WorldEvaluator().eval()  # reads at chance: the geometric reader does not
    metrics = evaluate(list(fresh["images"]), expected, evaluator=untrained)
    assert metrics["agreement"]["shape"] < 0.9 and "shape" in metrics["flagged"]


def test_an_image_of_another_size_is_resized_and_a_non_image_refused(caplog):
    from PIL import Image

    big = Image.new("RGB", (128, 96), (200, 200, 200))
    with caplog.at_level("INFO", logger="studio.world"):
        assert as_pixels(big).shape == (64, 64, 3)
    assert "128x96" in caplog.text
    with pytest.raises(InvalidArgumentError, match="float64; give PIL images or uint8 arrays"):
        as_pixels(np.zeros((64, 64, 3)))
    with pytest.raises(InvalidArgumentError, match="str"):
        geometry.read("not an image")
