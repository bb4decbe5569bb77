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

import torch

from studio.backbones import load_backbone
from studio.training.trainer import TrainConfig, train
from studio.world.fidelity import fidelity
from studio.world.folder import write_reference_folder

SETTINGS = {
    "lora-sd": dict(backbone="world-sd", kind="lora"),
    "orthogonal-sd": dict(backbone="world-sd", kind="orthogonal", concept_seed=1),
    "lora-dit": dict(backbone="world-dit", kind="lora"),
}
COMMON = dict(rank=8, steps=300, batch=8, lr=2e-3, target="all-linear", trigger="sks", lr_schedule="cosine",
              warmup=20, flip=False, checkpoint_every=1000)


def measure(backbone, *, n: int, seed: int, trigger: str | None, shape: str | None) -> float:
    fam = backbone.family
    settings = dict(steps=25, guidance=fam.guidance, scheduler=backbone.scheduler(fam.scheduler))
    fixed = {"shape": shape} if shape else {}
    return fidelity(backbone.pipe, n=n, seed=seed, trigger=trigger, **settings, **fixed)["accuracy"]["shape"]


def plain_peft_seconds_per_step(folder: Path, backbone_name: str, *, rank: int, batch: int, steps: int = 20) -> float:
    """The diffusers + PEFT DreamBooth-LoRA loop: PEFT `add_adapter`, images through the VAE and
    captions through the text encoders at every step."""
    import numpy as np
    from peft import LoraConfig
    from PIL import Image

    from studio.training.objectives import objective_for

    backbone = load_backbone(backbone_name)
    denoiser = backbone.denoiser
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=_linear_names(denoiser)))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = objective_for(backbone)
    images = sorted(folder.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    vae = backbone.pipe.vae
    times = []
    for step in range(steps):
        start = time.perf_counter()
        pick = [(step * batch + i) % len(images) for i in range(batch)]
        x = torch.from_numpy(np.stack([np.asarray(Image.open(images[i]).convert("RGB")) for i in pick]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = (vae.encode(x).latent_dist.sample() - shift) * vae.config.scaling_factor
            conditioning = objective.encode([captions[i] for i in pick])
        loss = objective.loss(denoiser, latents, **conditioning)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def _linear_names(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shape", default="star")
    parser.add_argument("--n", type=int, default=100, help="prompted samples per measurement")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--out", type=Path, default=Path("out/bench-customize"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp()) / "refs"
    write_reference_folder(folder, n=12, seed=7, shape=args.shape, trigger="sks")
    # DreamBooth prior preservation: renders of base shapes, captioned without the trigger, keep the
    # rest of the model where it was (without them the first run lost 28 points of base-shape accuracy)
    reg = folder.parent / "reg"
    write_reference_folder(reg, n=48, seed=8)
    rows = {}
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        backbone = load_backbone(setting["backbone"])
        before = {"concept": measure(backbone, n=args.n, seed=args.seed, trigger="sks", shape=args.shape),
                  "base": measure(backbone, n=args.n, seed=args.seed + 1, trigger=None, shape=None)}
        config = TrainConfig(folder=str(folder), out=str(args.out / f"{name}.safetensors"), reg_folder=str(reg),
                             **{**COMMON, **setting})
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
                 "base": measure(backbone, n=args.n, seed=args.seed + 1, trigger=None, shape=None)}
        pipeline.detach()
        plain = plain_peft_seconds_per_step(folder, setting["backbone"], rank=config.rank, batch=config.batch)
        rows[name] = {"before": before, "after": after, "train_seconds": seconds,
                      "studio_s_per_step": sorted(step_times)[len(step_times) // 2], "plain_s_per_step": plain}
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\nHeld-out shape '{args.shape}' taught from 12 renders, {COMMON['steps']} steps; "
          f"{args.n} prompted samples per cell (evaluator shape accuracy)")
    print(f"{'setting':<15} {'concept before':>15} {'concept after':>14} {'base before':>12} {'base after':>11} "
          f"{'drop':>6} {'studio s/step':>14} {'diffusers+PEFT':>15} {'train s':>8}")
    for name, r in rows.items():
        drop = (r["before"]["base"] - r["after"]["base"]) * 100
        print(f"{name:<15} {r['before']['concept']:>15.3f} {r['after']['concept']:>14.3f} {r['before']['base']:>12.3f} "
              f"{r['after']['base']:>11.3f} {drop:>5.1f}p {r['studio_s_per_step']:>14.3f} {r['plain_s_per_step']:>15.3f} "
              f"{r['train_seconds']:>8.0f}")
    (args.out / "customize.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
