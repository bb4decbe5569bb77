"""DreamBooth's class images (Ruiz et al. 2023): prior-preservation images the backbone draws itself.

diffusers' train_dreambooth draws `num_class_images` images of one `class_prompt` before training; studio does
the same (several prompts are taken in turn), at the family's default steps and guidance, and keeps them in
`$STUDIO_HOME/cache/class-images/<backbone fingerprint>/<hash of prompts, count and seed>/` as NNN.png beside NNN.txt
(its prompt, the image's caption), so a second run with the same backbone, prompts and seed draws nothing and a
killed run draws only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.home import cache_dir

CHUNK = 8  # images per pipeline call: one progress line each


def class_folder(backbone: Any, prompts: list[str], count: int, seed: int) -> Path:
    """Where the class images of (backbone, prompts, count, seed) are kept (the count decides which prompt
    each image has)."""
    key = hashlib.sha256(json.dumps({"prompts": prompts, "count": count, "seed": seed}).encode()).hexdigest()[:16]
    return cache_dir("class-images") / backbone.fingerprint()[:16] / key


def class_images(backbone: Any, prompts: list[str], count: int, *, seed: int = 0,
                 log: Callable[[str], None] = print) -> Path:
    """A folder with `count` images of `prompts` (the prompts in equal runs; image i drawn from seed + i),
    drawing those not there yet."""
    from studio.home import atomic_write_bytes
    from studio.pipelines import StudioPipeline

    folder = class_folder(backbone, prompts, count, seed)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"{i:04d}.txt").is_file()]
    if not missing:
        log(f"class images: {count} of {prompts[0]!r}{' and others' if len(prompts) > 1 else ''} from the cache "
            f"({folder})")
        return folder
    log(f"class images: drawing {len(missing)} of {count} with the backbone ({count - len(missing)} cached) "
        f"into {folder}")
    pipeline = StudioPipeline(backbone)
    denoiser = backbone.denoiser
    was_training = denoiser.training
    denoiser.eval()
    try:
        done = count - len(missing)
        for run in _runs(missing, lambda i: prompt_of(i, prompts, count)):
            prompt = prompt_of(run[0], prompts, count)
            # image i is drawn with seed + i, batched or not, so a resumed run draws what the first would have
            for i, image in zip(run, pipeline.generate(prompt, n=len(run), seed=seed + run[0]).images, strict=True):
                image.save(folder / f"{i:04d}.png")
                # the caption last: an image counts as done once its caption is there
                atomic_write_bytes(folder / f"{i:04d}.txt", (prompt + "\n").encode())
            done += len(run)
            log(f"class images: {done}/{count}")
    finally:
        if was_training:
            denoiser.train()
    return folder


def prompt_of(i: int, prompts: list[str], count: int) -> str:
    """Image i's prompt: the prompts take equal consecutive runs of the images."""
    return prompts[i * len(prompts) // count]


def _runs(indices: list[int], key: Callable[[int], str]) -> list[list[int]]:
    """`indices` cut into runs of consecutive numbers with one key, CHUNK at most each."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and key(runs[-1][-1]) == key(i) and len(runs[-1]) < CHUNK:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
