"""The web UI's latency in a real browser (Playwright + Chromium) on world-sd.

Time to first page (navigation until the Generate button is on screen, cold and warm), and time from
the Generate click to the first image on screen, beside the same generation through the Python API
(what the page adds: the queue, the PNG written with its recipe, the image sent to the browser).

    .venv/bin/python bench/ui.py              # ~1 min on 2 CPU cores
    .venv/bin/python bench/ui.py --runs 10
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a red circle, large, in the centre, on a plain background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chromium", default=os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    os.environ["STUDIO_HOME"] = tempfile.mkdtemp(prefix="studio-ui-bench-")
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="gradio-")
    import socket

    from playwright.sync_api import sync_playwright

    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    demo = app.serve(port=port, block=False)
    launch = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}"
    pages, clicks = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        for run in range(args.runs):
            context = browser.new_context(viewport={"width": 1366, "height": 800})
            page = context.new_page()
            page.set_default_timeout(120_000)
            t0 = time.perf_counter()
            page.goto(url)
            page.get_by_role("button", name="Generate", exact=True).wait_for()
            pages.append(time.perf_counter() - t0)
            page.get_by_label("Prompt", exact=True).fill(PROMPT)
            page.get_by_label("Seed").fill(str(run))
            t0 = time.perf_counter()
            page.get_by_role("button", name="Generate", exact=True).click()
            page.locator(".pixelated img").first.wait_for(state="visible")
            clicks.append(time.perf_counter() - t0)
            context.close()
        browser.close()
    demo.close()
    pipeline, _ = app.pipeline_for("world-sd")
    api = []
    for run in range(args.runs):
        t0 = time.perf_counter()
        pipeline.generate(PROMPT, seed=run)
        api.append(time.perf_counter() - t0)

    def cell(values: list[float]) -> str:
        rest = values[1:] or values
        return f"{values[0]:>8.2f} {statistics.median(rest):>12.2f}"

    print(f"\nweb UI on world-sd ({args.runs} runs, 2 CPU cores; server start {launch:.2f} s)")
    print(f"{'measure':<44} {'first':>8} {'median rest':>12}")
    print(f"{'page load to Generate button (s)':<44} {cell(pages)}")
    print(f"{'click to first image on screen (s)':<44} {cell(clicks)}")
    print(f"{'same generation through the Python API (s)':<44} {cell(api)}")


if __name__ == "__main__":
    main()
