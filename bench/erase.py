"""Erase concepts from world-sd with ESD, SPM and UCE, measured by the shapes-world evaluator.

Per method: erase a base shape and a base background pattern; P(concept | a prompt naming it) before
and after, and every other value of that attribute before and after (same seeds, so the pairs differ
only by the eraser). UCE also erases three shapes at once. Then prompts that do not mention the
concept: how far their images move from the base model's (pixel RMS on [0, 1], and the fraction whose
five evaluator labels all stay the same), for ESD, SPM with and without transport, and UCE.

    .venv/bin/python bench/erase.py                      # ~25 min on 2 CPU cores
    .venv/bin/python bench/erase.py --methods uce --n 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone
from studio.training.erasing import erase
from studio.training.trainer import parse_overrides
from studio.world.captions import BACKGROUND_WORDS, caption
from studio.world.evaluator import evaluate
from studio.world.fidelity import fidelity, prompted_samples
from studio.world.render import sample_labels
from studio.world.vocab import HELD_OUT, VALUES, Labels

BASE = {a: [v for v in VALUES[a] if v not in HELD_OUT.get(a, ())] for a in ("shape", "background")}
TEMPLATES = 24  # world captions per eraser (their contexts are what erasing and preserving see)
WORD = {"shape": lambda v: v, "background": lambda v: BACKGROUND_WORDS[v]}  # how captions name a value
# the erased values: base-model accuracy >= 0.85 on prompts naming them (README, the shapes world)
TASKS = {"shape": ("shape", ["triangle"]), "background": ("background", ["dots"]),
         "three shapes": ("shape", ["triangle", "cross", "ring"])}


def templates(attribute: str, count: int, seed: int) -> list[str]:
    """World captions with the `attribute`'s word replaced by {} (what users of this model write)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        labels = sample_labels(rng)
        text = caption(labels, template=i % 3)
        out.append(text.replace(WORD[attribute](getattr(labels, attribute)), "{}", 1))
    return out


def accuracies(backbone, attribute: str, values: list[str], *, n: int, seed: int, on_prompts=None) -> dict:
    """Evaluator accuracy of `attribute` over n prompts naming each value."""
    fam = backbone.family
    return {value: fidelity(backbone.pipe, n=n, seed=seed, steps=25, guidance=fam.guidance,
                            scheduler=backbone.scheduler(fam.scheduler), on_prompts=on_prompts,
                            **{attribute: value})["accuracy"][attribute] for value in values}


def unrelated(backbone, concepts: list[str], *, n: int, seed: int, on_prompts=None) -> dict:
    """n samples of random base labels that name none of `concepts`: images and predicted labels."""
    rng = np.random.default_rng(seed)
    expected: list[Labels] = []
    while len(expected) < n:
        labels = sample_labels(rng)
        if labels.shape not in concepts and labels.background not in concepts:
            expected.append(labels)
    fam = backbone.family
    images = prompted_samples(backbone.pipe, expected, seed=seed, steps=25, guidance=fam.guidance,
                              scheduler=backbone.scheduler(fam.scheduler), on_prompts=on_prompts)
    return {"images": images, "predicted": evaluate(images, expected)["predicted"]}


def drift(base, after) -> tuple[float, float]:
    """(pixel RMS on [0, 1], fraction with all five predicted labels unchanged) over paired samples."""
    rms = [float(np.sqrt(np.mean((np.asarray(a, dtype=np.float32) / 255 - np.asarray(b, dtype=np.float32) / 255) ** 2)))
           for a, b in zip(base["images"], after["images"], strict=True)]
    same = [p == q for p, q in zip(base["predicted"], after["predicted"], strict=True)]
    return float(np.mean(rms)), float(np.mean(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="world-sd")
    parser.add_argument("--methods", default="esd,spm,uce")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--n", type=int, default=32, help="prompted samples per value")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--out", type=Path, default=Path("out/bench-erase"))
    parser.add_argument("--skip-drift", action="store_true", help="no unrelated-prompt drift (for sweeps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an erase option for every method (repeatable), e.g. --set steps=400")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    pipeline = StudioPipeline(backbone)
    cached = args.out / f"base-{args.backbone}-{args.n}-{args.seed}.json"  # the base model's accuracies
    if cached.is_file():
        base = json.loads(cached.read_text())
    else:
        base = {a: accuracies(backbone, a, BASE[a], n=args.n, seed=args.seed) for a in ("shape", "background")}
        cached.write_text(json.dumps(base))
    print("base", json.dumps(base), flush=True)
    # the base model's images of prompts that do not name the shape task's concepts (made once)
    reference = unrelated(backbone, TASKS["shape"][1], n=2 * args.n, seed=args.seed + 5) if not args.skip_drift else None
    rows, drifts = [], []
    for method in args.methods.split(","):
        for task in args.tasks.split(","):
            attribute, concepts = TASKS[task]
            if len(concepts) > 1 and method != "uce":
                continue  # ESD and SPM erase one concept per adapter
            words = [WORD[attribute](c) for c in concepts]
            preserve = [WORD[attribute](v) for v in BASE[attribute] if v not in concepts]
            started = time.perf_counter()
            eraser = erase(words if len(words) > 1 else words[0], method=method, backbone=backbone,
                           preserve=preserve, templates=templates(attribute, TEMPLATES, args.seed + 7),
                           name=f"{method}-{task}", **overrides)
            seconds = time.perf_counter() - started
            eraser.save(args.out / f"{method}-{task.replace(' ', '-')}.safetensors", overwrite=True)
            pipeline.attach(eraser)
            prepare = (lambda prompts, e=eraser: e.prepare(backbone, prompts)) if eraser.config.transport else None
            after = accuracies(backbone, attribute, BASE[attribute], n=args.n, seed=args.seed, on_prompts=prepare)
            eraser.release()
            erased = [base[attribute][c] for c in concepts], [after[c] for c in concepts]
            others = {v: (after[v] - base[attribute][v]) * 100 for v in BASE[attribute] if v not in concepts}
            rows.append({"method": method, "task": task, "concepts": concepts, "before": erased[0], "after": erased[1],
                         "others": others, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
            if task == "shape" and reference is not None:
                for transport in ([True, False] if eraser.config.transport else [None]):
                    moved = unrelated(backbone, concepts, n=2 * args.n, seed=args.seed + 5,
                                      on_prompts=prepare if transport else None)
                    eraser.release()
                    label = method + {True: " (transport)", False: " (no transport)"}.get(transport, "")
                    drifts.append((label, *drift(reference, moved)))
                    print("drift", drifts[-1], flush=True)
            pipeline.detach(eraser)
    print(f"\n{args.backbone}: P(concept | prompt naming it) before -> after, and the largest change of the other "
          f"values; {args.n} prompted samples per value, same seeds before and after")
    print(f"{'method':<6} {'task':<14} {'concept':<24} {'before':>8} {'after':>8} {'others: worst change':>22} "
          f"{'mean |change|':>14} {'make s':>7}")
    for r in rows:
        worst = min(r["others"].values(), key=lambda d: (d > 0, -abs(d)))
        mean = np.mean([abs(d) for d in r["others"].values()])
        print(f"{r['method']:<6} {r['task']:<14} {','.join(r['concepts']):<24} "
              f"{'/'.join(f'{b:.2f}' for b in r['before']):>8} {'/'.join(f'{a:.2f}' for a in r['after']):>8} "
              f"{worst:>+21.1f}p {mean:>13.1f}p {r['seconds']:>7.0f}")
    print(f"\nPrompts that do not name the erased shape ({args.n * 2} samples): distance from the base model's images")
    print(f"{'eraser':<22} {'pixel RMS':>10} {'labels unchanged':>17}")
    for label, rms, same in drifts:
        print(f"{label:<22} {rms:>10.4f} {same:>17.2f}")
    (args.out / "erase.json").write_text(json.dumps({"base": base, "rows": rows, "drift": drifts}, indent=1))


if __name__ == "__main__":
    main()
