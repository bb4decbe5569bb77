"""The web UI in a real browser: Playwright drives Debian's Chromium (installed by `make test`) against
the app served on 127.0.0.1. Generate an image; two users at once; an image prompt routed to the style layers; train a tiny adapter on uploaded
images and watch it reach the end and appear in the library; stack it in Generate; merge two adapters.
Each test saves a screenshot under out/screenshots/."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

SHOTS = Path(os.environ.get("STUDIO_SCREENSHOTS", ROOT / "out" / "screenshots"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT = 120_000  # ms: a 2-core CI machine, the first generation loads world-sd


def chromium_path() -> str:
    path = os.environ.get("STUDIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"Chromium is not installed at {path}: `make test` installs it (make browser), or set "
                    f"STUDIO_CHROMIUM to a Chromium binary.")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("STUDIO_HOME", "GRADIO_TEMP_DIR")}
    os.environ["STUDIO_HOME"] = str(tmp_path_factory.mktemp("ui-home"))
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-tmp"))
    port = free_port()
    demo = app.serve(port=port, block=False)
    assert demo.server_name == "127.0.0.1" and demo.max_file_size == 50 * 1024**2  # local only; uploads capped
    yield f"http://127.0.0.1:{port}"
    demo.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1366, "height": 800})  # a laptop screen
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(server)
    page.get_by_role("button", name="Generate", exact=True).wait_for()
    yield page
    context.close()


@pytest.fixture(scope="module")
def adapters(server, tmp_path_factory):
    """Two tiny adapters trained through the Train tab's handlers (the browser test trains its own)."""
    from test_app import wait_for

    from studio.home import studio_home
    from studio.world.folder import write_reference_folder

    paths = {}
    for shape, word in (("star", "sks"), ("heart", "zwx")):
        refs = studio_home() / f"refs-{shape}"  # the Train tab reads folders in the studio home or the working one
        write_reference_folder(refs, n=3, seed=1, shape=shape, trigger=word)
        source, rows, _ = app.pick_server_folder(str(refs), word)
        row = wait_for(app.start_training(source, rows, f"ui-{shape}", "lora", "world-sd", word, 3, 4, 1e-3,
                                          recipe="any/lora"))
        assert row["status"] == "done", row["error"]
        paths[shape] = row
    return paths


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def generate(page, prompt: str) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate", exact=True).click()


def gallery_image(page):
    return page.locator(".pixelated img").first


def test_generate_an_image(page):
    generate(page, "a red circle, large, in the centre, on a plain background")
    gallery_image(page).wait_for(state="visible")
    parameters = page.locator("label:has-text('Parameters') textarea")  # its label also holds a copy button
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('Steps: 25'))")
    assert parameters.input_value().startswith("a red circle") and "Seed: " in parameters.input_value()
    assert shot(page, "generate").is_file()
    page.get_by_label("Width", exact=True).fill("60")  # bad input: a message in the page, not a traceback
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("must be a positive multiple of").first.wait_for()
    assert "Traceback" not in page.content()
    shot(page, "generate-error")


def test_two_users_generating_at_once_both_get_their_images(browser, server):
    pages = []
    for prompt in ("a blue square", "a green triangle"):
        context = browser.new_context(viewport={"width": 1366, "height": 800})
        p = context.new_page()
        p.set_default_timeout(TIMEOUT)
        p.goto(server)
        p.get_by_label("Prompt", exact=True).fill(prompt)
        pages.append(p)
    for p in pages:
        p.get_by_role("button", name="Generate", exact=True).click()
    for p, word in zip(pages, ("blue square", "green triangle"), strict=True):
        gallery_image(p).wait_for(state="visible")
        p.wait_for_function(f"() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('{word}'))")
    shot(pages[1], "two-users")
    for p in pages:
        p.context.close()


def test_train_on_uploaded_images_and_find_it_in_the_library(page, tmp_path):
    from studio.world.folder import write_reference_folder

    images = write_reference_folder(tmp_path / "up", n=3, seed=4, shape="star", trigger="sks")
    page.get_by_role("tab", name="Train").click()
    page.locator("input[type=file]").first.set_input_files([str(p) for p in images])
    page.get_by_text("3 images ready").wait_for()
    page.get_by_label("Adapter name").fill("browser-star")
    steps = page.get_by_label("Steps", exact=True).locator("visible=true").first
    steps.fill("8")
    steps.press("Tab")
    page.get_by_role("button", name="Start", exact=True).click()
    page.locator("[data-status='running']").wait_for()
    page.reload()  # the job goes on in the server; the reloaded page finds it in the library
    page.get_by_role("tab", name="Train").click()  # at once: the live view must not wait for the tab's event
    # the job's own time (caching, 8 steps, 4 sample sheets) on a loaded 2-core machine, beyond a page's wait
    page.locator("[data-status='done']").wait_for(timeout=3 * TIMEOUT)
    assert "browser-star: done: step 8 of 8" in page.locator(".progress-wrap").inner_text()
    shot(page, "train")
    page.get_by_role("tab", name="Library").click()
    page.get_by_text("browser-star").locator("visible=true").first.wait_for()
    shot(page, "library")


def test_stack_an_adapter_in_generate(page, adapters):
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("tab", name="Generate").click()  # selecting the tab refreshes the adapter pickers
    page.get_by_text("Adapters", exact=True).click()  # the stack's accordion starts closed
    page.get_by_label("Adapter 1").click()
    page.get_by_role("option", name="ui-star (lora, sd1)").click()
    generate(page, "a red sks star")
    gallery_image(page).wait_for(state="visible")
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('<lora:ui-star:1>'))")
    shot(page, "stack")


def test_merge_two_adapters(page, adapters):
    page.get_by_role("tab", name="Merge").click()
    picker = page.get_by_label("Adapters to merge")
    for name in ("ui-star (lora, sd1)", "ui-heart (lora, sd1)"):
        picker.click()
        page.get_by_role("option", name=name).click()
    page.get_by_role("button", name="Show interference plan").click()
    page.get_by_text("recommended method").wait_for()
    page.get_by_role("button", name="Preview", exact=True).click()  # the test prompts, merged, before saving
    page.locator(".pixelated img >> visible=true").nth(2).wait_for()  # one image per default test prompt
    page.get_by_label("Merged adapter name").fill("star-and-heart")
    page.get_by_role("button", name="Save merge").click()
    page.get_by_text("Saved star-and-heart.safetensors").wait_for()
    assert (Path(os.environ["STUDIO_HOME"]) / "adapters" / "star-and-heart.safetensors").is_file()
    shot(page, "merge")


def test_erase_a_shape_preview_and_stack_the_eraser(page):
    page.get_by_role("tab", name="Erase").click()
    page.get_by_label("Concept to erase").fill("circle")
    page.get_by_label("Keep these (comma-separated)").fill("square")
    page.get_by_label("Eraser name").fill("no-circle")
    page.get_by_label("Prompts naming the concept (optional)").fill(
        "a large red {} on a plain background, in the centre\na small blue {} on a striped background, top left")
    page.get_by_role("button", name="Erase", exact=True).click()  # UCE, the default: closed form
    page.get_by_text("Saved no-circle.safetensors").wait_for()
    page.get_by_label("Test prompts (one per line)").fill("a large red circle on a plain background, in the centre")
    page.get_by_role("button", name="Preview before / after").click()
    page.locator(".pixelated img >> visible=true").nth(1).wait_for()  # before and after
    shot(page, "erase")
    page.get_by_role("tab", name="Generate").click()  # the eraser is in the stack's choices
    page.get_by_text("Adapters", exact=True).click()
    page.get_by_label("Adapter 1").click()
    page.get_by_role("option", name="no-circle (erase, sd1)").click()
    generate(page, "a large red circle on a plain background, in the centre")
    gallery_image(page).wait_for(state="visible")
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('<lora:no-circle:1>'))")


def test_image_prompt_with_style_routing(page, tmp_path):
    import numpy as np

    from studio.world.render import render, sample_labels

    reference = tmp_path / "reference.png"
    render(sample_labels(np.random.default_rng(5), background="stripes"), seed=5)[0].save(reference)
    page.get_by_text("Image prompt (IP-Adapter)", exact=True).click()  # the accordion starts closed
    page.locator("input[type=file]").first.set_input_files(str(reference))
    page.get_by_label("style only").check()
    generate(page, "a blue square")
    gallery_image(page).wait_for(state="visible")
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('Routing: style'))")
    shot(page, "image-prompt")


def test_control_image_with_preprocessor_preview(page, tmp_path):
    import numpy as np

    from studio.world.render import render, sample_labels

    scene = tmp_path / "scene.png"
    render(sample_labels(np.random.default_rng(6), size="large", background="plain"), seed=6)[0].save(scene)
    page.get_by_text("Control (ControlNet / T2I-Adapter)", exact=True).click()  # the accordion starts closed
    page.locator(".block", has_text="Control image").locator("input[type=file]").set_input_files(str(scene))
    page.get_by_label("Preprocessor").click()
    page.get_by_role("option", name="object mask").click()
    # the map appears beside the image (the mask preprocessor's white object on black) before any generation
    page.locator(".block", has_text="Control map (what the model reads)").locator("img").first.wait_for(state="visible")
    generate(page, "a blue square on a plain background")
    gallery_image(page).wait_for(state="visible")
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('Module: mask'))")
    shot(page, "control")
