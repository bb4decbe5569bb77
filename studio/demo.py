"""`studio demo`: the main job on the embedded default backbone, written as PNGs and an HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from studio.backbones import DEFAULT_BACKBONE

DEMO_PROMPTS = (
    "a red circle on a plain background, centre",
    "a blue square on a striped background, top left",
    "a green triangle on a dotted background, bottom right",
    "a yellow cross on a grid background, top right",
)
RANDOM_NOTE = (
    "{name} is a random-initialised tiny backbone: these images are structured noise, not pictures. "
    "They show the whole path (load, sample, save with a replayable recipe) working offline; "
    "the trained shapes-world backbone replaces it as the default when it lands."
)


def run_demo(out: Path, *, backbone: str | None = None, steps: int = 20, seed: int = 0,
             console: Any = None) -> Path:
    """Generate one image per demo prompt, save them with recipes, and write `out/index.html`."""
    from studio.pipelines import StudioPipeline

    name = backbone or DEFAULT_BACKBONE
    note = RANDOM_NOTE.format(name=name) if name.startswith("tiny-") else ""  # the tiny-* models are random
    if note and console is not None:
        console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    pipeline = StudioPipeline(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cards = []
    for i, prompt in enumerate(DEMO_PROMPTS):
        result = pipeline.generate(prompt, seed=seed + i, steps=steps)
        path = result.save(out / f"{i:02d}.png")[0]
        cards.append((path.name, result.recipe.parameters()))
        if console is not None:
            console.print(f"  {path}  [dim]{prompt}[/]", highlight=False)
    page = ["<!doctype html><meta charset=utf-8><title>studio demo</title>",
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:260px;margin:8px;"
            "vertical-align:top}img{width:256px;image-rendering:pixelated}figcaption{font-size:12px;"
            "white-space:pre-wrap}</style>",
            f"<h1>studio demo: {html.escape(name)}</h1>"]
    if note:
        page.append(f"<p><strong>Note:</strong> {html.escape(note)}</p>")
    page += [f'<figure><img src="{html.escape(file)}" alt=""><figcaption>{html.escape(params)}</figcaption></figure>'
             for file, params in cards]
    index = out / "index.html"
    index.write_text("\n".join(page) + "\n", encoding="utf-8")
    return index
