"""The shapes world measured: prompt fidelity of both world backbones, the evaluator, sampling speed.

For each backbone, at studio's defaults for its family (steps, guidance, sampler), first every base
colour x shape in the short prompt a person types ("a blue square", nothing else named): the share of
`--samples` images (8) per cell that the evaluator reads as both, each cell's goal >= 0.75, with the
numbered grid of every image counted (`--grids`, default out/bench-world/<backbone>/combinations/
fidelity.png, eight images a cell, cells in the table's order). Then the evaluator on 2,000 fresh renders
with every value, raw and through the world VAE; then per backbone the accuracy per attribute on 200
prompts of base values, how often prompts naming a held-out shape or background produce it (near chance
is the goal: that is what customization must teach), and images per second at 25 steps in batches of 16.
Prints the tables; `--out` also writes the JSON.

    .venv/bin/python bench/world.py                  # ~20 min on 2 CPU cores
    .venv/bin/python bench/world.py --only combinations   # the colour x shape tables, ~8 min
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
from studio.world.fidelity import combinations, fidelity, prompted_samples, write_report
from studio.world.render import sample_labels
from studio.world.train import evaluator_accuracy, load_vae, vae_roundtrip
from studio.world.vocab import ATTRIBUTES, COLOURS, HELD_OUT, base_values

TARGETS = {"world-sd": {"shape": 0.90, "colour": 0.90, "background": 0.85, "position": 0.80},
           "world-dit": {a: 0.80 for a in ("shape", "colour", "background", "position", "size")}}
CELL_GOAL = 0.75  # each colour x shape in its short prompt


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


def combination_rows(name: str, samples: int, seed: int, grids: Path) -> dict:
    """Each base colour x shape in its short prompt: the evaluator's and the geometric reader's rate per cell,
    and the grid of every image counted."""
    backbone = load_backbone(name)
    family = backbone.family
    result = combinations(backbone.pipe, samples=samples, seed=seed, steps=family.steps, guidance=family.guidance,
                          scheduler=backbone.scheduler(family.scheduler))
    write_report(result["metrics"], grids / name / "combinations", title=f"{name}, short prompts",
                 columns=2 * samples)
    return {kind: {f"{c} {s}": v for (c, s), v in result[kind].items()} for kind in ("cells", "geometric_cells")}


def print_combinations(name: str, cells: dict, samples: int) -> None:
    low = [k for k, v in cells["cells"].items() if v < CELL_GOAL]
    print(f"\n{name}: short prompts ('a blue square'), {samples} samples per cell, evaluator / geometry; "
          f"'*' below {CELL_GOAL} ({len(low)} of {len(cells['cells'])} cells: {', '.join(low) or 'none'})")
    print(f"{'':<9}" + "".join(f"{c:>12}" for c in COLOURS))
    for shape in base_values("shape"):
        row = []
        for colour in COLOURS:
            key = f"{colour} {shape}"
            mark = "*" if cells["cells"][key] < CELL_GOAL else " "
            row.append(f"{cells['cells'][key]:.2f}/{cells['geometric_cells'][key]:.2f}{mark}".rjust(12))
        print(f"{shape:<9}" + "".join(row))


def evaluator_rows() -> dict:
    fresh = render_set(2000, seed=3, held_out=True)
    evaluator = load_evaluator()
    trips = vae_roundtrip(load_vae(), fresh["images"])
    return {name: evaluator_accuracy(evaluator, images, fresh["labels"], fresh["masks"])
            for name, images in (("fresh renders", fresh["images"]), ("VAE round trips", trips))}


def print_fidelity(result: dict, names: list[str], n: int, seed: int) -> None:
    """The prompt-fidelity, held-out and evaluator tables (filling `result`)."""
    result["evaluator"] = evaluator_rows()
    for name in names:
        result["backbones"][name] = backbone_rows(name, n, seed)

    print(f"\nPrompt fidelity, {n} prompted samples each (evaluator / geometry, '!' where they disagree on "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="world-sd,world-dit")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--samples", type=int, default=8, help="images per colour x shape cell")
    parser.add_argument("--grids", type=Path, default=Path("out/bench-world"))
    parser.add_argument("--only", choices=("combinations",), help="only the colour x shape tables")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = args.backbones.split(",")
    result = {"backbones": {}, "combinations": {}}
    for name in names:
        result["combinations"][name] = combination_rows(name, args.samples, args.seed, args.grids)
        print_combinations(name, result["combinations"][name], args.samples)
    if args.only != "combinations":
        print_fidelity(result, names, args.n, args.seed)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
