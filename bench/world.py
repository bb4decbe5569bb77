"""The shapes world measured: prompt fidelity of both world backbones, the evaluator, sampling speed.

For each backbone, at studio's defaults for its family (steps, guidance, sampler): accuracy per
attribute on 200 prompts of base values, then how often prompts naming a held-out shape or
background produce it (near chance is the goal: that is what customization must teach), then
images per second at 25 steps in batches of 16. Then the evaluator on 2,000 fresh renders with every
value, raw and through the world VAE. Prints one table; `--out` also writes the JSON.

    .venv/bin/python bench/world.py                  # ~10 min on 2 CPU cores
    .venv/bin/python bench/world.py --n 48 --backbones world-dit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from studio.backbones import load_backbone
from studio.world.data import render_set
from studio.world.evaluator import load_evaluator, readings
from studio.world.fidelity import fidelity, prompted_samples
from studio.world.render import sample_labels
from studio.world.train import evaluator_accuracy, load_vae, vae_roundtrip
from studio.world.vocab import ATTRIBUTES, HELD_OUT

TARGETS = {"world-sd": {"shape": 0.90, "colour": 0.90, "background": 0.85, "position": 0.80},
           "world-dit": {a: 0.80 for a in ("shape", "colour", "background", "position", "size")}}


def backbone_rows(name: str, n: int, seed: int) -> dict:
    backbone = load_backbone(name)
    family = backbone.family
    settings = dict(steps=family.steps, guidance=family.guidance, scheduler=backbone.scheduler(family.scheduler))
    row = {"settings": f"{family.steps} steps, CFG {family.guidance}, {family.scheduler}"}
    base = fidelity(backbone.pipe, n=n, seed=seed, **settings)
    row["base"] = {a: readings(base, a) for a in ATTRIBUTES}
    row["base_accuracy"] = base["accuracy"]
    held = {}
    for attribute, values in HELD_OUT.items():
        for value in values:
            held[value] = readings(fidelity(backbone.pipe, n=max(16, n // 8), seed=seed, **settings,
                                            **{attribute: value}), attribute)
    row["held_out"] = held
    rng = np.random.default_rng(seed)
    labels = [sample_labels(rng) for _ in range(16)]
    prompted_samples(backbone.pipe, labels[:2], seed=seed, steps=2, guidance=settings["guidance"])  # warm-up
    start = time.perf_counter()
    prompted_samples(backbone.pipe, labels, seed=seed, steps=25, guidance=settings["guidance"],
                     scheduler=settings["scheduler"])
    row["images_per_s"] = 16 / (time.perf_counter() - start)
    return row


def evaluator_rows() -> dict:
    fresh = render_set(2000, seed=3, held_out=True)
    evaluator = load_evaluator()
    trips = vae_roundtrip(load_vae(), fresh["images"])
    return {name: evaluator_accuracy(evaluator, images, fresh["labels"], fresh["masks"])
            for name, images in (("fresh renders", fresh["images"]), ("VAE round trips", trips))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="world-sd,world-dit")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"backbones": {}, "evaluator": evaluator_rows()}
    for name in args.backbones.split(","):
        result["backbones"][name] = backbone_rows(name, args.n, args.seed)

    print(f"\nPrompt fidelity, {args.n} prompted samples each (evaluator / geometry, '!' where they disagree on "
          f"over 10% of the images; target in brackets, judged on the evaluator)")
    print(f"{'backbone':<10} " + " ".join(f"{a:>22}" for a in ATTRIBUTES) + "   img/s@25  settings")
    for name, row in result["backbones"].items():
        cells = []
        for attribute in ATTRIBUTES:
            target = TARGETS.get(name, {}).get(attribute)
            mark = "" if target is None else (" ok" if row["base_accuracy"][attribute] >= target else " LOW")
            cells.append(f"{row['base'][attribute]}{f' [{target:.2f}]' if target else ''}{mark}".rjust(22))
        print(f"{name:<10} " + " ".join(cells) + f"   {row['images_per_s']:8.2f}  {row['settings']}")
    print("\nHeld-out values named in the prompt: how often the image shows them (want near chance)")
    for name, row in result["backbones"].items():
        print(f"{name:<10} " + "  ".join(f"{v} {p}" for v, p in row["held_out"].items()))
    print("\nEvaluator on 2,000 fresh renders (held-out values included)")
    print(f"{'input':<16} " + " ".join(f"{a:>10}" for a in (*ATTRIBUTES, "mask_iou")))
    for name, acc in result["evaluator"].items():
        print(f"{name:<16} " + " ".join(f"{acc[a]:10.3f}" for a in (*ATTRIBUTES, "mask_iou")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
