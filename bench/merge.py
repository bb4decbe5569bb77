"""Merging adapters trained apart, measured by the shapes-world evaluator.

Two held-out shapes (star, heart) are each taught from 12 renders with bench/customize.py's recipe,
once as standard LoRAs and once as orthogonal adapters (concept seeds 0 and 1), plus a style adapter
for a held-out background (checker). Then:
1. each shape pair merged with every method: each concept's accuracy when prompted alone, merged
   vs single adapter (the orthogonal sum should keep >= 90 %), with the interference plan's score;
2. content + style in one prompt ("a red sks star on a checker background"): both attributes'
   accuracy for the content adapter alone, the style adapter alone, and the merges (learned: weights
   searched on 5 renders of that combination).

    .venv/bin/python bench/merge.py              # ~45 min on 2 CPU cores
    .venv/bin/python bench/merge.py --n 48 --methods linear,orthogonal
    .venv/bin/python bench/merge.py --skip-pairs   # only the content + style part (~25 min)
    # the paper's recipe (concept tokens, weights at a lower rate): the orthogonal sum keeps >= 90 %
    .venv/bin/python bench/merge.py --n 96 --methods linear,orthogonal --skip-style --set tokens=2 \
        --set lr=3e-3 --set token_lr=1e-2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from customize import COMMON, REG_IMAGES, SETTINGS, measure
from studio.pipelines import StudioPipeline

import studio
from studio.backbones import load_backbone
from studio.training.trainer import TrainConfig, parse_overrides, train
from studio.world.folder import write_reference_folder

SHAPES = ("star", "heart")
TRIGGERS = {"star": "sks", "heart": "zwx"}  # one trigger word per concept, as users name their adapters
STYLE = "checker"
METHODS = ("linear", "svd", "ties", "dare_ties", "orthogonal")


def train_adapter(folder: Path, reg: Path, out: Path, kind: str, concept_seed: int, trigger: str,
                  overrides: dict[str, Any] | None = None) -> Path:
    if out.exists():
        return out
    ranks = {k: SETTINGS["orthogonal-sd"][k] for k in ("rank", "alpha")} if kind == "orthogonal" else {}
    options = {**COMMON, **ranks, "trigger": trigger, **(overrides or {})}
    if not trigger:  # the style adapter has no trigger to anchor or learn as tokens
        for key in ("anchor_weight", "tokens", "token_lr"):
            options.pop(key, None)
    config = TrainConfig(folder=str(folder), out=str(out), reg_folder=str(reg), backbone="world-sd", kind=kind,
                         concept_seed=concept_seed, **options)
    return train(config, log=lambda line: None)


def accuracy(pipeline: StudioPipeline, adapters: list[tuple[Path | object, float]], *, n: int, seed: int,
             attributes: tuple[str, ...], trigger: str = "sks", **fixed: str) -> dict[str, Any]:
    for adapter, weight in adapters:
        pipeline.attach(adapter, weight)
    try:
        metrics = measure(pipeline.backbone, n=n, seed=seed, trigger=trigger, attributes=attributes, **fixed)
    finally:
        pipeline.detach()
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="prompted samples per cell")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("out/bench-merge"))
    parser.add_argument("--skip-style", action="store_true", help="only the two shapes (no content + style part)")
    parser.add_argument("--skip-pairs", action="store_true", help="only the content + style part")
    parser.add_argument("--kinds", default="lora,orthogonal", help="adapter kinds to train and merge")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option of the recipe (repeatable), e.g. --set anchor_weight=0")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    kinds = args.kinds.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp())
    reg = data / "reg"
    write_reference_folder(reg, n=REG_IMAGES, seed=8)
    adapters: dict[str, Path] = {}
    started = time.perf_counter()
    for i, shape in enumerate(SHAPES):
        folder = data / shape
        write_reference_folder(folder, n=12, seed=7 + i, shape=shape, trigger=TRIGGERS[shape], masks=True)
        for kind in kinds:
            adapters[f"{kind}-{shape}"] = train_adapter(folder, reg, args.out / f"{kind}-{shape}.safetensors", kind,
                                                        concept_seed=i, trigger=TRIGGERS[shape], overrides=overrides)
    style = data / STYLE
    write_reference_folder(style, n=12, seed=9, background=STYLE)
    for kind in () if args.skip_style else kinds:
        adapters[f"{kind}-{STYLE}"] = train_adapter(style, reg, args.out / f"{kind}-{STYLE}.safetensors", kind,
                                                    concept_seed=2, trigger="", overrides=overrides)
    print(f"adapters trained in {time.perf_counter() - started:.0f} s", flush=True)

    backbone = load_backbone("world-sd")
    pipeline = StudioPipeline(backbone)
    rows = []
    methods = args.methods.split(",")
    for kind in () if args.skip_pairs else kinds:
        pair = [adapters[f"{kind}-{s}"] for s in SHAPES]
        score = studio.merge.plan(pair).score
        single = {s: accuracy(pipeline, [(p, 1.0)], n=args.n, seed=args.seed, attributes=("shape",), shape=s,
                              trigger=TRIGGERS[s])["shape"] for s, p in zip(SHAPES, pair, strict=True)}
        # leak: how often each adapter alone draws its own shape when prompted with the other concept
        # (its trigger and shape word); what leaks here competes in every merge, orthogonal or not
        leak = {}
        for s, p in zip(SHAPES, pair, strict=True):
            other = next(o for o in SHAPES if o != s)
            drawn = accuracy(pipeline, [(p, 1.0)], n=args.n, seed=args.seed, attributes=("shape",), shape=other,
                             trigger=TRIGGERS[other])["drawn"]
            leak[f"leak_{s}"] = drawn.count(s) / len(drawn)
        rows.append({"pair": kind, "method": "single", "score": score, **single, **leak})
        print(json.dumps(rows[-1]), flush=True)
        for method in methods:
            try:
                merged = studio.merge(pair, method=method).adapter
            except studio.StudioError as error:
                rows.append({"pair": kind, "method": method, "score": score, "refused": str(error)[:60]})
                continue
            cell = {s: accuracy(pipeline, [(merged, 1.0)], n=args.n, seed=args.seed, attributes=("shape",),
                                shape=s, trigger=TRIGGERS[s])["shape"] for s in SHAPES}
            rows.append({"pair": kind, "method": method, "score": score, **cell,
                         **{f"kept_{s}": cell[s] / max(single[s], 1e-9) for s in SHAPES}})
            print(json.dumps(rows[-1]), flush=True)

    combined = []
    both = dict(attributes=("shape", "background"), shape="star", background=STYLE)
    reference = data / "combination"
    write_reference_folder(reference, n=5, seed=11, shape="star", background=STYLE, trigger="sks")
    for kind in () if args.skip_style else kinds:
        content, look = adapters[f"{kind}-star"], adapters[f"{kind}-{STYLE}"]
        cells = {"content only": [(content, 1.0)], "style only": [(look, 1.0)]}
        for method in ("linear", "ties", "orthogonal"):
            try:
                cells[method] = [(studio.merge([content, look], method=method).adapter, 1.0)]
            except studio.StudioError:
                continue
        learned = studio.merge([content, look], method="learned", reference=reference, backbone=backbone)
        cells["learned (" + ", ".join(f"{w:.2f}" for w in learned.adapter.config.merge["parameters"]["weights"]) + ")"] = [
            (learned.adapter, 1.0)]
        for label, stack in cells.items():
            result = accuracy(pipeline, stack, n=args.n, seed=args.seed + 7, **both)
            result.pop("drawn")
            combined.append({"kind": kind, "adapters": label, **result})
            print(json.dumps(combined[-1]), flush=True)

    print(f"\nTwo shapes taught apart ({args.n} prompted samples per cell, evaluator shape accuracy)")
    print(f"{'adapters':<11} {'method':<11} {'plan score':>10} {'star':>6} {'heart':>6} {'kept star':>10} {'kept heart':>11}"
          f"  (single: leak = the adapter's own shape drawn on the other concept's prompts)")
    for r in rows:
        if "refused" in r:
            print(f"{r['pair']:<11} {r['method']:<11} {r['score']:>10.3f}   refused: {r['refused']}")
            continue
        kept = (f"{r['kept_star']:>10.0%} {r['kept_heart']:>11.0%}" if "kept_star" in r else
                f"  leak star {r['leak_star']:.3f}, heart {r['leak_heart']:.3f}")
        print(f"{r['pair']:<11} {r['method']:<11} {r['score']:>10.3f} {r['star']:>6.3f} {r['heart']:>6.3f} {kept}")
    print(f"\nContent (sks star) + style ({STYLE} background) in one prompt")
    print(f"{'adapters':<11} {'stack':<28} {'star':>6} {'checker':>8} {'both':>6}")
    for r in combined:
        print(f"{r['kind']:<11} {r['adapters']:<28} {r['shape']:>6.3f} {r['background']:>8.3f} {r['all']:>6.3f}")
    (args.out / ("merge-style.json" if args.skip_pairs else "merge.json")).write_text(json.dumps({"pairs": rows, "combined": combined}, indent=1))


if __name__ == "__main__":
    main()
