"""The instruments checked: the evaluator and the geometric reader on the eye-labelled set of generated images
(assets/world/labelled) and on fresh renders, with the shape confusion of each.

Accuracy counts, per attribute, the entries whose label is known (shape "none" is a label; colour "none" and
background "unclear" are not counted). "agreed" is the same on the entries both labellers gave alike before a
third look. `--out DIR` writes DIR/<instrument>-wrong.png: a numbered grid of every image an instrument misreads,
captioned "file label>reading".

    .venv/bin/python bench/instruments.py                       # ~2 min on 2 CPU cores
    .venv/bin/python bench/instruments.py --evaluator out/world/evaluator --out out/instruments
    .venv/bin/python bench/instruments.py --evaluator out/world/evaluator --calibrate

`--calibrate` fits the decision thresholds on the set's calibration half (its even-numbered images) and
reports the test half (odd): the evaluator's `none_below`, the best of those that keep 2,000 fresh renders at
>= 0.99 (written into that evaluator's config.json), and the geometric reader's per-shape floors (printed,
for `studio.world.geometry.FLOORS`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from studio.world import geometry
from studio.world.data import labels_at, render_set
from studio.world.evaluator import OUTCOMES, load_evaluator, predict
from studio.world.labelled import ATTRIBUTES, check, halves, load_set
from studio.world.train import load_vae, vae_roundtrip
from studio.world.vocab import ATTRIBUTES as ALL_ATTRIBUTES

GOALS = {"shape": 0.95, "colour": 0.97, "background": 0.97}


def renders_rows(instruments: dict, n: int) -> dict:
    fresh = render_set(n, seed=3, held_out=True)
    trips = vae_roundtrip(load_vae(), fresh["images"])
    truth = [labels_at(fresh, i).as_dict() for i in range(n)]
    rows = {}
    for name, read in instruments.items():
        for kind, images in (("renders", fresh["images"]), ("VAE round trips", trips)):
            seen = read(list(images))
            rows[f"{name}, {kind}"] = {a: sum(p == t[a] for p, t in zip(seen[a], truth, strict=True)) / n
                                       for a in ALL_ATTRIBUTES}
    return rows


def wrong_grid(wrong: list[dict], folder: Path, out: Path) -> None:
    from PIL import Image, ImageDraw

    side, columns = 128, 8
    rows = max(1, (len(wrong) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * (side + 6), rows * (side + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, item in enumerate(wrong):
        x, y = (j % columns) * (side + 6), (j // columns) * (side + 30)
        bad = [a for a in ATTRIBUTES if item["read"][a] != item["labels"][a]]
        draw.text((x + 2, y + 2), f"{item['file']}", fill="black")
        draw.text((x + 2, y + 14), " ".join(f"{item['labels'][a]}>{item['read'][a]}" for a in bad)[:24], fill="red")
        with Image.open(folder / "images" / item["file"]) as image:
            sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x, y + 28))
    sheet.save(out)


def _sweep(score, start: float, values) -> float:
    """The value of `values` with the best score (the first of equals from `start` upwards)."""
    best, best_score = start, score(start)
    for value in values:
        if score(value) > best_score + 1e-9:
            best, best_score = value, score(value)
    return float(round(best, 2))


def calibrate(evaluator, folder: Path) -> None:
    import torch

    from studio.world.evaluator import images_to_tensor, shape_outcomes

    calibration, test = halves(load_set())
    names = evaluator.outcomes["shape"]

    def shape_probabilities(entries):
        with torch.no_grad():
            return evaluator(images_to_tensor([e.image() for e in entries]))["shape"].softmax(-1)

    def evaluator_accuracy(probabilities, entries, below):
        read = shape_outcomes(probabilities, names, below)
        return sum(r == e.labels["shape"] for r, e in zip(read, entries, strict=True)) / len(entries)

    fit, held = shape_probabilities(calibration), shape_probabilities(test)
    fresh = render_set(2000, seed=3, held_out=True)
    truth = [labels_at(fresh, i).shape for i in range(len(fresh["images"]))]
    with torch.no_grad():
        renders = torch.cat([evaluator(images_to_tensor(list(fresh["images"][i : i + 500])))["shape"].softmax(-1)
                             for i in range(0, len(truth), 500)])

    def on_renders(below):
        return np.mean([r == t for r, t in zip(shape_outcomes(renders, names, below), truth, strict=True)])

    # renders must stay >= 0.99: a threshold that calls clean renders "none" is not allowed
    allowed = [t for t in np.arange(0.0, 1.0, 0.01) if on_renders(t) >= 0.99]
    below = _sweep(lambda t: evaluator_accuracy(fit, calibration, t), 0.0, allowed)
    print(f"evaluator none_below={below} (renders {on_renders(below):.4f}): shape calibration "
          f"{evaluator_accuracy(fit, calibration, 0.0):.3f} -> {evaluator_accuracy(fit, calibration, below):.3f}, "
          f"test {evaluator_accuracy(held, test, 0.0):.3f} -> {evaluator_accuracy(held, test, below):.3f}")
    config = folder / "config.json"
    values = json.loads(config.read_text())
    values["none_below"] = below
    config.write_text(json.dumps(values, indent=2) + "\n")
    print(f"wrote none_below into {config}")

    raw = {id(e): geometry.read(e.image()) for e in (*calibration, *test)}

    def geometry_accuracy(entries, floors):
        return sum(geometry.decide(raw[id(e)], floors) == e.labels["shape"] for e in entries) / len(entries)

    floors = dict(geometry.FLOORS)
    for _ in range(3):  # coordinate ascent over the shapes' floors
        for shape in floors:
            floors[shape] = _sweep(lambda t, s=shape: geometry_accuracy(calibration, {**floors, s: t}), floors[shape],
                                   np.arange(0.5, 1.0, 0.01))
    print(f"geometry floors {floors}: shape calibration {geometry_accuracy(calibration, geometry.FLOORS):.3f} -> "
          f"{geometry_accuracy(calibration, floors):.3f}, test {geometry_accuracy(test, geometry.FLOORS):.3f} -> "
          f"{geometry_accuracy(test, floors):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evaluator", help="an evaluator folder (default: the shipped one)")
    parser.add_argument("--renders", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--calibrate", action="store_true", help="fit the thresholds on the calibration half")
    args = parser.parse_args()
    evaluator = load_evaluator(args.evaluator)
    if args.calibrate:
        from studio.world import ASSETS

        calibrate(evaluator, Path(args.evaluator) if args.evaluator else ASSETS / "evaluator")
        return
    instruments = {"evaluator": lambda images: predict(images, evaluator=evaluator), "geometry": geometry.predict}
    from studio.world.labelled import FOLDER

    results = {name: check(read) for name, read in instruments.items()}
    tests = {name: check(read, half="test") for name, read in instruments.items()}
    print(f"\nThe labelled set ({FOLDER}): accuracy per attribute (goal in brackets), all entries / agreed only / "
          f"test half (the thresholds are fitted on the other half)")
    print(f"{'instrument':<12} " + " ".join(f"{a + f' [{GOALS[a]:.2f}]':>24}" for a in ATTRIBUTES))
    for name, result in results.items():
        cells = [f"{result['accuracy'][a]:.3f} / {result['agreed'][a]:.3f} / {tests[name]['accuracy'][a]:.3f}"
                 for a in ATTRIBUTES]
        print(f"{name:<12} " + " ".join(f"{c:>24}" for c in cells) + f"   n={result['n']}")
    for name, result in results.items():
        print(f"\n{name}: shape confusion (rows: labels; columns: reading)")
        columns = OUTCOMES["shape"]
        print(f"{'':<9}" + "".join(f"{c[:7]:>8}" for c in columns))
        for truth in columns:
            row = result["confusion"].get(truth, {})
            if row:
                print(f"{truth:<9}" + "".join(f"{row.get(c, 0) or '.':>8}" for c in columns))
    rows = renders_rows(instruments, args.renders)
    print(f"\nFresh renders ({args.renders}, held-out values included)")
    print(f"{'input':<30} " + " ".join(f"{a:>10}" for a in ALL_ATTRIBUTES))
    for name, accuracy in rows.items():
        print(f"{name:<30} " + " ".join(f"{accuracy[a]:10.3f}" for a in ALL_ATTRIBUTES))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            wrong_grid(result["wrong"], FOLDER, args.out / f"{name}-wrong.png")
        (args.out / "instruments.json").write_text(json.dumps({"labelled": results, "renders": rows}, indent=1))


if __name__ == "__main__":
    main()
