"""Make the eye-labelled set of generated images (assets/world/labelled/): images drawn by the world backbones
with and without adapters, shuffled, with how each was made. The labels themselves are written by people
looking at numbered grids (assets/world/labelled/INSTRUCTIONS.md); this script never reads any instrument.

    .venv/bin/python bench/labelled_set.py --work /tmp/lab          # ~10 min on 2 CPU cores (7 adapters)
    .venv/bin/python bench/labelled_set.py --work /tmp/lab --grids  # numbered grids of 16 to label from

Part 1 (images 000-319): per backbone, random full captions of base values, short "a {colour} {shape}" prompts,
prompts naming held-out values (which the base models fail to draw: blobs, wrong shapes), 3-step samples
(unfinished blobs) and CFG 15 (overshoot); then LoRAs trained as a new user would (12 renders, the CLI's
`studio train FOLDER --lr 1e-3` with its other defaults) on held-out shapes and backgrounds, at weights
0.5-1, prompted with their trigger in new colours and backgrounds. Those drew few stars and hearts and no
checker or waves (as labelled), so part 2 (images 320-383) adds LoRAs trained with bench/customize.py's recipe
(LoCon rank 16, lr 5e-3 cosine, flips, masked loss, 200 prior renders) on the star, the heart and both held-out
backgrounds, 16 images each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from studio.world import ASSETS
from studio.world.captions import BACKGROUND_WORDS, caption
from studio.world.render import sample_labels
from studio.world.vocab import COLOURS, HELD_OUT, SHAPES, base_values

OUT = ASSETS / "labelled"
# name: (backbone, render options, trigger); trained with `studio train refs --lr 1e-3 [--backbone world-dit]`
ADAPTERS = {
    "sd_moon": ("world-sd", dict(shape="moon", colour="green"), "vkm"),
    "sd_star": ("world-sd", dict(shape="star", colour="red"), "sks"),
    "sd_heart": ("world-sd", dict(shape="heart", colour="purple"), "zxq"),
    "sd_checker": ("world-sd", dict(background="checker"), "ckr"),
    "dit_moon": ("world-dit", dict(shape="moon", colour="orange"), "qmo"),
    "dit_heart": ("world-dit", dict(shape="heart", colour="pink"), "hrt"),
    "dit_waves": ("world-dit", dict(background="waves"), "wvs"),
}

# part 2: the customize bench's recipe, which does draw held-out values; the star with its prior renders, the
# others without (the prior costs half of every step and keeps base shapes, which this set does not need), the
# backgrounds in 150 steps without masked loss
STRONG = {
    "sd_star_locon": ("world-sd", dict(shape="star", colour="yellow"), "sks"),
    "sd_heart_locon": ("world-sd", dict(shape="heart", colour="red"), "zxq"),
    "sd_checker_locon": ("world-sd", dict(background="checker"), "ckr"),
    "sd_waves_locon": ("world-sd", dict(background="waves"), "wvs"),
}
LIGHTER = {"steps": 150, "masked_loss": False}


def train_adapters(work: Path, part: int = 1) -> dict[str, Path]:
    from studio.training.trainer import train
    from studio.world.folder import write_reference_folder

    paths = {}
    for name, (backbone, fixed, trigger) in (ADAPTERS if part == 1 else STRONG).items():
        path = work / f"{name}.safetensors"
        if not path.is_file():
            refs = work / f"refs_{name}" / f"10_{trigger}"
            if not refs.is_dir():
                write_reference_folder(refs, n=12, trigger=trigger, seed=0, masks=part == 2, **fixed)
            if part == 1:
                train(folder=str(refs.parent), out=str(path), kind="lora", backbone=backbone, lr=1e-3, steps=300)
            else:
                from customize import COMMON, REG_IMAGES  # bench/customize.py, beside this file

                reg = work / "reg"
                if not reg.is_dir():
                    write_reference_folder(reg, n=REG_IMAGES, seed=8)
                lighter = LIGHTER if "background" in fixed else {}
                train(folder=str(refs.parent), out=str(path), backbone=backbone,
                      reg_folder=str(reg) if name == "sd_star_locon" else None,
                      **{**COMMON, "trigger": trigger, **lighter})
        paths[name] = path
    return paths


def jobs(rng: np.random.Generator, part: int = 1) -> list[dict]:
    """Every (backbone, adapter, prompt, settings) to draw, 2 images each (seeds s, s+1)."""
    out: list[dict] = []

    def add(backbone, prompt, n=2, adapter=None, weight=1.0, **settings):
        out.append(dict(backbone=backbone, prompt=prompt, n=n, adapter=adapter, weight=weight,
                        seed=int(rng.integers(10_000)), **settings))

    if part == 2:
        for name, (backbone, fixed, trigger) in STRONG.items():
            for _ in range(8):
                colour = str(rng.choice(list(COLOURS)))
                if "shape" in fixed:
                    background = str(rng.choice(base_values("background")))
                    prompt = f"a {colour} {trigger} {fixed['shape']} on a {BACKGROUND_WORDS[background]} background"
                else:
                    prompt = (f"a {colour} {trigger} {rng.choice(SHAPES[:6])} on a "
                              f"{BACKGROUND_WORDS[fixed['background']]} background")
                add(backbone, prompt, adapter=name, weight=float(rng.choice([0.8, 1.0])))
        return out
    for backbone in ("world-sd", "world-dit"):
        for _ in range(24):
            add(backbone, caption(sample_labels(rng)))
        for _ in range(6):
            add(backbone, f"a {rng.choice(list(COLOURS))} {rng.choice(base_values('shape'))}")
        for _ in range(10):
            if rng.random() < 0.6:
                add(backbone, caption(sample_labels(rng, shape=str(rng.choice(HELD_OUT["shape"])))))
            else:
                add(backbone, caption(sample_labels(rng, background=str(rng.choice(HELD_OUT["background"])))))
        for _ in range(4):
            add(backbone, caption(sample_labels(rng, held_out=True)), steps=3)
        for _ in range(5):
            add(backbone, caption(sample_labels(rng)), guidance=15.0)
    for name, (backbone, fixed, trigger) in ADAPTERS.items():
        for k in range(10 if "shape" in fixed else 6):
            colour = fixed.get("colour") if k < 3 else str(rng.choice(list(COLOURS)))
            if "shape" in fixed:
                background = "plain" if k < 3 else str(rng.choice(base_values("background")))
                prompt = f"a {colour} {trigger} {fixed['shape']}"
                if k >= 3:
                    prompt += f" on a {BACKGROUND_WORDS[background]} background"
            else:
                shape = str(rng.choice(SHAPES[:6]))
                prompt = f"a {colour} {trigger} {shape} on a {BACKGROUND_WORDS[fixed['background']]} background"
            add(backbone, prompt, adapter=name, weight=float(rng.choice([0.5, 0.8, 1.0, 1.0])))
    return out


def make(work: Path, part: int = 1) -> None:
    from studio.pipelines.base import StudioPipeline

    adapters = train_adapters(work, part)
    rng = np.random.default_rng(part - 1)
    todo = jobs(rng, part)
    made: list[dict] = []
    pipes: dict[str, StudioPipeline] = {}
    for job in todo:
        pipe = pipes.setdefault(job["backbone"], StudioPipeline(job["backbone"]))
        attached = pipe.attach(str(adapters[job["adapter"]]), weight=job["weight"]) if job["adapter"] else None
        settings = {k: job[k] for k in ("steps", "guidance") if k in job}
        result = pipe.generate(job["prompt"], n=job["n"], seed=job["seed"], **settings)
        if attached is not None:
            pipe.detach(attached)
        for i, image in enumerate(result.images):
            recipe = result.recipes[i]
            made.append(dict(image=image, backbone=job["backbone"], prompt=job["prompt"], seed=job["seed"] + i,
                             steps=recipe.steps, guidance=recipe.guidance, scheduler=recipe.scheduler,
                             adapter=job["adapter"], weight=job["weight"] if job["adapter"] else None))
    order = rng.permutation(len(made))  # shuffled: a labeller sees no run of one prompt
    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    first = 0 if part == 1 else len(list(images.glob("*.png")))
    with open(OUT / "made.jsonl", "w" if part == 1 else "a") as handle:
        for k, i in enumerate(order):
            item = made[int(i)]
            name = f"{first + k:03d}.png"
            item.pop("image").save(images / name, optimize=True)
            handle.write(json.dumps({"file": name, **item}) + "\n")
    print(f"wrote {len(made)} images to {images}")


def grids(folder: Path, out: Path, per: int = 16, scale: int = 3) -> None:
    """Numbered 4x4 grids of the set's images, enlarged, to label from (grid_00.png: images 000-015)."""
    from PIL import Image, ImageDraw

    files = sorted((folder / "images").glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    side = 64 * scale
    for g in range(0, len(files), per):
        sheet = Image.new("RGB", (4 * (side + 8), 4 * (side + 24)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, path in enumerate(files[g : g + per]):
            x, y = (j % 4) * (side + 8), (j // 4) * (side + 24)
            draw.text((x + 2, y + 4), path.stem, fill="black")
            sheet.paste(Image.open(path).convert("RGB").resize((side, side), Image.NEAREST), (x, y + 20))
        sheet.save(out / f"grid_{g // per:02d}.png")


def reference_sheet(out: Path, scale: int = 3) -> None:
    """What labellers compare against: each shape, colour swatch and background, named."""
    from PIL import Image, ImageDraw

    from studio.world.render import render
    from studio.world.vocab import BACKGROUNDS, Labels

    side = 64 * scale
    rows = [[(s, render(Labels(shape=s, colour="blue", background="plain", position="centre", size="large"))[0])
             for s in SHAPES],
            [(c, Image.new("RGB", (64, 64), COLOURS[c])) for c in COLOURS],
            [(b, render(Labels(shape="circle", colour="red", background=b, position="centre", size="small"))[0])
             for b in BACKGROUNDS]]
    sheet = Image.new("RGB", (9 * (side + 8), 3 * (side + 24)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (name, image) in enumerate(row):
            x, y = c * (side + 8), r * (side + 24)
            draw.text((x + 2, y + 4), name, fill="black")
            sheet.paste(image.resize((side, side), Image.NEAREST), (x, y + 20))
    sheet.save(out / "reference.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where the adapters and their references live")
    parser.add_argument("--part", type=int, default=1, choices=(1, 2), help="1 writes the set anew, 2 appends")
    parser.add_argument("--grids", action="store_true", help="only draw the labelling grids into WORK/grids")
    args = parser.parse_args()
    if args.grids:
        grids(OUT, args.work / "grids")
        reference_sheet(args.work / "grids")
    else:
        make(args.work, args.part)


if __name__ == "__main__":
    main()
