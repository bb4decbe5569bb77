"""Teach a held-out shape from 12 renders, measured by the shapes-world evaluator.

For each setting (LoRA and orthogonal LoRA on world-sd, LoRA on world-dit): render 12 images of the
held-out shape with a trigger word, train <= 300 steps with studio's trainer, then prompt with the
trigger and count how often the evaluator sees the shape (before: the base model, near 0), and
check that prompts of base shapes keep their accuracy (drop <= 5 points). Then the time per step of
studio's trainer beside a plain diffusers + PEFT loop on the same model, data, rank and batch (the
loop diffusers' train_dreambooth_lora script runs: VAE and text encoder every step, no cache).

    .venv/bin/python bench/customize.py                    # ~15 min on 2 CPU cores
    .venv/bin/python bench/customize.py --settings lora-sd --n 48
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from studio.backbones import load_backbone
from studio.training.trainer import TrainConfig, parse_overrides, train
from studio.world.evaluator import readings
from studio.world.fidelity import fidelity
from studio.world.folder import write_reference_folder

SETTINGS = {
    "lora-sd": dict(backbone="world-sd", kind="lora"),
    # rank 12: conv_in's 36-wide input holds 3 disjoint concepts (seeds 0-2, see bench/merge.py)
    "orthogonal-sd": dict(backbone="world-sd", kind="orthogonal", concept_seed=1, rank=12, alpha=12),
    "lora-dit": dict(backbone="world-dit", kind="lora"),
}
# LoCon (linear + conv layers) at rank 16, masked loss, 200 prior-preservation renders at weight 2: the
# best of sweeps of rank (8/16/32), targets (all-linear/locon), lr (2e-3..1e-2), text-encoder training,
# Min-SNR-γ, batch, prior weight, class-image count and masked loss (README, Benchmarks)
# Mirrored copies (their captions saying the other side) double the 12 renders: LoRA's star 0.74 -> 0.83
# at 100 samples (README)
COMMON = dict(rank=16, alpha=16, steps=300, batch=8, lr=5e-3, target="locon", trigger="sks", lr_schedule="cosine",
              warmup=20, flip=True, checkpoint_every=1000, masked_loss=True, prior_weight=2.0)
REG_IMAGES = 200  # with 48 the adapters lost 9 points of base shapes, with 200 2-3 (they learn the class)


def measure(backbone, *, n: int, seed: int, trigger: str | None, attributes: tuple[str, ...] = ("shape",),
            **fixed: str | None) -> dict[str, Any]:
    """Evaluator accuracy of `attributes` over `n` prompted samples at the family's defaults, "all": the
    fraction with every one of them right, and "drawn": the shape the evaluator saw in each sample."""
    fam = backbone.family
    settings = dict(steps=25, guidance=fam.guidance, scheduler=backbone.scheduler(fam.scheduler))
    pinned = {k: v for k, v in fixed.items() if v}
    metrics = fidelity(backbone.pipe, n=n, seed=seed, trigger=trigger, **settings, **pinned)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shape", default="star")
    parser.add_argument("--n", type=int, default=100, help="prompted samples per measurement")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--out", type=Path, default=Path("out/bench-customize"))
    parser.add_argument("--reg", type=int, default=REG_IMAGES, help="prior-preservation renders")
    parser.add_argument("--refs", type=int, default=12,
                        help="renders of the shape to learn from (the issue's 12; more tell what 12 cost, README)")
    parser.add_argument("--skip-baseline", action="store_true", help="no diffusers+PEFT timing (for sweeps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option of COMMON (repeatable), e.g. --set mask_floor=0.05")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp()) / "refs"
    write_reference_folder(folder, n=args.refs, seed=7, shape=args.shape, trigger="sks", masks=True)
    # DreamBooth prior preservation: renders of base shapes, captioned without the trigger, keep the
    # rest of the model where it was (without them the first run lost 28 points of base-shape accuracy)
    reg = folder.parent / "reg"
    write_reference_folder(reg, n=args.reg, seed=8)
    rows = {}
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        backbone = load_backbone(setting["backbone"])
        before = {"concept": measure(backbone, n=args.n, seed=args.seed, trigger="sks", shape=args.shape),
                  "base": measure(backbone, n=args.n, seed=args.seed + 1, trigger=None)}
        config = TrainConfig(folder=str(folder), out=str(args.out / f"{name}.safetensors"), reg_folder=str(reg),
                             **{**COMMON, **setting, **overrides})
        started = time.perf_counter()
        path = train(config, log=lambda line: None)
        seconds = time.perf_counter() - started
        records = [json.loads(line) for line in Path(config.paths()["log"]).read_text().splitlines()]
        step_times = [b["seconds"] - a["seconds"] for a, b in zip(records[-config.steps:], records[-config.steps + 1:],
                                                                     strict=False)]
        from studio.pipelines import StudioPipeline

        pipeline = StudioPipeline(backbone)
        pipeline.attach(path)
        after = {"concept": measure(backbone, n=args.n, seed=args.seed, trigger="sks", shape=args.shape),
                 "base": measure(backbone, n=args.n, seed=args.seed + 1, trigger=None)}
        pipeline.detach()
        plain = float("nan") if args.skip_baseline else plain_peft_seconds_per_step(
            folder, reg, setting["backbone"], target=config.target, rank=config.rank, batch=config.batch,
            snr_gamma=config.snr_gamma)
        rows[name] = {"before": before, "after": after, "train_seconds": seconds,
                      "studio_s_per_step": sorted(step_times)[len(step_times) // 2], "plain_s_per_step": plain}
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\nHeld-out shape '{args.shape}' taught from {args.refs} renders, {overrides.get('steps', COMMON['steps'])} steps; "
          f"{args.n} prompted samples per cell (shape accuracy: evaluator / geometry, '!' where the two disagree "
          f"on over 10% of the images; the drop by the evaluator)")
    print(f"{'setting':<15} {'concept before':>15} {'concept after':>15} {'base before':>15} {'base after':>15} "
          f"{'drop':>6} {'studio s/step':>14} {'diffusers+PEFT':>15} {'train s':>8}")
    for name, r in rows.items():
        drop = (r["before"]["base"]["shape"] - r["after"]["base"]["shape"]) * 100
        print(f"{name:<15} {r['before']['concept']['cell']:>15} {r['after']['concept']['cell']:>15} "
              f"{r['before']['base']['cell']:>15} {r['after']['base']['cell']:>15} {drop:>5.1f}p "
              f"{r['studio_s_per_step']:>14.3f} {r['plain_s_per_step']:>15.3f} {r['train_seconds']:>8.0f}")
    (args.out / "customize.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
