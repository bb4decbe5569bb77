"""Training recipes as data: every shipped recipe validates, one resolver serves the CLI, the API and the UI,
per-kind defaults agree everywhere, bad recipes and class-image options are refused, class images are drawn
by the backbone, cached and resumed, and orthogonal adapters take their columns from a hash of the trigger."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.adapters.base import adapter_kinds, load_adapter  # noqa: E402

from studio.errors import InvalidArgumentError  # noqa: E402
from studio.training import recipes  # noqa: E402
from studio.training.trainer import TrainConfig, kind_config, train  # noqa: E402
from studio.world.folder import write_reference_folder  # noqa: E402

# a backbone of each recipe target (the real families through their tiny random configs)
BACKBONE_OF = {"any": "tiny-sd1", "sd1": "tiny-sd1", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3",
               "flux": "tiny-flux", "pixart": "tiny-pixart", "world-sd": "world-sd", "world-dit": "world-dit"}
RUN_ONLY = ("folder", "out", "name", "sample_every", "sample_prompts", "checkpoint_every", "device")


def _out(kind: str, tmp_path: Path, stem: str = "a") -> str:
    return str(tmp_path / recipes.config_class(kind).training_output(stem, kind))


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_resolves_and_validates_against_its_kind(name, tmp_path):
    target, kind, variant = recipes.parse_name(name)
    assert target in BACKBONE_OF, f"recipe {name}: no backbone of target {target!r} in this test"
    recipe = recipes.resolve(BACKBONE_OF[target], kind, name)
    assert recipe.name == name and recipe.about and recipe.sources, recipe
    assert all(source.split(":")[0] in recipes.names_of_files() for source in recipe.sources), recipe.sources
    # with a trigger word: a recipe's pivotal tokens need one (without, they are off: tests/test_training.py)
    config = TrainConfig(folder=str(tmp_path), out=_out(kind, tmp_path), kind=kind, backbone=BACKBONE_OF[target],
                         recipe=name, trigger="sks")
    assert config.recipe == name
    for key, value in recipe.options.items():  # the recipe's values reach the run (class images: see below)
        if key not in ("class_images", "class_prompt") and key != "kind":
            assert getattr(config, key) == value, (name, key)
    assert recipe.adapter.items() <= config.adapter.items()
    config_class = adapter_kinds().get_or_raise(config.kind).config_class
    config_class(family="sd1", **config.adapter)  # the kind's own config takes the recipe's adapter section


def test_recipes_follow_the_backbone_and_the_kind():
    assert recipes.resolve("world-sd", "lora").name == "world-sd/lora"
    assert recipes.resolve(None, "lora").name == "world-sd/lora"  # the embedded default
    assert recipes.resolve("tiny-sdxl", "lora").name == "sdxl/lora"
    assert recipes.resolve("tiny-sdxl", "oft").name == "sdxl/oft"  # no sdxl/oft file: any/oft's values
    assert recipes.resolve("tiny-sdxl", "oft").options == recipes.resolve("tiny-sd1", "oft").options
    dora = recipes.resolve("world-sd", "dora")
    assert dora.options["kind"] == "lora" and dora.options["dora"] is True
    assert dora.options["lr"] == recipes.resolve("world-sd", "lora").options["lr"]
    fast = recipes.resolve("world-sd", "lora", "fast")
    assert fast.name == "world-sd/lora@fast" and fast.options["steps"] < recipes.resolve("world-sd", "lora").options["steps"]
    assert recipes.resolve("world-sd", "lora", "sdxl/lora").name == "sdxl/lora"  # a full name picks another


def test_a_folder_and_a_single_file_take_their_familys_recipe(saved_folders, tmp_path):
    from studio.formats import save_single_file

    assert recipes.recipe_target(str(saved_folders("sdxl"))) == "sdxl"
    assert recipes.recipe_target(str(saved_folders("sd3"))) == "sd3"
    from studio.backbones import load_backbone

    save_single_file(load_backbone("tiny-sd1"), tmp_path / "m.safetensors")
    assert recipes.resolve(str(tmp_path / "m.safetensors"), "lora").name == "sd1/lora"


def test_bad_recipe_names_and_keys_are_refused_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(InvalidArgumentError, match=r"no variant 'turbo'.*world-sd/lora@fast"):
        recipes.resolve("world-sd", "lora", "turbo")
    with pytest.raises(InvalidArgumentError, match=r"no recipes for 'sd9'.*world-sd/lora"):
        recipes.resolve("world-sd", "lora", "sd9/lora")
    with pytest.raises(InvalidArgumentError, match="is for kind 'oft', not 'lora'"):
        recipes.resolve("world-sd", "lora", "any/oft")
    with pytest.raises(InvalidArgumentError, match="adapter key 'block_size' is not an option of kind 'lora'"):
        recipes.section_options({"adapter": {"block_size": 8}}, "lora", "recipe x")
    with pytest.raises(InvalidArgumentError, match="train key 'rank' is not a training option.*under adapter:"):
        recipes.section_options({"train": {"rank": 8}}, "lora", "recipe x")
    shipped = tmp_path / "recipes"  # a recipe folder with a file that extends one that is not there
    (shipped / "any").mkdir(parents=True)
    (shipped / "defaults.yaml").write_text("train: {steps: 3}\n")
    (shipped / "any" / "lora.yaml").write_text("extends: any/nothing\n")
    monkeypatch.setattr(recipes, "ROOT", shipped)
    with pytest.raises(InvalidArgumentError, match="extends 'any/nothing', which is not a recipe; recipes: any/lora"):
        recipes.resolve("world-sd", "lora", "any/lora")
    monkeypatch.undo()
    with pytest.raises(InvalidArgumentError, match=r"rank=4: not an option of kind 'controlnet'"):
        TrainConfig(folder=".", out=str(tmp_path / "c"), kind="controlnet", rank=4)


def test_class_image_options_are_checked(tmp_path):
    out = str(tmp_path / "a.safetensors")
    with pytest.raises(InvalidArgumentError, match="class_images=0 draws nothing"):
        TrainConfig(folder=".", out=out, class_prompt="a dog", class_images=0)
    with pytest.raises(InvalidArgumentError, match="must be a whole number >= 0"):
        TrainConfig(folder=".", out=out, class_prompt="a dog", class_images=-5)
    with pytest.raises(InvalidArgumentError, match="needs the class to draw: set class_prompt"):
        TrainConfig(folder=".", out=out, backbone="tiny-sd1", class_images=50)
    # sd1's recipe counts 200 class images but waits for the user's class; with one it draws them
    assert TrainConfig(folder=".", out=out, backbone="tiny-sd1").class_images == 0
    dog = TrainConfig(folder=".", out=out, backbone="tiny-sd1", class_prompt="a photo of a dog")
    assert (dog.class_prompt, dog.class_images) == (["a photo of a dog"], 200)
    # a backbone whose recipe draws none: diffusers' default count
    assert TrainConfig(folder=".", out=out, backbone="tiny-sdxl", class_prompt="a dog").class_images == 100
    # world-sd's recipe brings its own class; class_images=0 turns it off
    off = TrainConfig(folder=".", out=out, class_images=0)
    assert (off.class_prompt, off.class_images) == ([], 0)
    assert TrainConfig(**{f.name: getattr(off, f.name) for f in fields(off)}).class_images == 0  # a resume


def test_per_kind_defaults_are_the_recipes_through_the_api(tmp_path):
    from studio.backbones import load_backbone

    backbone = load_backbone("tiny-sd1")
    for kind in ("lora", "orthogonal", "oft", "boft"):
        config = TrainConfig(folder=".", out=_out(kind, tmp_path), kind=kind, backbone="tiny-sd1")
        adapter = kind_config(config, backbone)
        expected = recipes.resolve("tiny-sd1", kind).adapter
        for key in ("rank", "block_size", "target"):
            if key in expected:
                assert getattr(adapter, key) == expected[key], (kind, key)
    assert kind_config(TrainConfig(folder=".", out=_out("orthogonal", tmp_path), kind="orthogonal",
                                   backbone="tiny-sd1"), backbone).rank == 20  # the paper's, not LoRA's 16


def _training(path: str) -> dict:
    training = load_adapter(path).config.training
    return {k: v for k, v in training.items() if k not in RUN_ONLY}


def test_cli_api_and_ui_train_with_the_same_recipe(tmp_path, monkeypatch):
    """The same folder, backbone, kind and steps through `studio train`, `studio.train` and the Train tab give
    adapters whose manifests record the same resolved options and recipe name."""
    import app

    refs = tmp_path / "refs"
    write_reference_folder(refs, n=2, seed=3, shape="star", trigger="sks")
    common = ["--kind", "orthogonal", "--backbone", "tiny-sd1", "--steps", "2", "--trigger", "sks"]
    done = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(refs), *common,
                           "--out", str(tmp_path / "cli.safetensors")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "recipe sd1/orthogonal: steps=2, batch=4, lr=0.0001, rank=20" in " ".join(done.stderr.split()), done.stderr
    api = train(folder=str(refs), out=str(tmp_path / "api.safetensors"), kind="orthogonal", backbone="tiny-sd1",
                steps=2, trigger="sks", log=lambda line: None)
    # the tab: fields filled from the recipe, then Start
    _, steps, rank, lr, condition, note = app.recipe_fields("tiny-sd1", "orthogonal", "")
    assert (rank["value"], lr["value"], condition["visible"]) == (20, 1e-4, False) and "sd1/orthogonal" in note
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    rows = [[p.name, p.with_suffix(".txt").read_text().strip()] for p in sorted(refs.glob("*.png"))]
    job = app.start_training(str(refs), rows, "ui", "orthogonal", "tiny-sd1", "sks", 2, rank["value"], lr["value"])
    app.JOBS.threads[job].join(timeout=300)
    ui = next((tmp_path / "home" / "adapters").glob("ui.safetensors"))
    cli, api_, ui_ = (_training(p) for p in (tmp_path / "cli.safetensors", api, ui))
    assert cli == api_ == ui_ and cli["recipe"] == "sd1/orthogonal" and cli["adapter"]["rank"] == 20
    # the concept seed is the trigger's hash wherever the run starts
    assert len({load_adapter(p).config.concept_seed for p in (tmp_path / "cli.safetensors", api, ui)}) == 1


def test_recipes_listing_and_the_variant_option(tmp_path):
    import os

    done = subprocess.run([sys.executable, "-m", "studio.cli", "recipes", "--kind", "lora"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0 and "world-sd/lora@fast" in done.stdout and "sdxl/lora" in done.stdout
    assert "any/oft" not in done.stdout
    refs = tmp_path / "refs"
    write_reference_folder(refs, n=1, seed=3, shape="star", trigger="sks")
    done = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(refs), "--recipe", "turbo", "--out",
                           str(tmp_path / "a.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "world-sd/lora@fast" in done.stderr


def test_class_images_are_drawn_by_the_backbone_cached_and_resumed(tmp_path):
    from studio.backbones import load_backbone
    from studio.training.class_images import class_images

    backbone = load_backbone("tiny-sd1")
    logs: list[str] = []
    folder = class_images(backbone, ["a cat", "a dog"], 4, seed=5, log=logs.append)
    assert sorted(p.name for p in folder.glob("*.txt")) == ["0000.txt", "0001.txt", "0002.txt", "0003.txt"]
    assert [(folder / f"{i:04d}.txt").read_text().strip() for i in range(4)] == ["a cat", "a cat", "a dog", "a dog"]
    first = (folder / "0003.png").read_bytes()
    (folder / "0003.txt").unlink()  # killed before its caption: drawn again, the same image
    logs.clear()
    assert class_images(backbone, ["a cat", "a dog"], 4, seed=5, log=logs.append) == folder
    assert "drawing 1 of 4" in logs[0] and (folder / "0003.png").read_bytes() == first
    logs.clear()
    class_images(backbone, ["a cat", "a dog"], 4, seed=5, log=logs.append)
    assert "from the cache" in logs[0]
    assert class_images(backbone, ["a cat"], 4, seed=5, log=logs.append) != folder  # another class, another folder


def test_a_run_trains_on_its_class_images_and_clips_a_batch_larger_than_the_folder(tmp_path):
    refs = tmp_path / "refs"
    write_reference_folder(refs, n=2, seed=3, shape="star", trigger="sks")
    logs: list[str] = []
    path = train(folder=str(refs), out=str(tmp_path / "a.safetensors"), backbone="tiny-sd1", batch=6, steps=1,
                 class_prompt="a shape", class_images=3, log=logs.append)
    text = "\n".join(logs)
    assert "class images: drawing 3 of 3" in text and "batch 6 clipped to 2" in text
    training = load_adapter(path).config.training
    assert (training["class_prompt"], training["class_images"], training["recipe"]) == (["a shape"], 3, "sd1/lora")


def test_orthogonal_adapters_trained_apart_take_the_hash_of_their_trigger(tmp_path):
    from studio.adapters.orthogonal import HASHED, hashed_seed

    star = TrainConfig(folder=".", out=str(tmp_path / "a.safetensors"), kind="orthogonal", trigger="sks")
    heart = TrainConfig(folder=".", out=str(tmp_path / "b.safetensors"), kind="orthogonal", trigger="zwx")
    named = TrainConfig(folder=".", out=str(tmp_path / "moon.safetensors"), kind="orthogonal")
    assert star.concept_seed == hashed_seed("sks") == hashed_seed(" SKS ") >= HASHED
    assert len({star.concept_seed, heart.concept_seed, named.concept_seed}) == 3
    assert named.concept_seed == hashed_seed("moon")
    assert TrainConfig(folder=".", out=str(tmp_path / "c.safetensors"), kind="orthogonal",
                       concept_seed=2).concept_seed == 2  # chosen by hand


def test_the_manifest_records_the_recipe_and_json_round_trips(tmp_path):
    config = TrainConfig(folder=".", out=str(tmp_path / "a.safetensors"), recipe="fast")
    assert config.recipe == "world-sd/lora@fast" and config.steps == 150
    again = TrainConfig(**json.loads(json.dumps({f.name: getattr(config, f.name) for f in fields(config)})))
    assert again == config
