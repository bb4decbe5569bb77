"""`studio demo`: the main job on the embedded default backbone, written as PNGs and an HTML page
with the evaluator's reading of every image."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from studio.backbones import DEFAULT_BACKBONE
from studio.world.captions import caption
from studio.world.vocab import ATTRIBUTES, Labels

DEMO_LABELS = tuple(
    Labels(shape=s, colour=c, background=b, position=p, size=z) for s, c, b, p, z in (
        ("circle", "red", "plain", "centre", "large"),
        ("square", "blue", "stripes", "top left", "large"),
        ("triangle", "green", "dots", "bottom right", "large"),
        ("cross", "yellow", "grid", "top right", "large"),
        ("diamond", "purple", "gradient", "bottom left", "large"),
        ("ring", "orange", "plain", "centre", "small"),
        ("circle", "cyan", "grid", "top left", "small"),
        ("square", "pink", "dots", "bottom right", "large"),
    )
)
RANDOM_NOTE = (
    "{name} is a random-initialised tiny backbone: these images are structured noise, not pictures. "
    "They show the whole path (load, sample, save with a replayable recipe) working offline."
)


def _scores(images: list[Any]) -> list[dict[str, str]] | None:
    """The evaluator's reading of each image, or None when no evaluator is installed."""
    from studio.errors import StudioError
    from studio.world.evaluator import predict

    try:
        predicted = predict(images)
    except StudioError:
        return None
    return [{a: predicted[a][i] for a in ATTRIBUTES} for i in range(len(images))]


def run_demo(out: Path, *, backbone: str | None = None, steps: int = 25, seed: int = 0,
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
    cards, images = [], []
    for i, labels in enumerate(DEMO_LABELS):
        result = pipeline.generate(caption(labels), seed=seed + i, steps=steps)
        path = result.save(out / f"{i:02d}.png")[0]
        images.append(result.images[0])
        cards.append((path.name, labels, result.recipe.parameters()))
        if console is not None:
            console.print(f"  {path}  [dim]{caption(labels)}[/]", highlight=False)
    scores = _scores(images)
    page = ["<!doctype html><meta charset=utf-8><title>studio demo</title>",
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:270px;margin:8px;"
            "vertical-align:top}img{width:256px;image-rendering:pixelated}figcaption{font-size:12px}"
            ".ok{color:#080}.no{color:#b00}pre{white-space:pre-wrap;color:#555}</style>",
            f"<h1>studio demo: {html.escape(name)}</h1>"]
    if note:
        page.append(f"<p><strong>Note:</strong> {html.escape(note)}</p>")
    if scores:
        right = sum(scores[i][a] == getattr(lab, a) for i, (_, lab, _) in enumerate(cards) for a in ATTRIBUTES)
        summary = f"evaluator: {right} of {len(cards) * len(ATTRIBUTES)} attributes as prompted"
        page.append(f"<p>{summary}</p>")
        if console is not None:
            console.print(summary)
    for i, (file, labels, params) in enumerate(cards):
        rows = ""
        if scores:
            rows = "<br>".join(
                f'<span class="{"ok" if scores[i][a] == getattr(labels, a) else "no"}">{a}: {html.escape(scores[i][a])}'
                f"{'' if scores[i][a] == getattr(labels, a) else ' (asked ' + html.escape(getattr(labels, a)) + ')'}"
                "</span>" for a in ATTRIBUTES)
        page.append(f'<figure><img src="{html.escape(file)}" alt=""><figcaption><b>{html.escape(caption(labels))}'
                    f"</b><br>{rows}<pre>{html.escape(params)}</pre></figcaption></figure>")
    index = out / "index.html"
    index.write_text("\n".join(page) + "\n", encoding="utf-8")
    return index
