"""The web UI's Generate handler works through the Python API and saves replayable PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


def test_generate_handler_saves_pngs_with_recipes():
    from studio.recipe import read_recipe

    paths, parameters = app.generate_images("a red star", "", "tiny-sd1", 2, 12, 2, 5.0, 64, 64, "euler")
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    assert parameters.startswith("a red star\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 12")
    assert read_recipe(paths[1]).image_seed == 13


def test_bad_input_becomes_a_gradio_error():
    import gradio as gr
    import pytest

    with pytest.raises(gr.Error, match="width=60"):
        app.generate_images("x", "", "tiny-sd1", 1, 1, 1, 5.0, 60, 64, "")


def test_blocks_build():
    demo = app.build_app()
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Prompt", "Backbone", "Scheduler", "Images", "Parameters"} <= labels
