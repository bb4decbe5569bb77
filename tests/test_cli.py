"""The `studio` CLI: light --help, generate with a progress bar, --from makes the same PNG, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from studio.cli import app, main
from studio.formats import save_single_file

STUDIO = [sys.executable, "-m", "studio.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom studio.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'gradio', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
    for command in ("generate", "inspect", "demo"):
        assert command in done.stdout


def test_generate_then_from_makes_the_same_png_in_a_new_process(tmp_path):
    first = run_cli("generate", "a red star", "--n", "2", "--seed", "9", "--steps", "3", "--scheduler", "ddim",
                    "--out", str(tmp_path / "star.png"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(tmp_path / "star-0.png"), str(tmp_path / "star-1.png")]
    assert "3/3" in first.stderr  # the progress bar over steps
    again = run_cli("generate", "--from", str(tmp_path / "star-1.png"), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert "will differ" not in again.stderr  # the backbone hash matched
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "star-1.png").read_bytes()


def test_from_with_a_change_makes_a_new_recipe(tmp_path):
    runner = CliRunner()
    made = runner.invoke(app, ["generate", "a cat", "--seed", "4", "--steps", "2", "--out", str(tmp_path / "a.png")])
    assert made.exit_code == 0, made.output
    changed = runner.invoke(app, ["generate", "--from", str(tmp_path / "a.png"), "--steps", "3",
                                  "--out", str(tmp_path / "b.png")])
    assert changed.exit_code == 0, changed.output
    from studio.recipe import read_recipe

    a, b = read_recipe(tmp_path / "a.png"), read_recipe(tmp_path / "b.png")
    assert (b.prompt, b.seed, b.steps) == ("a cat", 4, 3) and a.steps == 2


def test_errors_exit_2_with_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["studio", "generate", "a star", "--n", "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "error: n=0 must be a whole number >= 1" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["studio", "generate"])
    with pytest.raises(SystemExit):
        main()
    assert "PROMPT is missing" in capsys.readouterr().err


def test_inspect_checkpoint_folder_png_and_pickle(backbones, tmp_path):
    runner = CliRunner()
    single = save_single_file(backbones("sd1"), tmp_path / "tiny.safetensors")
    shown = runner.invoke(app, ["inspect", str(single), "--json"])
    info = json.loads(shown.output)
    assert info["kind"] == "backbone checkpoint" and info["family"] == "sd1"
    assert info["tensors"] > 100 and info["metadata"]["studio.family"] == "sd1"
    backbones("sdxl").pipe.save_pretrained(tmp_path / "folder")
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "folder"), "--json"]).output)
    assert info["family"] == "sdxl" and info["pipeline"] == "StableDiffusionXLPipeline"
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    refused = runner.invoke(app, ["inspect", str(pickle)])
    assert "pickle" in str(refused.exception)
    plain = runner.invoke(app, ["inspect", "tiny-flux"])
    assert "embedded backbone" in plain.output


def test_inspect_png_shows_its_recipe(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["generate", "a moon", "--seed", "2", "--steps", "1",
                               "--out", str(tmp_path / "m.png")]).exit_code == 0
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "m.png"), "--json"]).output)
    assert info["kind"] == "studio image" and info["recipe"]["prompt"] == "a moon"
    assert info["parameters"].startswith("a moon\nSteps: 1, Sampler: DPM++ 2M Karras")


def test_demo_writes_pngs_and_a_scored_page(tmp_path):
    done = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--steps", "2", "--backbone", "tiny-sd1"])
    assert done.exit_code == 0, done.output
    assert "random-initialised" in done.output  # said plainly for the random tiny models
    page = (tmp_path / "index.html").read_text()
    assert page.count("<img") == 8 and "random-initialised" in page
    assert "evaluator:" in page and "shape:" in page  # every image read by the evaluator
    assert sorted(p.name for p in Path(tmp_path).glob("*.png")) == [f"{i:02d}.png" for i in range(8)]
