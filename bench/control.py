"""Control on the shapes world: a ControlNet and a T2I-Adapter trained on mask maps, measured by the evaluator.

1. Train (or reuse, `--reuse`) a ControlNet and a T2I-Adapter on world-sd and a ControlNet on world-dit, from a
   folder of renders whose NAME.mask.png (the exact object mask) is the condition (`--condition mask`).
2. Position by mask: held-out masks (shape, size and place at random) as control images, the prompt naming
   colour, shape and background but no position; the evaluator's mask of each output against the control mask
   (IoU, goal >= 0.70) beside the base model's IoU without control, with the evaluator's shape and colour
   accuracy (the text must still work).
3. Two controls together (ControlNet + T2I-Adapter on the same mask): each within 5 points of its solo figure.
4. Speed, side by side in one run: studio's generation with a control against diffusers'
   `StableDiffusionControlNetPipeline` / `StableDiffusionAdapterPipeline` on the same components, weights, map
   and seed (time ratio, pixel difference); world-dit against `StableDiffusion3ControlNetPipeline` (time only:
   diffusers samples the map's VAE latent, so its own runs differ).

    .venv/bin/python bench/control.py                  # trains all three, then measures (~45 min on 2 cores)
    .venv/bin/python bench/control.py --reuse          # measure the models in --out again
    .venv/bin/python bench/control.py --shipped --skip-speed   # the shipped world-sd models (~6 min)
    .venv/bin/python bench/control.py --ship           # also copy the world-sd models into assets/world/control
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from studio.pipelines import StudioPipeline

from studio.world.captions import BACKGROUND_WORDS
from studio.world.evaluator import load_evaluator, predict
from studio.world.render import render, sample_labels
from studio.world.vocab import Labels

sys.path.insert(0, str(Path(__file__).parent))
from image_prompt import _side_by_side  # noqa: E402  (the same side-by-side timing)

MODELS = (("controlnet", "world-sd"), ("t2i_adapter", "world-sd"), ("controlnet", "world-dit"))
RECIPE = dict(condition="mask", batch=16, buckets=False, checkpoint_every=200)
LR = {"controlnet": 3e-4, "t2i_adapter": 1e-3}


def train_control(out: Path, kind: str, backbone: str, *, refs: int, steps: int) -> Path:
    from studio.training.trainer import TrainConfig, train

    folder = out / "refs"
    if not folder.exists():
        write_folder(folder, refs, seed=11)
    target = out / f"{kind}-{backbone}"
    config = TrainConfig(folder=str(folder), out=str(target), kind=kind, backbone=backbone, steps=steps,
                         lr=LR[kind], **RECIPE)
    start = time.monotonic()

    def progress(step: int, total: int, loss: float) -> None:
        if step % max(1, total // 10) == 0:
            spent = time.monotonic() - start
            print(f"  {kind} {backbone}: step {step}/{total} loss {loss:.4f}, {spent / 60:.1f} min, "
                  f"ETA {spent / step * (total - step) / 60:.1f} min", flush=True)

    path = train(config, progress=progress, resume=(Path(f"{target}.checkpoint") / "state.json").is_file())
    print(f"trained {path} in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return path


def write_folder(folder: Path, n: int, *, seed: int) -> None:
    """Renders with their exact masks (NAME.mask.png) and captions that name colour, shape and background but not
    the place or size: the map is what says where, as in the measurement (the world's own captions always say
    where, which would leave a control nothing to learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        labels = sample_labels(rng)
        image, mask = render(labels, seed=int(rng.integers(2**31)))
        image.save(folder / f"{i:04d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:04d}.mask.png")
        (folder / f"{i:04d}.txt").write_text(prompt_of(labels) + "\n", encoding="utf-8")


def cases(n: int, seed: int) -> list[tuple[Image.Image, np.ndarray, Labels]]:
    """Held-out scenes: the control map (white mask on black), the mask, the labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = sample_labels(rng)
        _, mask = render(labels, seed=int(rng.integers(2**31)))
        out.append((Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"), mask, labels))
    return out


def prompt_of(labels: Labels) -> str:
    return f"a {labels.colour} {labels.shape} on a {BACKGROUND_WORDS[labels.background]} background"


def measure(pipeline: StudioPipeline, controls: list[tuple[Any, float]], scenes: list, *, steps: int = 20,
            seed: int = 100) -> dict[str, float]:
    """One image per scene with every control reading its mask; IoU with the mask and the text's accuracy."""
    images = []
    for i, (control_map, _, labels) in enumerate(scenes):
        for adapter, scale in controls:
            pipeline.attach(adapter, scale, image=control_map, preprocess="none")
        images += pipeline.generate(prompt_of(labels), seed=seed + i, steps=steps).images
        pipeline.detach()
    seen = predict(images, evaluator=EVALUATOR)
    truth = torch.as_tensor(np.stack([m for _, m, _ in scenes]))
    inter = (seen["mask"] & truth).flatten(1).sum(1).float()
    union = (seen["mask"] | truth).flatten(1).sum(1).clamp(min=1).float()
    return {"mask IoU": float((inter / union).mean()),
            "shape (text)": float(np.mean([s == lab.shape for s, (_, _, lab) in zip(seen["shape"], scenes, strict=True)])),
            "colour (text)": float(np.mean([c == lab.colour for c, (_, _, lab) in zip(seen["colour"], scenes, strict=True)]))}


def table(rows: list[tuple[str, dict[str, float]]]) -> None:
    columns = list(rows[0][1])
    print("| setting | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---" for _ in columns) + " |")
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |", flush=True)


def speed(paths: dict[tuple[str, str], Path], control_map: Image.Image, *, repeats: int = 5, steps: int = 20) -> None:
    """studio vs diffusers' own control pipelines on the same components, weights, map and seed."""
    for (kind, backbone), path in paths.items():
        _speed_one(kind, backbone, path, control_map, repeats=repeats, steps=steps)


def _speed_one(kind: str, backbone: str, path: Path, control_map: Image.Image, *, repeats: int, steps: int) -> None:
    from diffusers import (
        ControlNetModel,
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
        StableDiffusionAdapterPipeline,
        StableDiffusionControlNetPipeline,
        T2IAdapter,
    )

    pipeline = StudioPipeline(backbone)
    pipe = pipeline.pipe
    parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "image_encoder", "feature_extractor")}
    side = pipeline.backbone.default_size
    call = dict(num_inference_steps=steps, guidance_scale=7.0, width=side, height=side, negative_prompt="")
    if kind == "t2i_adapter":
        plain = StableDiffusionAdapterPipeline(**parts, adapter=T2IAdapter.from_pretrained(path), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
        # it still decodes with the deprecated decode_latents (latents x (1 / scale): a rounding apart), so its
        # latents go through StableDiffusionPipeline's decoder, timed with it
        call.update(image=control_map, adapter_conditioning_scale=1.0, output_type="latent")
        name = "StableDiffusionAdapterPipeline"
    elif backbone == "world-sd":
        plain = StableDiffusionControlNetPipeline(**parts, controlnet=ControlNetModel.from_pretrained(path),
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
        call.update(image=control_map, controlnet_conditioning_scale=1.0)
        name = "StableDiffusionControlNetPipeline"
    else:
        plain = StableDiffusion3ControlNetPipeline(**parts, controlnet=SD3ControlNetModel.from_pretrained(path))
        call.update(control_image=control_map, controlnet_conditioning_scale=1.0, max_sequence_length=20)
        name = "StableDiffusion3ControlNetPipeline"
    plain.set_progress_bar_config(disable=True)
    pipeline.attach(str(path), 1.0, image=control_map, preprocess="none")
    scheduler = pipeline.backbone.family.scheduler

    def ours():
        return pipeline.generate("a red circle", seed=5, steps=steps, guidance=7.0).images[0]

    def theirs():
        plain.scheduler = pipeline.backbone.scheduler(scheduler)
        out = plain("a red circle", generator=[torch.Generator("cpu").manual_seed(5)], **call).images
        if call.get("output_type") == "latent":
            with torch.no_grad():
                out = pipe.image_processor.postprocess(pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample)
        return out[0]

    s, d, a, b = _side_by_side(ours, theirs, repeats)
    pixels = "" if backbone == "world-dit" else f"; max pixel difference {int(np.abs(a - b).max())}"
    print(f"{kind} on {backbone}, {steps} steps, CFG 7, median of {repeats}: studio {s:.3f} s, diffusers {name} "
          f"{d:.3f} s, ratio {s / d:.3f}{pixels}", flush=True)


def main() -> None:
    global EVALUATOR
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench-control"))
    parser.add_argument("--refs", type=int, default=1000, help="training renders")
    parser.add_argument("--steps", type=int, nargs=3, default=[3000, 6000, 3000], metavar=("CN_SD", "T2I_SD", "CN_DIT"),
                        help="training steps of each model")
    parser.add_argument("--reuse", action="store_true", help="measure the models already in --out")
    parser.add_argument("--shipped", action="store_true",
                        help="measure the shipped models (world-sd's, in assets/world/control) instead of training")
    parser.add_argument("--ship", action="store_true", help="copy the world-sd models into assets/world/control")
    parser.add_argument("--n", type=int, default=64, help="scenes per measurement")
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    EVALUATOR = load_evaluator()
    from studio.adapters.base import load_adapter

    from studio.embedded import ships

    paths = {}
    for (kind, backbone), steps in zip(MODELS, args.steps, strict=True):
        if args.shipped:
            shipped = ships(backbone, kind)
            if shipped is not None:
                paths[(kind, backbone)] = shipped
            continue
        target = args.out / f"{kind}-{backbone}"
        paths[(kind, backbone)] = target if args.reuse else train_control(args.out, kind, backbone, refs=args.refs,
                                                                           steps=steps)

    if args.ship:
        for (kind, backbone), path in paths.items():
            if ships(backbone, kind) is not None:  # in fp16: the world's assets stay within their 40 MB
                destination = load_adapter(path).save(ships(backbone, kind), overwrite=True, half=True)
                print(f"shipped {destination}")

    scenes = cases(args.n, args.seed)
    for backbone in () if args.skip_quality else dict.fromkeys(b for _, b in paths):
        pipeline = StudioPipeline(backbone)
        adapters = {kind: load_adapter(path, pipeline.backbone) for (kind, b), path in paths.items() if b == backbone}
        print(f"\n{backbone}: {args.n} held-out masks, one image each, 20 steps, CFG "
              f"{pipeline.backbone.family.guidance:g}; the prompt names colour, shape and background, not the place\n")
        rows = [("base model, no control", measure(pipeline, [], scenes))]
        rows += [(f"{kind} (mask), scale {scale:g}", measure(pipeline, [(adapter, scale)], scenes))
                 for kind, adapter in adapters.items() for scale in ((1.0, 2.0) if kind == "t2i_adapter" else (1.0,))]
        if len(adapters) > 1:
            rows.append(("controlnet + t2i_adapter, scale 1 each",
                         measure(pipeline, [(a, 1.0) for a in adapters.values()], scenes)))
        table(rows)
    if not args.skip_speed:
        print()
        speed(paths, scenes[0][0])


if __name__ == "__main__":
    main()
