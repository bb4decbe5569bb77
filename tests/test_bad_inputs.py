"""The README's catalogue of bad inputs ("Bad input and faults"): every command there runs, here, in a folder
holding the files the README names, exits 2 with the words the README shows, and raises no traceback. The
README table is the list, so the two cannot drift apart."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import bomb
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from studio.errors import StudioError

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TABLE = README[README.index("<!-- bad-inputs -->"):README.index("<!-- /bad-inputs -->")]
ROWS = [(m[1], m[2].strip()) for m in re.finditer(r"^\| `(studio [^`]+)` \| (.+?) \|$", TABLE, re.M)]


def test_the_catalogue_is_long_and_covers_every_writing_command():
    assert len(ROWS) >= 50
    for command in ("train", "train-batch", "generate", "inspect", "merge", "erase", "convert", "world render"):
        assert any(c.startswith(f"studio {command} ") or c == f"studio {command}" for c, _ in ROWS), command


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from studio.pipelines import StudioPipeline

    from studio.backbones import load_backbone
    from studio.recipe import save_png
    from studio.world.folder import write_reference_folder

    folder = tmp_path_factory.mktemp("bad-inputs")
    write_reference_folder(folder / "refs", n=3, seed=1, shape="star", trigger="sks")
    (folder / "empty").mkdir()
    (folder / "bombs").mkdir()
    bomb(folder / "bombs" / "huge.png")
    bomb(folder / "huge.png")
    torch.save({"a": torch.zeros(2)}, folder / "pickle.safetensors")
    (folder / "broken.yaml").write_text("steps: [1\n  bad: :")
    (folder / "unknown.yaml").write_text("stepz: 3\n")
    recipe = StudioPipeline(load_backbone("world-sd")).recipe("a star", seed=1, steps=2)
    save_png(Image.new("RGB", (64, 64)), dataclasses.replace(recipe, steps="many"), folder / "many.png")
    save_png(Image.new("RGB", (64, 64)), dataclasses.replace(recipe, width=10**6, height=10**6), folder / "giant.png")
    Image.new("RGB", (64, 64)).save(folder / "plain.png")
    Image.new("RGB", (64, 64)).save(folder / "existing.png")
    save_file({"x": torch.zeros(1)}, str(folder / "existing.safetensors"))
    return folder


@pytest.mark.parametrize("command,answer", ROWS, ids=[c.removeprefix("studio ")[:60] for c, _ in ROWS])
def test_each_bad_input_gets_its_answer(scratch, monkeypatch, command, answer):
    from studio.cli import app

    monkeypatch.chdir(scratch)
    before = sorted(p.name for p in scratch.iterdir())
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    if isinstance(result.exception, StudioError):  # what `studio` prints as "error: ..." with exit code 2
        said, code = str(result.exception), 2
    else:
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{command}: a traceback ({type(result.exception).__name__}: {result.exception})"
        said, code = result.output, result.exit_code
    assert code == 2, f"{command}: exit {code}\n{said}"
    assert answer in " ".join(said.split()), f"{command}: {said}"
    assert sorted(p.name for p in scratch.iterdir()) == before  # nothing written, nothing lost
