"""A kind's own training options live in the kind: its config class declares each one (`option`: help, keyword),
TrainConfig keeps them in its `adapter` section and routes the flat keywords (rank=8, concept_slots=4) there,
recipes' `adapter:` sections go through the same check, the kind's hook completes or refuses them, and the CLI
builds its kind choices and option flags from the registry. A kind registered here, unknown to the trainer,
trains its options through all of it."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest
from studio.adapters.base import (
    ADAPTERS,
    KIND_ALIASES,
    Adapter,
    AdapterConfig,
    Trainable,
    adapter_kinds,
    option,
)
from typer.testing import CliRunner

from studio.cli import _with_kind_options, app  # built before the tests register a kind
from studio.errors import InvalidArgumentError
from studio.training import recipes
from studio.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(kw_only=True)
class DummyConfig(AdapterConfig):
    strength: float = option(1.0, "how strongly it acts [default: the recipe's].", keyword="dummy_strength")
    label: str = option("", "what it is called in the log.")
    kept: int = 0  # not an option: a run cannot set it

    @classmethod
    def prepare_training_options(cls, options: dict[str, Any], run: Any) -> None:
        super().prepare_training_options(options, run)
        if options["strength"] > 10:
            raise InvalidArgumentError(f"strength={options['strength']!r} must be <= 10.")
        options.setdefault("label", run.trigger or "unnamed")


class DummyAdapter(Adapter, Trainable):  # a kind that trains from a folder
    kind = "dummy"
    config_class = DummyConfig


@pytest.fixture
def dummy(tmp_path, monkeypatch):
    """The kind "dummy" registered, with a recipe (any/dummy.yaml) beside the shipped ones."""
    adapter_kinds()
    monkeypatch.setitem(ADAPTERS, "dummy", DummyAdapter)
    shipped = tmp_path / "recipes"
    shutil.copytree(recipes.ROOT, shipped)
    (shipped / "any" / "dummy.yaml").write_text('about: "a kind of the tests"\nsource: "tests"\n'
                                                "adapter: {strength: 2.0}\ntrain: {steps: 5}\n")
    monkeypatch.setattr(recipes, "ROOT", shipped)
    return str(tmp_path / "d.safetensors")


def test_a_registered_kind_trains_its_own_options_through_the_trainer(dummy):
    config = TrainConfig(folder=".", out=dummy, kind="dummy", trigger="sks")
    assert config.adapter == {"strength": 2.0, "label": "sks"} and config.steps == 5  # recipe, then the hook
    flat = TrainConfig(folder=".", out=dummy, kind="dummy", dummy_strength=3.0)
    assert flat.adapter["strength"] == 3.0 and flat.dummy_strength == 3.0 and flat.label == "unnamed"
    assert TrainConfig(folder=".", out=dummy, kind="dummy", adapter={"strength": 4.0}).dummy_strength == 4.0
    assert flat.rank is None  # another kind's option: not set
    with pytest.raises(InvalidArgumentError, match=r"rank=4: not an option of kind 'dummy' \(its options: label, "
                                                   r"strength\); leave it out"):
        TrainConfig(folder=".", out=dummy, kind="dummy", rank=4)
    with pytest.raises(InvalidArgumentError, match=r"kept=1: not an option of kind 'dummy'"):
        TrainConfig(folder=".", out=dummy, kind="dummy", adapter={"kept": 1})
    with pytest.raises(InvalidArgumentError, match="strength=11.0 must be <= 10"):  # the kind's hook refuses
        TrainConfig(folder=".", out=dummy, kind="dummy", dummy_strength=11.0)
    with pytest.raises(InvalidArgumentError, match=r"adapter key 'rank' is not an option of kind 'dummy'; its "
                                                   r"options: label, strength"):
        recipes.section_options({"adapter": {"rank": 8}}, "dummy", "recipe x")
    assert "dummy" in recipes.trainable_kinds() and "dummy" not in KIND_ALIASES


def test_the_cli_builds_a_flag_per_option_from_the_config(dummy):
    import typer

    given: dict[str, Any] = {}
    small = typer.Typer()

    @small.command()
    @_with_kind_options(["lora", "dummy"])
    def command(steps: int | None = None, **kind_options: Any) -> None:
        given.update(kind_options, steps=steps)

    params = {p.name: p for p in typer.main.get_command(small).params}
    assert list(params)[:2] == ["steps", "rank"] and "kind_options" not in params
    assert params["dummy_strength"].opts == ["--dummy-strength"]
    assert params["dummy_strength"].help == "dummy: how strongly it acts [default: the recipe's]."
    assert params["text_encoder"].opts == ["--text-encoder"] and params["text_encoder"].secondary_opts == [
        "--no-text-encoder"]
    assert CliRunner().invoke(small, ["--dummy-strength", "3", "--no-text-encoder"]).exit_code == 0
    assert given == {"steps": None, "rank": None, "alpha": None, "dora": None, "target": None, "text_encoder": False,
                     "dummy_strength": 3.0, "label": None}


def test_flat_keywords_route_into_the_adapter_section_and_read_back(tmp_path):
    out = str(tmp_path / "a.safetensors")
    config = TrainConfig(folder=".", out=out, kind="orthogonal", rank=8, concept_slots=4, concept_seed=3)
    assert {"rank": 8, "slots": 4, "concept_seed": 3}.items() <= config.adapter.items()
    assert (config.rank, config.concept_slots, config.concept_seed, config.oft_block_size) == (8, 4, 3, None)
    oft = TrainConfig(folder=".", out=out, kind="oft", oft_block_size=4)
    assert oft.adapter["block_size"] == 4 and oft.oft_block_size == 4
    # a flat keyword wins over the section (a flag over a --config file's adapter:), None is not given
    assert TrainConfig(folder=".", out=out, adapter={"rank": 8}, rank=4).rank == 4
    assert TrainConfig(folder=".", out=out, rank=None).rank == recipes.resolve(None, "lora").adapter["rank"]
    # a record written before the adapter section (a library job, a batch's list) loads into the same run
    old = {"folder": ".", "out": out, "kind": "orthogonal", "rank": 8, "alpha": None, "dora": None, "target": None,
           "text_encoder": None, "concept_seed": 3, "concept_slots": 4, "oft_block_size": None,
           "image_encoder": None, "condition": None}
    assert TrainConfig(**old) == config
    again = TrainConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert again == config and "rank" not in dataclasses.asdict(config)  # recorded in its section
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: oft\nadapter: {block_size: 4}\nsteps: 3\n")
    assert TrainConfig.from_file(recipe, folder=".", out=out).adapter["block_size"] == 4
    assert TrainConfig.from_file(recipe, folder=".", out=out, oft_block_size=2).oft_block_size == 2


def test_an_option_of_another_kind_is_refused_naming_the_kind_and_its_options(tmp_path):
    out = str(tmp_path / "a.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"concept_slots=4, oft_block_size=8: not an option of kind 'lora' "
                                                   r"\(its options: alpha, dora, rank, target, text_encoder\); leave "
                                                   r"them out"):
        TrainConfig(folder=".", out=out, kind="lora", concept_slots=4, oft_block_size=8)
    with pytest.raises(InvalidArgumentError, match=r"slots=4: not an option of kind 'oft'"):
        TrainConfig(folder=".", out=out, kind="oft", adapter={"slots": 4})
    with pytest.raises(InvalidArgumentError, match="must map the kind's options"):
        TrainConfig(folder=".", out=out, adapter=[8])
    with pytest.raises(TypeError, match="stepz"):  # not an option of any kind: not a keyword at all
        TrainConfig(folder=".", out=out, stepz=3)
    with pytest.raises(InvalidArgumentError, match="rank=0 must be an integer >= 1"):  # the kind's check, before loading
        TrainConfig(folder=".", out=out, rank=0)


def test_dora_is_an_alias_the_lora_module_declares(tmp_path):
    out = str(tmp_path / "a.safetensors")
    assert (KIND_ALIASES["dora"].kind, KIND_ALIASES["dora"].options) == ("lora", {"dora": True})
    assert "dora" not in adapter_kinds() and recipes.base_kind("dora") == "lora"
    config = TrainConfig(folder=".", out=out, kind="dora")
    assert (config.kind, config.dora, config.recipe) == ("lora", True, "world-sd/dora")
    recipe = recipes.resolve("world-sd", "dora")
    assert recipe.adapter["dora"] is True and "dora" in recipe.changed and recipe.kind == "lora"
    assert recipes.recipe_line(config).startswith("recipe world-sd/dora:") and "dora=True" in recipes.recipe_line(config)
    kinds = recipes.trainable_kinds()
    # every kind with a recipe trains; a Trainable kind without recipe files (hra) too
    assert kinds.index("dora") == kinds.index("lora") + 1 and set(recipes.recipe_kinds()) <= set(kinds)


def test_the_config_file_kind_is_not_overridden_by_the_cli_default(tmp_path, monkeypatch):
    """The orthogonal rank bug: `studio train --config` with `kind: orthogonal` and `rank: 12` trained a LoRA at rank
    12, the --kind flag's default beating the file's kind."""
    import studio.training.trainer as trainer

    seen: list[TrainConfig] = []
    monkeypatch.setattr(trainer, "train", lambda config, **_: seen.append(config) or config.out)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").mkdir()
    Path("recipe.yaml").write_text("kind: orthogonal\nrank: 12\nsteps: 50\n")
    runner = CliRunner()
    done = runner.invoke(app, ["train", "refs", "--config", "recipe.yaml"])
    assert done.exit_code == 0, done.output
    assert (seen[-1].kind, seen[-1].rank, seen[-1].recipe, seen[-1].out) == (
        "orthogonal", 12, "world-sd/orthogonal", "refs.safetensors")
    assert runner.invoke(app, ["train", "refs", "--config", "recipe.yaml", "--kind", "lora"]).exit_code == 0
    assert (seen[-1].kind, seen[-1].rank) == ("lora", 12)  # a kind given on the command line still wins
    Path("recipe.yaml").write_text("kind: controlnet\ncondition: mask\n")
    assert runner.invoke(app, ["train", "refs", "--config", "recipe.yaml"]).exit_code == 0
    assert (seen[-1].kind, seen[-1].out) == ("controlnet", "refs-controlnet")  # the file's kind names the output


def test_the_cli_takes_its_kinds_and_option_flags_from_the_registry():
    shown = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output.split())
    assert f"{', '.join(recipes.trainable_kinds()[:-1])} or {recipes.trainable_kinds()[-1]}" in shown
    helps: dict[str, list[str]] = {}  # a keyword several kinds share shows one kind's help
    for kind in recipes.trainable_kinds():
        for keyword, declared in recipes.kind_options(kind).items():
            helps.setdefault(f"--{keyword.replace('_', '-')}", []).append(declared.metadata["help"])
    for flag, texts in helps.items():
        assert flag in shown and any(text in shown for text in texts), flag


def test_option_keywords_are_one_name_per_idea():
    """No kind's option keyword is also a run option (the flat keyword would be ambiguous), and kinds sharing a
    keyword give it one type."""
    run = {f.name for f in dataclasses.fields(TrainConfig)}
    types: dict[str, Any] = {}
    for cls in adapter_kinds().values():
        hints = typing.get_type_hints(cls.config_class)
        for keyword, declared in cls.config_class.training_options().items():
            assert keyword not in run, (cls.kind, keyword)
            assert types.setdefault(keyword, hints[declared.name]) == hints[declared.name], (cls.kind, keyword)
    assert recipes.run_options() <= run - {"folder", "out", "kind", "recipe", "adapter"}


def test_recipes_do_not_import_the_trainer():
    """Imports run one way, lazy ones included: the trainer reads the recipes, never the other way."""
    tree = ast.parse((ROOT / "studio" / "training" / "recipes.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("studio.training")}, imported
