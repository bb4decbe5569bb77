"""Teach a held-out shape from 12 renders with the defaults a user gets, measured by both shapes-world readers.

For each setting (LoRA and orthogonal LoRA on world-sd, LoRA on world-dit) and each held-out shape (star,
heart, moon): render 12 images of the shape with the trigger word "sks" (and their masks), as the README's
teach-a-shape flow does, train with the shipped recipe for the backbone and kind and nothing else set (what
`studio train refs/ --kind K --backbone B` runs: the recipe draws its class images with the backbone itself),
then prompt with the trigger and count how often the shape is drawn (before: the base model, near 0), and
check that prompts of base shapes keep their accuracy (drop <= 5 points). `--merge` sums every pair of the
orthogonal adapters (`studio merge --method orthogonal`) and measures each concept through the sum against
its adapter alone. Then the time per step of studio's trainer beside a plain diffusers + PEFT loop on the same
model, data, rank and batch (the loop diffusers' train_dreambooth_lora script runs: VAE and text encoder every
step, no cache). Every cell's images are written as numbered grids under --out (fidelity.png).

    .venv/bin/python bench/customize.py                          # ~75 min on 2 CPU cores
    .venv/bin/python bench/customize.py --settings lora-sd --shapes star --n 48
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from studio.backbones import load_backbone
from studio.training.trainer import TrainConfig, parse_overrides, train
from studio.world.evaluator import readings
from studio.world.fidelity import fidelity, write_report
from studio.world.folder import write_reference_folder

SETTINGS = {
    "lora-sd": dict(backbone="world-sd", kind="lora"),
    "orthogonal-sd": dict(backbone="world-sd", kind="orthogonal"),
    "lora-dit": dict(backbone="world-dit", kind="lora"),
}
TRIGGER = "sks"


def measure(backbone, *, n: int, seed: int, trigger: str | None, attributes: tuple[str, ...] = ("shape",),
            grid: Path | None = None, **fixed: str | None) -> dict[str, Any]:
    """Evaluator accuracy of `attributes` over `n` prompted samples at the family's defaults, "all": the
    fraction with every one of them right, and "drawn": the shape the evaluator saw in each sample; `grid`: a
    folder for the numbered grid of the images counted (fidelity.png) and their readings."""
    fam = backbone.family
    settings = dict(steps=25, guidance=fam.guidance, scheduler=backbone.scheduler(fam.scheduler))
    pinned = {k: v for k, v in fixed.items() if v}
    metrics = fidelity(backbone.pipe, n=n, seed=seed, trigger=trigger, **settings, **pinned)
    if grid is not None:
        write_report(metrics, grid, title=grid.name)
    result = {a: metrics["accuracy"][a] for a in attributes}
    result["geometric"] = {a: metrics["geometric"]["accuracy"][a] for a in attributes}
    result["cell"] = readings(metrics, attributes[0])  # "evaluator / geometry", "!" where they part
    result["all"] = sum(all(p[a] == e[a] for a in attributes)
                        for p, e in zip(metrics["predicted"], metrics["expected"], strict=True)) / n
    result["drawn"] = [p["shape"] for p in metrics["predicted"]]
    return result


def plain_peft_seconds_per_step(folder: Path, reg: Path | None, backbone_name: str, *, target: str, rank: int,
                                batch: int, snr_gamma: float | None = None, steps: int = 40) -> float:
    """The diffusers + PEFT DreamBooth-LoRA loop (train_dreambooth_lora.py): PEFT `add_adapter` on the
    same modules, images through the VAE and captions through the text encoders at every step, class
    images concatenated to the batch for prior preservation."""
    import numpy as np
    from peft import LoraConfig
    from PIL import Image
    from studio.adapters.lora import target_modules

    from studio.training.objectives import objective_for

    backbone = load_backbone(backbone_name)
    denoiser = backbone.denoiser
    component = "unet" if backbone.family.arch == "unet" else "transformer"
    denoiser.requires_grad_(False)
    names = [n.split(".", 1)[1] for n in target_modules(backbone, target) if n.startswith(component + ".")]
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = objective_for(backbone, snr_gamma=snr_gamma)
    pools = [sorted(p for p in f.glob("*.png") if not p.name.endswith(".mask.png")) for f in (folder, reg) if f]
    vae = backbone.pipe.vae
    times = []
    for step in range(steps):
        start = time.perf_counter()
        picked = [pool[(step * batch + i) % len(pool)] for pool in pools for i in range(batch)]
        x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in picked]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = (vae.encode(x).latent_dist.sample() - shift) * vae.config.scaling_factor
            conditioning = objective.encode([p.with_suffix(".txt").read_text().strip() for p in picked])
        loss = objective.loss(denoiser, latents, **conditioning)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def trained(setting: dict[str, str], folder: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train with the shipped recipe (plus `overrides`, for sweeps): the adapter, the recipe, wall seconds
    (class images drawn included) and the median seconds per step."""
    config = TrainConfig(folder=str(folder), out=str(out), **setting, **overrides)
    started = time.perf_counter()
    # resume: a finished adapter of an earlier run is taken as it is (its train seconds then read ~0), a killed
    # one continues from its checkpoint
    path = train(config, resume=True, log=lambda line: None)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in Path(config.paths()["log"]).read_text().splitlines()]
    step_times = sorted(b["seconds"] - a["seconds"] for a, b in zip(records[-config.steps:],
                                                                     records[-config.steps + 1:], strict=False))
    return {"path": str(path), "config": config, "recipe": config.recipe, "train_seconds": seconds,
            "s_per_step": step_times[len(step_times) // 2]}


def concept_and_base(backbone, adapters: list[Any], *, shape: str, n: int, seed: int, grid: Path,
                     base: bool = True) -> dict[str, Any]:
    """The concept's rate with the trigger and (`base`) the base shapes' accuracy, with `adapters` attached."""
    from studio.pipelines import StudioPipeline

    pipeline = StudioPipeline(backbone)
    for adapter in adapters:
        pipeline.attach(adapter)
    try:
        concept = measure(backbone, n=n, seed=seed, trigger=TRIGGER, shape=shape, grid=grid / "concept")
        return {"concept": concept, **({"base": measure(backbone, n=n, seed=seed + 1, trigger=None,
                                                        grid=grid / "base")} if base else {})}
    finally:
        pipeline.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shapes", default="star,heart,moon")
    parser.add_argument("--dit-shapes", default="star,heart,moon", help="the shapes world-dit learns")
    parser.add_argument("--n", type=int, default=64, help="prompted samples per measurement")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--out", type=Path, default=Path("out/bench-customize"))
    parser.add_argument("--refs", type=int, default=12, help="renders of the shape to learn from (the README's 12)")
    parser.add_argument("--merge", action="store_true", help="sum each pair of the orthogonal adapters and measure")
    parser.add_argument("--skip-baseline", action="store_true", help="no diffusers+PEFT timing (for sweeps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the shipped recipe (repeatable; for sweeps: the table then is "
                             "not the defaults'), e.g. --set lr=1e-3")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "refs"  # a fixed place: a killed run's checkpoint names its folder
    shapes = args.shapes.split(",")
    folders = {}
    for shape in {*shapes, *args.dit_shapes.split(",")}:  # as the README: studio world render --shape S --n 12 --out refs/10_sks --trigger sks --masks
        folders[shape] = scratch / shape / f"10_{TRIGGER}"
        write_reference_folder(folders[shape], n=args.refs, seed=7, shape=shape, trigger=TRIGGER, masks=True)
    rows, before, backbones = {}, {}, {}
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        if setting["backbone"] not in backbones:
            backbone = backbones[setting["backbone"]] = load_backbone(setting["backbone"])
            before[setting["backbone"]] = {
                "base": measure(backbone, n=args.n, seed=args.seed + 1, trigger=None,
                                grid=args.out / setting["backbone"] / "base"),
                **{shape: measure(backbone, n=args.n, seed=args.seed, trigger=TRIGGER, shape=shape,
                                  grid=args.out / setting["backbone"] / shape)
                   for shape in (shapes if setting["backbone"] == "world-sd" else args.dit_shapes.split(","))}}
        backbone = backbones[setting["backbone"]]
        for shape in shapes if setting["backbone"] == "world-sd" else args.dit_shapes.split(","):
            run = trained(setting, folders[shape].parent, args.out / name / f"{shape}.safetensors", overrides)
            after = concept_and_base(backbone, [run["path"]], shape=shape, n=args.n, seed=args.seed,
                                     grid=args.out / name / shape)
            row = rows[(name, shape)] = {**{k: v for k, v in run.items() if k != "config"}, "after": after,
                                         "before": before[setting["backbone"]][shape]["cell"],
                                         "base_before": before[setting["backbone"]]["base"]}
            print(name, shape, json.dumps({k: v for k, v in row.items() if k != "base_before"}, default=str),
                  flush=True)
            if shape == shapes[0] and not args.skip_baseline:
                from studio.training.class_images import class_folder

                config = run["config"]
                # a fresh backbone's, as the trainer computes it (this one's adapters came and went)
                reg = class_folder(load_backbone(setting["backbone"]), config.class_prompt, config.class_images,
                                   config.seed) if config.class_images else None
                row["plain_s_per_step"] = plain_peft_seconds_per_step(
                    folders[shape], reg, setting["backbone"], target=config.target, rank=config.rank,
                    batch=config.batch, snr_gamma=config.snr_gamma)
    print(f"\nHeld-out shapes taught from {args.refs} renders with the shipped recipes"
          f"{' and ' + ', '.join(args.set) if args.set else ''}; {args.n} prompted samples per cell (shape accuracy: "
          f"evaluator / geometry, '!' where the two disagree on over 10% of the images; the drop by the evaluator)")
    print(f"{'setting':<14} {'shape':<6} {'recipe':<22} {'before':>13} {'after':>13} {'base before':>13} "
          f"{'base after':>13} {'drop':>6} {'train s':>8} {'s/step':>7} {'PEFT s/step':>11}")
    for (name, shape), r in rows.items():
        drop = (r["base_before"]["shape"] - r["after"]["base"]["shape"]) * 100
        print(f"{name:<14} {shape:<6} {r['recipe']:<22} {r['before']:>13} {r['after']['concept']['cell']:>13} "
              f"{r['base_before']['cell']:>13} {r['after']['base']['cell']:>13} {drop:>5.1f}p "
              f"{r['train_seconds']:>8.0f} {r['s_per_step']:>7.3f} {r.get('plain_s_per_step', float('nan')):>11.3f}")
    if args.merge:
        merged_rows(rows, backbones, shapes, args)
    (args.out / "customize.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in rows.items()}, indent=1,
                                                        default=str))


def merged_rows(rows: dict[tuple[str, str], Any], backbones: dict[str, Any], shapes: list[str], args) -> None:
    """Each pair of orthogonal adapters summed: each concept's rate through the sum against its adapter alone
    (the adapters are made with different triggers' hashes only if their names differ: here star, heart...)."""
    from studio.adapters.base import load_adapter

    import studio

    solo = {shape: rows[("orthogonal-sd", shape)] for shape in shapes if ("orthogonal-sd", shape) in rows}
    print("\nOrthogonal adapters trained apart with the defaults, summed (studio merge --method orthogonal): each "
          "concept's rate through the sum / alone (evaluator; geometry in the json)")
    print(f"{'pair':<14} {'concept':<8} {'alone':>6} {'summed':>7} {'kept':>6} {'seeds':>24}")
    for a, b in itertools.combinations(solo, 2):
        result = studio.merge([solo[a]["path"], solo[b]["path"]], method="orthogonal")
        seeds = [load_adapter(solo[s]["path"]).config.concept_seed for s in (a, b)]
        for shape in (a, b):
            summed = concept_and_base(backbones["world-sd"], [result.adapter], shape=shape, n=args.n, seed=args.seed,
                                      grid=args.out / "merged" / f"{a}+{b}" / shape, base=False)
            alone = solo[shape]["after"]["concept"]["shape"]
            rate = summed["concept"]["shape"]
            solo[shape].setdefault("summed", {})[f"{a}+{b}"] = summed
            print(f"{a + '+' + b:<14} {shape:<8} {alone:>6.2f} {rate:>7.2f} {rate / max(alone, 1e-9):>6.0%} "
                  f"{str(seeds):>24}", flush=True)


if __name__ == "__main__":
    main()
