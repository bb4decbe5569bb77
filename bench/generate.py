"""StudioPipeline against the bare diffusers pipeline built from the same components, in one run.

Same seed, steps, sampler and size; the runs interleave so machine noise hits both alike. Prints,
per backbone, the median seconds of each, the median of the per-round ratios (paired, so slow drift
of the machine cancels; target <= 1.03), studio's own overhead timed alone, and the largest absolute
pixel difference (target 0).

    .venv/bin/python bench/generate.py                       # tiny backbones of every family
    .venv/bin/python bench/generate.py --backbone stabilityai/sdxl-turbo --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone

# The bare side names its samplers in plain diffusers terms, independent of studio's registry.
BARE_SAMPLERS = {
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
FAMILY_EXTRAS = {"pixart": {"use_resolution_binning": False, "clean_caption": False}}


def bare_pipeline(backbone):
    """The family's diffusers pipeline over the very same modules, with its own sampler object."""
    import diffusers

    bare = type(backbone.pipe)(**backbone.pipe.components)
    cls, options = BARE_SAMPLERS[backbone.family.scheduler]
    bare.scheduler = getattr(diffusers, cls).from_config(backbone.base_scheduler_config, **options)
    bare.set_progress_bar_config(disable=True)
    return bare


def bare_generate(bare, family, prompt, *, n, seed, steps, guidance, size):
    kwargs = dict(prompt=prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance,
                  width=size, height=size, output_type="pil",
                  generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)])
    if family != "flux":
        kwargs["negative_prompt"] = ""
    if family == "sd3" and bare.text_encoder_3 is None:  # as many zero T5 tokens as CLIP tokens
        kwargs["max_sequence_length"] = bare.tokenizer_max_length
    return bare(**kwargs, **FAMILY_EXTRAS.get(family, {})).images


def bench(source, *, n, steps, size, repeats):
    backbone = load_backbone(source)
    studio = StudioPipeline(backbone)
    bare = bare_pipeline(backbone)
    family = backbone.family.name
    size = size or backbone.default_size
    guidance = backbone.family.guidance
    prompt = "a red star on a dotted background, top left"
    ours_t, bare_t = [], []
    for r in range(repeats + 1):  # the first round warms caches and is not counted
        runs = {
            "ours": lambda seed=r: studio.generate(prompt, n=n, seed=seed, steps=steps, width=size,
                                                   height=size).images,
            "bare": lambda seed=r: bare_generate(bare, family, prompt, n=n, seed=seed, steps=steps,
                                                 guidance=guidance, size=size),
        }
        images, seconds = {}, {}
        for name in (("ours", "bare") if r % 2 else ("bare", "ours")):  # alternate who goes first
            start = time.perf_counter()
            images[name] = runs[name]()
            seconds[name] = time.perf_counter() - start
        if r:
            ours_t.append(seconds["ours"])
            bare_t.append(seconds["bare"])
        ours, theirs = images["ours"], images["bare"]
        diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                   for a, b in zip(ours, theirs, strict=True))
    ours_s, bare_s = statistics.median(ours_t), statistics.median(bare_t)
    # studio's own work around the diffusers call (checks, defaults, recipe), timed alone: the part of
    # the ratio that is not machine noise
    overhead = []
    for _ in range(50):
        start = time.perf_counter()
        studio.recipe(prompt, n=n, seed=0, steps=steps, width=size, height=size)
        backbone.scheduler(backbone.family.scheduler)
        overhead.append(time.perf_counter() - start)
    return {"backbone": source, "family": family, "size": size, "studio_s": ours_s, "diffusers_s": bare_s,
            "ratio": statistics.median(o / b for o, b in zip(ours_t, bare_t, strict=True)), "overhead_ms": 1000 * statistics.median(overhead), "max_abs_px": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", help="repeatable; default: tiny-<family> for all families")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="default: the backbone's own size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sources = args.backbone or [f"tiny-{f}" for f in ("sd1", "sd2", "sdxl", "sd3", "flux", "pixart")]
    print(f"n={args.n} steps={args.steps} repeats={args.repeats} threads={args.threads} "
          f"device={load_backbone(sources[0]).device}")
    print("| backbone | family | size | studio s | diffusers s | ratio (<= 1.03) | studio overhead ms "
          "| max abs px diff (0) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for source in sources:
        row = bench(source, n=args.n, steps=args.steps, size=args.size, repeats=args.repeats)
        print(f"| {row['backbone']} | {row['family']} | {row['size']} | {row['studio_s']:.3f} | "
              f"{row['diffusers_s']:.3f} | {row['ratio']:.3f} | {row['overhead_ms']:.2f} | {row['max_abs_px']} |",
              flush=True)


if __name__ == "__main__":
    main()
