"""Prompt fidelity on the shapes world: prompted samples judged attribute by attribute."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from studio.concept_tokens import expand
from studio.world.captions import article, caption
from studio.world.evaluator import evaluate
from studio.world.render import sample_labels
from studio.world.vocab import ATTRIBUTES, Labels

BATCH = 16


def prompted_samples(pipe, expected: list[Labels], *, seed: int, steps: int, guidance: float,
                     scheduler=None, trigger: str | None = None,
                     on_prompts: Callable[[list[str]], Any] | None = None) -> list[Any]:
    """One image per expected label set, prompted by its caption; image i uses seed + i. `on_prompts`
    sees each batch's prompts before its call (prompt-dependent adapters, e.g. SPM's transport)."""
    if scheduler is not None:
        pipe.scheduler = scheduler
    images = []
    for i in range(0, len(expected), BATCH):
        prompts = [caption(e, trigger=trigger) for e in expected[i : i + BATCH]]
        if on_prompts is not None:
            on_prompts(prompts)
        images += _generate(pipe, prompts, seed + i, steps=steps, guidance=guidance)
    return images


def _generate(pipe, prompts: list[str], first_seed: int, *, steps: int, guidance: float) -> list[Any]:
    """One image per prompt (concept tokens expanded), prompt j seeded first_seed + j."""
    import torch

    from studio.backbones import t5_free_options

    generators = [torch.Generator().manual_seed(first_seed + j) for j in range(len(prompts))]
    return pipe([expand(pipe, p) for p in prompts], num_inference_steps=steps, guidance_scale=guidance,
                generator=generators, output_type="pil", **t5_free_options(pipe)).images


def fidelity(pipe, *, n: int = 200, seed: int = 1234, steps: int = 25, guidance: float = 6.0,
             held_out: bool = False, scheduler=None, trigger: str | None = None,
             on_prompts: Callable[[list[str]], Any] | None = None, **fixed: str) -> dict[str, Any]:
    """Accuracy per attribute of `n` samples prompted with random labels (base values unless
    `held_out`; `fixed` pins attributes, e.g. shape="star"; `trigger` names the shape "<trigger> <shape>")."""
    rng = np.random.default_rng(seed)
    expected = [sample_labels(rng, held_out=held_out, **fixed) for _ in range(n)]
    images = prompted_samples(pipe, expected, seed=seed, steps=steps, guidance=guidance, scheduler=scheduler,
                              trigger=trigger, on_prompts=on_prompts)
    metrics = evaluate(images, expected)
    metrics["images"] = images
    metrics["expected"] = [e.as_dict() for e in expected]
    return metrics


def short_prompt(colour: str, shape: str) -> str:
    """The shortest prompt a person types for a shape of a colour: "a red circle", "an orange ring"."""
    return article(f"{colour} {shape}")


def combinations(pipe, *, samples: int = 8, seed: int = 1234, steps: int = 25, guidance: float = 6.0,
                 scheduler=None, cells: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Every base colour x shape (or only `cells`, (colour, shape) pairs) prompted in its short form
    (`short_prompt`, nothing else named), `samples` images each: `cells[(colour, shape)]` the share the
    evaluator reads as both (the geometric reader's in `geometric_cells`), and the metrics of all images (for
    `write_report`), cell by cell in order."""
    from studio.world.vocab import COLOURS, base_values

    if scheduler is not None:
        pipe.scheduler = scheduler
    pairs = cells or [(c, s) for s in base_values("shape") for c in COLOURS]
    images, expected = [], []
    for k, (colour, shape) in enumerate(pairs):
        images += _generate(pipe, [short_prompt(colour, shape)] * samples, seed + 1000 * k, steps=steps,
                            guidance=guidance)
        expected += [{"shape": shape, "colour": colour}] * samples
    metrics = evaluate(images, expected)
    metrics["images"], metrics["expected"] = images, expected

    def rates(readings: list[dict[str, str]]) -> dict[tuple[str, str], float]:
        hits = [all(r[a] == e[a] for a in e) for r, e in zip(readings, expected, strict=True)]
        return {pair: sum(hits[k * samples:(k + 1) * samples]) / samples for k, pair in enumerate(pairs)}

    return {"cells": rates(metrics["predicted"]), "geometric_cells": rates(metrics["geometric"]["predicted"]),
            "metrics": metrics}


def write_report(metrics: dict[str, Any], out: Path, *, title: str, columns: int = 10) -> tuple[Path, Path]:
    """`out/fidelity.json` (accuracy per attribute by both instruments, per-image readings) and `out/fidelity.png`
    (a numbered grid: a red frame where the evaluator misreads an image, a blue tag where the geometric reader does)."""
    from PIL import Image, ImageDraw

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    second = metrics.get("geometric")
    report = {"title": title, "n": metrics["n"], "accuracy": metrics["accuracy"], "all_correct": metrics["all_correct"],
              "geometric": {k: second[k] for k in ("accuracy", "all_correct")} if second else None,
              "agreement": metrics.get("agreement"), "flagged": metrics.get("flagged"),
              "samples": [{"expected": e, "predicted": p, **({"geometric": g} if second else {})}
                          for e, p, g in zip(metrics["expected"], metrics["predicted"],
                                             second["predicted"] if second else metrics["predicted"], strict=True)]}
    json_path = out / "fidelity.json"
    json_path.write_text(json.dumps(report, indent=1))
    images = metrics["images"]
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * 66, rows * 78 + 20), "white")
    draw = ImageDraw.Draw(grid)
    from studio.world.evaluator import readings

    summary = "  ".join(f"{a} {readings(metrics, a)}" for a in ATTRIBUTES if a in metrics["accuracy"])
    draw.text((4, 4), f"{title}: {summary}", fill="black")
    for i, (image, sample) in enumerate(zip(images, report["samples"], strict=True)):
        x, y = (i % columns) * 66 + 1, (i // columns) * 78 + 33
        draw.text((x, y - 12), str(i), fill="black")  # numbered: fidelity.json's samples[i]
        grid.paste(image.resize((64, 64)), (x, y))
        if any(sample["predicted"][a] != v for a, v in sample["expected"].items()):
            draw.rectangle((x - 1, y - 1, x + 64, y + 64), outline="red")  # the evaluator misreads it
        if "geometric" in sample and any(sample["geometric"][a] != v for a, v in sample["expected"].items()):
            draw.rectangle((x + 44, y - 10, x + 62, y - 3), fill="blue")  # the geometric reader misreads it
    png_path = out / "fidelity.png"
    grid.save(png_path)
    return json_path, png_path
