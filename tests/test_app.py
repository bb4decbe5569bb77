"""The web UI's handlers, called directly: every one works through the Python API, bad input becomes a
message in the page, uploads are checked and their names sanitised, training jobs run in threads whose
state lives in the library."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.adapters.base import load_adapter  # noqa: E402

import app  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# the generic LoRA recipe (no class images to draw first): these tests are of the handlers, not the recipe
GENERIC = "any/lora"
NO_IMAGE_PROMPT = [None, 1.0, "all", ""]  # reference image, scale, routing, content words
NO_CONTROL = [None, "controlnet", "", "", 1.0, 1.0]  # control image, kind, model folder, preprocessor, scale, end
NO_STYLE = [None, 1.0]  # style image, weight


def empty_slots() -> list:
    """The image-prompt, control and style inputs left empty, then the adapter stack's empty slots."""
    return NO_IMAGE_PROMPT + NO_CONTROL + NO_STYLE + [None, 1.0, True] * app.SLOTS


def wait_for(job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while app.JOBS.running(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    return app.library().job(job_id)


@pytest.fixture
def trained(home, tmp_path):
    """Two tiny adapters trained through the Train tab's handlers (3 steps each), in the library."""
    from studio.world.folder import write_reference_folder

    paths = []
    for shape, word in (("star", "sks"), ("heart", "zwx")):
        refs = home / f"refs-{shape}"  # the Load folder action reads the studio home and the working directory
        write_reference_folder(refs, n=3, seed=1, shape=shape, trigger=word)
        source, rows, _ = app.pick_server_folder(str(refs), word)
        tokens = 1 if shape == "heart" else 0  # one adapter with its trigger learned as a token
        job = app.start_training(source, rows, f"{shape}-adapter", "lora", "world-sd", word, 3, 4, 1e-3, tokens,
                                 recipe=GENERIC)
        row = wait_for(job)
        assert row["status"] == "done", row["error"]
        paths.append(json.loads(row["result"])["path"])
        assert sorted(load_adapter(paths[-1]).tokens) == ([word] if tokens else [])
    return paths


def test_generate_handler_saves_pngs_with_recipes_and_history(home):
    from studio.recipe import read_recipe

    gallery, recipes, parameters = app.generate_images("a red star", "", "tiny-sd1", 2, 12, 2, 5.0, 64, 64, "euler",
                                                       *empty_slots())
    paths = [p for p, _ in gallery]
    assert len(paths) == 2 and all(Path(p).is_file() and Path(p).parent == home / "outputs" for p in paths)
    assert parameters.startswith("a red star\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 12")
    assert read_recipe(paths[1]).image_seed == 13
    text, recipe = app.select_image(recipes, 1)
    assert "Seed: 13" in text and json.loads(recipe)["index"] == 1
    history, history_recipes = app.history_view()
    assert [p for p, _ in history] == paths[::-1] and history_recipes == recipes[::-1]


def test_reuse_recipe_fills_the_controls_with_that_image(home):
    gallery, recipes, _ = app.generate_images("a blue circle", "blurry", "tiny-sd1", 2, 40, 2, 4.5, 64, 64, "ddim",
                                              *empty_slots())
    values = app.reuse_recipe(recipes[1])
    assert values[:20] == ["a blue circle", "blurry", "tiny-sd1", 1, 41, 2, 4.5, 64, 64, "ddim", *NO_IMAGE_PROMPT,
                           *NO_CONTROL]
    again, _, _ = app.generate_images(*values)
    from conftest import pixels
    from PIL import Image

    remade, original = pixels(Image.open(again[0][0])), pixels(Image.open(gallery[1][0]))
    # the same image, remade: alone instead of second in a batch of 2, some CPUs' kernels round a value
    # differently, which moves a rare pixel by one 8-bit level; another seed's image differs everywhere
    assert abs(remade - original).max() <= 1
    assert abs(remade - pixels(Image.open(gallery[0][0]))).mean() > 5


def test_bad_input_becomes_a_message_not_a_traceback(home):
    import gradio as gr

    with pytest.raises(gr.Error, match="width=60"):
        app.generate_images("x", "", "tiny-sd1", 1, 1, 1, 5.0, 60, 64, "", *empty_slots())
    with pytest.raises(gr.Error, match="reuse"):
        app.reuse_recipe(None)
    with pytest.raises(gr.Error, match="at least two"):
        app.merge_plan(["one.safetensors"])
    with pytest.raises(gr.Error, match="No training images"):
        app.start_training("", [], "x", "lora", "world-sd", "sks", 2, 4, 1e-3)
    with pytest.raises(gr.Error, match="outside the folders"):
        app.pick_server_folder("/no/such/folder")


def test_names_are_sanitised_and_uploads_checked(home, tmp_path):
    import gradio as gr
    from PIL import Image

    assert app.safe_name("../../etc/passwd") == "passwd"
    assert app.safe_name("..\\..\\win.ini") == "win.ini"
    assert app.safe_name("a b/../c?.png") == "c_.png"
    assert app.safe_name("...") == "file" and app.safe_name(".hidden.png") == "hidden.png"
    good = tmp_path / "..%2Fstar.png"
    Image.new("RGB", (64, 64), "red").save(good)
    fake = tmp_path / "evil.png"
    fake.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    caption = tmp_path / "..%2Fstar.txt"  # its image's caption: the upload of the same name
    caption.write_text("a red sks star")
    staged, rows, note = app.stage_uploads([str(good), str(fake), str(script), str(caption)], "sks")
    staged = Path(staged)
    assert staged.parent == home / "uploads"
    assert sorted(p.name for p in staged.iterdir()) == ["2Fstar.png", "2Fstar.txt"]
    assert "evil.png (unreadable image)" in note and "run.sh (not an image)" in note
    assert rows == [["2Fstar.png", "a red sks star"]]
    # adapter uploads: safetensors only, checked, never replacing a file
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(gr.Error, match="only safetensors"):
        app.import_adapter(str(pickle))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a header")
    with pytest.raises(gr.Error):
        app.import_adapter(str(broken))
    assert not (home / "adapters" / "broken.safetensors").exists()


def test_training_job_runs_in_a_thread_and_lands_in_the_library(trained, home, tmp_path):
    star, heart = trained
    assert Path(star).parent == home / "adapters"
    html, plot, samples = app.job_view(app.latest_job())
    assert "data-status='done'" in html and "step 3 of 3" in html
    assert Path(plot).is_file() and samples and all(Path(s).is_file() for s in samples)
    # the live view's tick: drawn for a page that has not seen the job, nothing redrawn once it has
    # (and the timer stops: the job is not running; Start and Resume restart it)
    *view, seen, timer = app.live_view(app.latest_job(), None)
    assert view == [html, plot, samples] and timer.active is False
    import gradio as gr

    *unchanged, timer = app.live_view(app.latest_job(), seen)
    assert unchanged == [gr.skip()] * 4 and timer.active is False
    assert app.live_view(None, seen)[0].startswith("<p>No training yet")
    gallery, table = app.library_view("")
    assert {row[0] for row in table} == {"star-adapter", "heart-adapter"} and len(gallery) == 2
    assert [row[0] for row in app.library_view("zwx")[1]] == ["heart-adapter"]  # search by trigger word
    # stacked in Generate: the recipe names the adapter at its weight
    gallery, recipes, parameters = app.generate_images(
        "a red sks star", "", "world-sd", 1, 5, 2, 7.0, 64, 64, "", *NO_IMAGE_PROMPT, *NO_CONTROL, *NO_STYLE, star, 0.8,
        True, heart, 1.0, False,
        *([None, 1.0, True] * (app.SLOTS - 2)))
    adapters = json.loads(recipes[0])["adapters"]
    assert [(a["name"], a["weight"]) for a in adapters] == [("star-adapter", 0.8)]
    assert "<lora:star-adapter:0.8>" in parameters
    # import by upload: copied under adapters/ with its tags, a second upload of the same name kept apart
    upload = tmp_path / "upload" / "shared star.safetensors"
    upload.parent.mkdir()
    upload.write_bytes(Path(star).read_bytes())
    assert "Imported star-adapter (lora, sd1)" in app.import_adapter(str(upload), "mine, shapes")
    app.import_adapter(str(upload), "mine")
    imported = [row for row in app.library_view("mine")[1]]
    assert sorted(row[6] for row in imported) == ["shared_star-1.safetensors", "shared_star.safetensors"]
    assert {row[5] for row in imported} == {"mine, shapes", "mine"} and {row[3] for row in imported} == {"world-sd"}


def test_cancel_then_resume_finishes_the_same_steps(home, tmp_path):
    from studio.world.folder import write_reference_folder

    refs = home / "refs"
    write_reference_folder(refs, n=3, seed=1, shape="star", trigger="sks")
    source, rows, _ = app.pick_server_folder(str(refs), "sks")
    app.JOBS.cancel(-1)  # unknown ids are ignored
    job = app.start_training(source, rows, "slow", "lora", "world-sd", "sks", 12, 4, 1e-3, recipe=GENERIC)
    import gradio as gr

    with pytest.raises(gr.Error, match="is training"):  # a second user cannot start the same name meanwhile
        app.start_training(source, rows, "slow", "lora", "world-sd", "sks", 12, 4, 1e-3)
    deadline = time.monotonic() + 60
    while (app.library().job(job)["step"] or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.live_view(job, None)[-1] == gr.skip()  # a running job keeps the live view's timer ticking
    app.cancel_training(job)
    row = wait_for(job)
    assert row["status"] == "cancelled" and row["step"] < 12
    html, _, _ = app.job_view(job)
    assert "cancelled" in html
    assert app.resume_training(job) == job
    row = wait_for(job)
    assert row["status"] == "done" and row["step"] == 12
    log = [json.loads(line) for line in (home / "adapters" / "slow.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 12 and len({r["step"] for r in log}) == 12


def test_merge_plan_preview_and_save(trained, home):
    import gradio as gr

    rows, verdict, method = app.merge_plan(trained)
    assert rows and rows[-1][0] == "(all)" and "recommended method" in verdict and method in (
        "linear", "orthogonal", "ties")
    prompts = app.default_prompts(trained)
    assert prompts.splitlines() == ["sks and zwx", "sks", "zwx"]
    grid = app.merge_preview(trained, "linear", "1,0.5", "a red sks star\na blue zwx heart", "world-sd")
    assert [caption for _, caption in grid] == ["a red sks star", "a blue zwx heart"]
    assert not list((home / "merge-preview").glob("*.safetensors"))  # the scratch merge is gone
    note = app.merge_save(trained, "ties", "1,1", "both")
    assert "both.safetensors" in note and (home / "adapters" / "both.safetensors").is_file()
    assert "both" in {row[0] for row in app.library_view("merged")[1]}
    with pytest.raises(gr.Error, match="exists"):
        app.merge_save(trained, "ties", "1,1", "both")


def test_erase_tab_makes_an_eraser_previews_it_and_stacks_it_in_generate(home):
    import gradio as gr
    import numpy as np
    from PIL import Image

    assert app.erase_prompts("circle, ring") == "a circle\na ring"
    with pytest.raises(gr.Error, match="Name the concept"):
        app.erase_concept(" ", "uce", "", "world-sd", None, "")
    with pytest.raises(gr.Error, match="preserve list names"):
        app.erase_concept("circle", "uce", "circle", "world-sd", None, "")
    note, path = app.erase_concept("circle", "uce", "square", "world-sd", None, "../no circle",
                                   "a large red {} on a plain background, in the centre\n{} , small , top left")
    assert Path(path) == home / "adapters" / "no_circle.safetensors" and "uce eraser of circle" in note
    assert "no_circle" in {row[0] for row in app.library_view("eraser")[1]}
    # each eraser was a job of the UI's job system, in the library's jobs table, its view drawn like training's
    from studio.ui.erase import erase_view

    jobs = {row["name"]: row for row in app.library().jobs("erase")}
    assert {name: row["status"] for name, row in jobs.items()} == {"erase-circle": "failed", "no_circle": "done"}
    assert "preserve list names" in jobs["erase-circle"]["error"]
    assert erase_view(jobs["no_circle"]["id"]) == ("<div class='progress-wrap' data-status='done'><b>no_circle</b>: "
                                                   "done</div>",)
    grid = app.erase_preview(path, "a large red circle on a plain background, in the centre", "world-sd")
    assert [c for _, c in grid] == ["before: a large red circle on a plain background, in the centre",
                                    "after: a large red circle on a plain background, in the centre"]
    before, after = (np.asarray(Image.open(p), dtype=np.int16) for p, _ in grid)
    assert np.abs(before - after).mean() > 5  # the eraser changed the circle's image
    gallery, _, parameters = app.generate_images("a red circle", "", "world-sd", 1, 3, 4, 5.0, 64, 64, "",
                                                 *NO_IMAGE_PROMPT, *NO_CONTROL, *NO_STYLE, path, 1.0, True,
                                                 *[None, 1.0, True] * (app.SLOTS - 1))
    assert "<lora:no_circle:1>" in parameters


def test_blocks_build_with_every_tab():
    demo = app.build_app()
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Prompt", "Backbone", "Scheduler", "Images", "Parameters", "Adapter 1", "Training images (and .txt captions)",
            "Adapters to merge", "Concept to erase", "Before / after", "Search adapters", "History"} <= labels


def test_studio_serve_starts_the_ui_on_localhost(tmp_path):
    import os
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STUDIO_HOME=str(tmp_path / "home"), GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, server.stdout.read() if server.poll() is not None else "no answer in 90 s"
        assert "<title>studio</title>" in page or '"title":"studio"' in page.replace(" ", "")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_image_prompt_in_generate_goes_into_the_recipe_and_reuse_brings_it_back(home, tmp_path):
    import numpy as np
    from conftest import pixels
    from PIL import Image

    from studio.world.render import render, sample_labels

    reference = tmp_path / "ref.png"
    render(sample_labels(np.random.default_rng(3)), seed=3)[0].save(reference)
    gallery, recipes, parameters = app.generate_images("a green square", "", "world-sd", 1, 8, 4, 7.0, 64, 64, "",
                                                       str(reference), 0.7, "style", "", *empty_slots()[4:])
    assert "<lora:" not in parameters and 'ControlNet 0: "Module: ip-adapter, Model: world-sd' in parameters
    assert "Weight: 0.7, Routing: style" in parameters
    values = app.reuse_recipe(recipes[0])
    assert values[10:14] == [str(reference.resolve()), 0.7, "style", ""]
    again, _, _ = app.generate_images(*values)
    assert np.abs(pixels(Image.open(again[0][0])) - pixels(Image.open(gallery[0][0]))).max() <= 1
    plain, _, _ = app.generate_images("a green square", "", "world-sd", 1, 8, 4, 7.0, 64, 64, "", *empty_slots())
    assert np.abs(pixels(Image.open(plain[0][0])) - pixels(Image.open(gallery[0][0]))).mean() > 1


def test_style_image_in_generate_goes_into_the_recipe_and_reuse_brings_it_back(home, tmp_path):
    import numpy as np
    from conftest import pixels
    from PIL import Image

    from studio.world.render import render, sample_labels

    reference = tmp_path / "style.png"
    render(sample_labels(np.random.default_rng(5), background="stripes"), seed=5)[0].save(reference)
    settings = ["a blue square", "", "world-sd", 1, 8, 4, 7.0, 64, 64, ""]
    gallery, recipes, _ = app.generate_images(*settings, *NO_IMAGE_PROMPT, *NO_CONTROL, str(reference), 0.9,
                                              *[None, 1.0, True] * app.SLOTS)
    (style,) = json.loads(recipes[0])["adapters"]  # recorded as the API records it: kind, weight, reference, manifest
    assert (style["kind"], style["weight"], style["path"]) == ("style_injection", 0.9, None)
    assert style["inputs"]["image"] == str(reference.resolve()) and style["manifest"]["kind"] == "style_injection"
    values = app.reuse_recipe(recipes[0])
    assert values[20:22] == [str(reference.resolve()), 0.9] and values[22::3] == [None] * app.SLOTS
    again, _, _ = app.generate_images(*values)
    assert np.abs(pixels(Image.open(again[0][0])) - pixels(Image.open(gallery[0][0]))).max() <= 1
    plain, recipes, _ = app.generate_images(*settings, *empty_slots())
    assert json.loads(recipes[0])["adapters"] == []  # the injection is gone from the shared pipeline
    assert np.abs(pixels(Image.open(plain[0][0])) - pixels(Image.open(gallery[0][0]))).mean() > 5


def test_control_in_generate_previews_its_map_goes_into_the_recipe_and_reuse_brings_it_back(home, tmp_path):
    import numpy as np
    from conftest import pixels
    from PIL import Image

    from studio.world.render import render, sample_labels

    labels = sample_labels(np.random.default_rng(4), size="large", position="top left")
    image, mask = render(labels, seed=4)
    source = tmp_path / "scene.png"
    image.save(source)
    edges = np.asarray(app.preview_control(str(source), "canny"))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(np.asarray(app.preview_control(str(source), "")), np.asarray(image))
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    gallery, recipes, parameters = app.generate_images(
        "a red square on a plain background", "", "world-sd", 1, 8, 4, 7.0, 64, 64, "", *NO_IMAGE_PROMPT,
        str(mask_path), "controlnet", "", "none", 0.9, 0.8, *NO_STYLE, *[None, 1.0, True] * app.SLOTS)
    assert 'Module: none, Model: controlnet-world-sd' in parameters and "Weight: 0.9" in parameters
    assert "Guidance End: 0.8" in parameters and "<lora:" not in parameters
    values = app.reuse_recipe(recipes[0])
    assert values[14:20] == [str(mask_path.resolve()), "controlnet", values[16], "none", 0.9, 0.8]
    assert values[16].endswith("controlnet-world-sd")
    again, _, _ = app.generate_images(*values)
    assert np.abs(pixels(Image.open(again[0][0])) - pixels(Image.open(gallery[0][0]))).max() <= 1
    with pytest.raises(__import__("gradio").Error, match="all-black"):
        app.preview_control(str(_black(tmp_path)), "none")


def _black(tmp_path):
    from PIL import Image

    path = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(path)
    return path


def test_train_tab_trains_a_controlnet_into_the_library_and_generate_uses_its_folder(home, tmp_path):
    import numpy as np
    from PIL import Image

    from studio.world.folder import write_reference_folder

    refs = home / "refs"
    write_reference_folder(refs, n=3, seed=2)
    source, rows, _ = app.pick_server_folder(str(refs), "")
    job = app.start_training(source, rows, "edges", "controlnet", "world-sd", "", 2, 4, 1e-4, 0, "soft_edge")
    row = wait_for(job)
    assert row["status"] == "done", row["error"]
    path = Path(json.loads(row["result"])["path"])
    assert path == home / "adapters" / "edges" and (path / "config.json").is_file()
    entry = app.library().adapter(path)
    assert entry["kind"] == "controlnet" and entry["family"] == "sd1"
    assert str(path) not in {p for _, p in app.adapter_choices()}  # not a stack adapter: it needs a control image
    with pytest.raises(__import__("gradio").Error, match="exists already"):
        app.start_training(source, rows, "edges", "controlnet", "world-sd", "", 2, 4, 1e-4, 0, "soft_edge")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "blank.png")
    gallery, _, parameters = app.generate_images(
        "a red circle", "", "world-sd", 1, 1, 2, 7.0, 64, 64, "", *NO_IMAGE_PROMPT, str(refs / "000.png"),
        "controlnet", str(path), "", 1.0, 1.0, *NO_STYLE, *[None, 1.0, True] * app.SLOTS)
    assert 'Module: soft_edge, Model: edges' in parameters


def _png(path: Path, color: str = "red") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)
    return path


def test_caption_uploads_whose_cleaned_names_collide_are_both_kept(home, tmp_path):
    # `x y` and `x%y` both clean to `x_y`: each image keeps its own caption, uploaded in whatever order
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / "x%y.txt").write_text("a blue sks heart")
    (a / "x y.txt").write_text("a red sks star")
    files = [b / "x%y.txt", _png(a / "x y.png"), a / "x y.txt", _png(b / "x%y.png", "blue")]
    staged, rows, note = app.stage_uploads([str(f) for f in files], "sks")
    assert sorted(p.name for p in Path(staged).iterdir()) == ["x_y-1.png", "x_y-1.txt", "x_y.png", "x_y.txt"]
    assert sorted(rows) == [["x_y-1.png", "a red sks star"], ["x_y.png", "a blue sks heart"]]
    assert "x y.png as x_y-1.png" in note and "x y.txt as x_y-1.txt" in note
    # Start: a server folder's a.png and a.jpg (one a.txt) keep the captions edited in the table apart
    refs = home / "refs"
    refs.mkdir()
    _png(refs / "a.png"), _png(refs / "a.jpg", "blue")
    source, rows, _ = app.pick_server_folder(str(refs), "sks")
    rows = [[image, f"a {image} sks shape"] for image, _ in rows]
    job = app.start_training(source, rows, "pair", "lora", "world-sd", "sks", 1, 4, 1e-3, recipe=GENERIC)
    training = home / "training" / "pair"
    captions = {p.name: p.read_text().strip() for p in training.glob("*.txt")}
    images = {p.stem: p.suffix for p in training.iterdir() if p.suffix != ".txt"}
    assert {f"{stem}{images[stem]}": captions[f"{stem}.txt"] for stem in images} == {
        "a.jpg": "a a.jpg sks shape", "a-1.png": "a a.png sks shape"}
    assert wait_for(job)["status"] == "done"


def test_load_folder_reads_only_the_studio_home_and_the_working_directory(home, tmp_path, monkeypatch):
    import gradio as gr

    secret = tmp_path / "system"
    secret.mkdir()
    (secret / "passwords.conf").write_text("root:x")
    link = app.folder("link")
    link.rmdir(), link.symlink_to(secret)
    for outside in ("/etc", str(secret), str(link), str(home / "link" / ".."), str(home.parent)):
        with pytest.raises(gr.Error, match="outside the folders") as refused:
            app.pick_server_folder(outside)
        assert "passwords" not in str(refused.value) and "passwd" not in str(refused.value)
    with pytest.raises(gr.Error, match="not a folder"):
        app.pick_server_folder(str(home / "no such folder"))
    _png(home / "mine.png")
    source, rows, note = app.pick_server_folder(str(home), "sks")
    assert Path(source) == home.resolve() and rows == [["mine.png", "sks"]] and note == "1 images found."
    work = tmp_path / "work"
    (work / "refs").mkdir(parents=True)
    _png(work / "refs" / "cwd.png")
    monkeypatch.chdir(work)  # `studio serve` started in a project folder reads that folder's images
    assert app.pick_server_folder("refs", "sks")[1] == [["cwd.png", "sks"]]
    with pytest.raises(gr.Error, match="outside the folders"):
        app.pick_server_folder(str(home / ".." / "system"))


def test_generate_gallery_shows_whole_images():
    # one column per image, not one image stretched over the row: a 64 x 64 image in a square cell as wide as
    # the column is taller than the gallery, and its bottom (an object at the bottom right) scrolls out of sight
    import gradio as gr

    demo = app.build_app()
    gallery = next(b for b in demo.blocks.values() if isinstance(b, gr.Gallery) and b.label == "Images")
    assert gallery.object_fit == "contain" and gallery.fit_columns is False and gallery.columns >= 4


def _bomb(path: Path) -> Path:
    """A PNG of 8 x 8 pixels whose header declares 20000 x 20000 (400 MP): a decompression bomb."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC over type and data
    path.write_bytes(bytes(data))
    return path


def test_an_image_over_the_pixel_limit_is_refused_and_a_failed_upload_leaves_no_folder(home, tmp_path, monkeypatch):
    import gradio as gr

    good, bomb = _png(tmp_path / "good.png"), _bomb(tmp_path / "bomb.png")
    staged, rows, note = app.stage_uploads([str(good), str(bomb)], "sks")
    assert rows == [["good.png", "sks"]] and sorted(p.name for p in Path(staged).iterdir()) == ["good.png"]
    assert "bomb.png (over the 67 MP image limit)" in note
    assert list((home / "uploads").iterdir()) == [Path(staged)]  # nothing half-staged beside it
    copies = []

    def full_disk(source, target):
        if copies:
            raise OSError(28, "No space left on device")
        copies.append(target)
        return target.write_bytes(Path(source).read_bytes())

    second = _png(tmp_path / "second.png")
    with monkeypatch.context() as patch, pytest.raises(gr.Error):
        patch.setattr(shutil, "copyfile", full_disk)
        app.stage_uploads([str(good), str(second)], "sks")
    assert copies and list((home / "uploads").iterdir()) == [Path(staged)]
    staged, rows, note = app.stage_uploads([str(bomb)], "sks")  # nothing usable: no folder either
    assert (staged, rows) == ("", []) and "bomb.png (over the" in note
    assert len(list((home / "uploads").iterdir())) == 1


def test_train_merge_and_erase_never_replace_an_adapter_or_a_training_run(home):
    import gradio as gr

    adapters = app.folder("adapters")
    (adapters / "taken.safetensors").write_bytes(b"an adapter")
    (adapters / "edges").mkdir()  # a control model's folder
    (adapters / "run.log.jsonl").write_text("")  # a cancelled run of that name: its log and checkpoint
    (adapters / "run.checkpoint").mkdir()
    kept = _png(app.folder("training") / "run" / "000.png")  # and the images it trains on
    refs = home / "refs"
    refs.mkdir()
    _png(refs / "a.png")
    source, rows, _ = app.pick_server_folder(str(refs), "sks")
    for name in ("taken", "edges", "run"):
        with pytest.raises(gr.Error, match=f"named '{name}' exists already"):
            app.merge_save(["one.safetensors", "two.safetensors"], "linear", "", name)
        with pytest.raises(gr.Error, match=f"named '{name}' exists already"):
            app.erase_concept("circle", "uce", "", "world-sd", None, name)
        for kind in ("lora", "controlnet"):
            with pytest.raises(gr.Error, match=f"named '{name}' exists already"):
                app.start_training(source, rows, name, kind, "world-sd", "sks", 1, 4, 1e-3)
    assert kept.is_file()  # the cancelled run's images are kept for its Resume
    assert sorted(p.name for p in adapters.iterdir()) == ["edges", "run.checkpoint", "run.log.jsonl",
                                                           "taken.safetensors"]
    # a name the page makes up (an eraser's default) is made unique instead, as uploads and imports are
    (adapters / "erase-circle.safetensors").write_bytes(b"an eraser")
    note, path = app.erase_concept("circle", "uce", "", "world-sd", None, "")
    assert Path(path).name == "erase-circle-1.safetensors" and (adapters / "erase-circle.safetensors").read_bytes()
