"""Recipes: both PNG chunks, the A1111 text, and the same pixels made again from the PNG alone."""

from __future__ import annotations

import pytest
from conftest import pixels
from PIL import Image
from studio.pipelines import StudioPipeline

from studio.errors import RecipeError
from studio.recipe import Recipe, read_png_text, read_recipe


@pytest.fixture(scope="module")
def pipeline(backbones):
    return StudioPipeline(backbones("sd1"))


def test_png_holds_a1111_parameters_and_the_json_recipe(pipeline, tmp_path):
    result = pipeline.generate("a red star", negative_prompt="blurry", n=2, seed=41, steps=3,
                               scheduler="euler_a", guidance=6.5)
    paths = result.save(tmp_path / "star.png")
    assert [p.name for p in paths] == ["star-0.png", "star-1.png"]
    text = read_png_text(paths[1])
    assert text["parameters"].splitlines() == [
        "a red star",
        "Negative prompt: blurry",
        f"Steps: 3, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: "
        f"{pipeline.backbone.short_hash}, Model: tiny-sd1, Batch size: 2, Batch pos: 1, Version: studio 0.1.0",
    ]
    recipe = read_recipe(paths[1])
    assert recipe == result.recipes[1]
    assert recipe.index == 1 and recipe.image_seed == 42 and recipe.backbone_hash == pipeline.backbone.fingerprint()


def test_replay_makes_the_same_pixels(pipeline, tmp_path):
    result = pipeline.generate("a blue heart on a striped background", n=3, seed=5, steps=3)
    path = result.save(tmp_path)[2]
    assert path.name == "00002-7.png"
    again = pipeline.replay(read_recipe(path))
    assert abs(pixels(again) - pixels(Image.open(path))).max() == 0
    assert abs(pixels(again) - pixels(result.images[1])).max() > 0  # and not some other image of the batch


def test_folder_output_numbers_after_existing_files(pipeline, tmp_path):
    first = pipeline.generate("x", seed=1, steps=1).save(tmp_path)
    second = pipeline.generate("x", seed=1, steps=1).save(tmp_path)
    assert [p.name for p in first + second] == ["00000-1.png", "00001-1.png"]


def test_recipe_json_round_trip_and_unknown_fields():
    recipe = Recipe(prompt="p", seed=1, steps=2, guidance=3.0, width=64, height=64, scheduler="ddim",
                    backbone="tiny-sd1", backbone_hash="ab" * 32, family="sd1", dtype="float32", device="cpu")
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match="newer studio"):
        Recipe.from_dict(recipe.to_dict() | {"sharpness": 2})
    with pytest.raises(RecipeError, match="malformed"):
        Recipe.from_json("{not json")


def test_image_without_recipe_is_refused_clearly(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(RecipeError, match="not written by studio"):
        read_recipe(plain)
    with pytest.raises(RecipeError, match="does not exist"):
        read_recipe(tmp_path / "missing.png")
