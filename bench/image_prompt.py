"""Image prompts on the shapes world: an IP-Adapter trained on world-sd, measured by the evaluator.

1. Train (or reuse, `--adapter`) an IP-Adapter on renders without captions (the MW test of
   METHODS.md): each image is its own prompt.
2. Image only: an empty prompt and a held-out reference; how often the output has the reference's
   shape, colour and background (goal >= 0.80 each).
3. Image + text (InstantStyle): the text names another shape and colour; with the image routed to the
   style layers only, the background should follow the image and shape/colour the text (>= 0.80), the
   reference's shape leaking in <= 0.15, beside routing to every layer; with content subtraction too.
4. B-LoRA: two looks learned by two B-LoRAs, then the content half of one with the style half of the
   other; training-free style injection with a reference, by weight.
5. `--sweep`: each cross-attention layer (world-dit: each transformer block) alone, to find which carry
   style (background) and which content (shape): what `ROUTES` in adapters/ip_adapter.py says.
6. Speed, side by side in one run: studio's generation against diffusers' own `load_ip_adapter` path on
   the same components, file, reference and seed (time ratio, pixel difference); a training step of
   studio's trainer against a plain diffusers loop (VAE, image and text encoders each step).

    .venv/bin/python bench/image_prompt.py --steps 3000          # ~25 min on 2 CPU cores
    .venv/bin/python bench/image_prompt.py --adapter out/ip.safetensors --sweep
    .venv/bin/python bench/image_prompt.py --backbone world-dit --only ip --sweep   # ~20 min

`--backbone world-dit` runs 1-3, 5 and 6 on world-dit (SD3 IP-Adapter layout; no content subtraction
there: its adapter reads patch features).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from studio.pipelines import StudioPipeline

from studio.world.evaluator import load_evaluator, predict
from studio.world.folder import write_reference_folder
from studio.world.render import render, sample_labels
from studio.world.vocab import Labels, base_values

# with text beside the image: λ 0.8 and half the content words' embedding subtracted (InstantStyle's
# 0.5-0.8), from the sweeps of λ (0.8-3) and scale (0.3-1) in the README
TEXT_WEIGHT, CONTENT_SCALE = 0.8, 0.5
RECIPE = dict(kind="ip_adapter", batch=32, lr=1e-3, weight_decay=0.01, buckets=False, checkpoint_every=10**6)
# world-dit favours noisy steps (where shape is decided): image-only shape 0.20 -> 0.31 (README)
BACKBONE_RECIPE = {"world-sd": {}, "world-dit": dict(timestep_bias="content")}


def train_adapter(out: Path, *, refs: int, steps: int, seed: int = 7, backbone: str = "world-sd") -> Path:
    from studio.training.trainer import TrainConfig, train

    folder = out / "refs"  # the same renders for either backbone
    if not folder.exists():
        write_reference_folder(folder, n=refs, seed=seed)
        for caption in folder.glob("*.txt"):  # no captions: the image is the whole prompt
            caption.unlink()
    name = "ip.safetensors" if backbone == "world-sd" else f"ip-{backbone}.safetensors"
    config = TrainConfig(folder=str(folder), out=str(out / name), steps=steps, backbone=backbone,
                         **RECIPE, **BACKBONE_RECIPE[backbone])
    start = time.monotonic()
    path = train(config, progress=lambda s, total, loss: print(f"  step {s}/{total} loss {loss:.4f}", flush=True)
                 if s % max(1, total // 10) == 0 else None)
    print(f"trained {path} in {(time.monotonic() - start) / 60:.1f} min")
    return path


def references(n: int, seed: int) -> list[tuple[Any, Labels]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = sample_labels(rng)
        image, _ = render(labels, seed=int(rng.integers(2**31)))
        out.append((image, labels))
    return out


def other(value: str, attribute: str, rng: np.random.Generator) -> str:
    return str(rng.choice([v for v in base_values(attribute) if v != value]))


def run_prompts(pipeline: StudioPipeline, adapter: Any, refs: list[tuple[Any, Labels]], prompts: list[str], *,
                routing: Any = "all", weight: float = 1.0, content: list[str] | None = None, steps: int = 20,
                seed: int = 100) -> list[dict[str, str]]:
    """One image per reference (its own prompt), evaluator's reading of each."""
    images = []
    for i, ((image, _), prompt) in enumerate(zip(refs, prompts, strict=True)):
        inputs = {"content": content[i], "content_scale": CONTENT_SCALE} if content else {}
        pipeline.attach(adapter, weight, image=image, routing=routing, **inputs)
        images += pipeline.generate(prompt, seed=seed + i, steps=steps).images
        pipeline.detach(adapter)
    predicted = predict(images, evaluator=EVALUATOR)
    return [{a: predicted[a][i] for a in ("shape", "colour", "background", "position")} for i in range(len(images))]


def rate(pairs: list[tuple[str, str]]) -> float:
    return sum(a == b for a, b in pairs) / len(pairs)


def image_only(pipeline, adapter, refs, **options) -> dict[str, float]:
    seen = run_prompts(pipeline, adapter, refs, [""] * len(refs), **options)
    return {a: rate([(s[a], getattr(r, a)) for s, (_, r) in zip(seen, refs, strict=True)])
            for a in ("shape", "colour", "background")}


def with_text(pipeline, adapter, refs, *, seed: int, subtract: bool = False, **options) -> dict[str, float]:
    """The text names another shape and colour than the reference's (and no background or position)."""
    rng = np.random.default_rng(seed)
    wanted = [(other(r.shape, "shape", rng), other(r.colour, "colour", rng)) for _, r in refs]
    prompts = [f"a {colour} {shape}" for shape, colour in wanted]
    content = [f"a {r.colour} {r.shape}" for _, r in refs] if subtract else None
    seen = run_prompts(pipeline, adapter, refs, prompts, content=content, **options)
    return {"background (image)": rate([(s["background"], r.background) for s, (_, r) in zip(seen, refs, strict=True)]),
            "position (image)": rate([(s["position"], r.position) for s, (_, r) in zip(seen, refs, strict=True)]),
            "shape (text)": rate([(s["shape"], w[0]) for s, w in zip(seen, wanted, strict=True)]),
            "colour (text)": rate([(s["colour"], w[1]) for s, w in zip(seen, wanted, strict=True)]),
            "shape leak": rate([(s["shape"], r.shape) for s, (_, r) in zip(seen, refs, strict=True)]),
            "colour leak": rate([(s["colour"], r.colour) for s, (_, r) in zip(seen, refs, strict=True)])}


def layers(unet) -> list[tuple[str, Any]]:
    """Each cross-attention layer as a diffusers scale dict that routes the image there only (a DiT: each
    transformer block as {index: 1})."""
    if hasattr(unet, "transformer_blocks"):
        return [(f"transformer_blocks.{i}", {i: 1.0}) for i in range(len(unet.transformer_blocks))]
    out = []
    for group, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for b, block in enumerate(blocks):
            count = len(getattr(block, "attentions", []))
            for j in range(count):
                out.append((f"{group}_blocks.{b}.attentions.{j}",
                            {group: {f"block_{b}": [1.0 if k == j else 0.0 for k in range(count)]}}))
    out.append(("mid_block.attentions.0", {"mid": 1.0}))
    return out


def table(rows: list[tuple[str, dict[str, float]]]) -> None:
    columns = list(rows[0][1])
    print("| setting | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---" for _ in columns) + " |")
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |")


def speed_dit(adapter_path: Path, reference: Any, *, repeats: int = 5, steps: int = 20) -> None:
    """world-dit: studio vs diffusers' StableDiffusion3Pipeline.load_ip_adapter, same file, reference and
    seed."""
    from diffusers import StableDiffusion3Pipeline

    plain = _plain(StableDiffusion3Pipeline, "world-dit", adapter_path, text_encoder_3=None, tokenizer_3=None)
    pipeline = StudioPipeline("world-dit")
    pipeline.attach(adapter_path, 1.0, image=reference)
    side = pipeline.backbone.default_size

    def ours():
        return pipeline.generate("a red circle", seed=5, steps=steps, guidance=7.0).images[0]

    def theirs():
        return plain("a red circle", ip_adapter_image=reference, num_inference_steps=steps, guidance_scale=7.0,
                     width=side, height=side, max_sequence_length=20, generator=[torch.Generator().manual_seed(5)],
                     negative_prompt="").images[0]

    s, d, a, b = _side_by_side(ours, theirs, repeats)
    print(f"\nworld-dit generation, {steps} steps, CFG 7, median of {repeats}: studio {s:.3f} s, diffusers "
          f"load_ip_adapter {d:.3f} s, ratio {s / d:.3f}; max pixel difference {int(np.abs(a - b).max())}")


def _plain(cls: Any, backbone: str, adapter_path: Path, **components: Any) -> Any:
    """A plain diffusers pipeline of a world backbone with world-clip, the adapter file loaded by
    diffusers' own `load_ip_adapter` at scale 1."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from studio.world.models import world_folder

    clip = world_folder("world-clip")
    plain = cls.from_pretrained(world_folder(backbone), image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip),
                                feature_extractor=CLIPImageProcessor.from_pretrained(clip), **components)
    plain.load_ip_adapter(str(adapter_path.parent), subfolder="", weight_name=adapter_path.name,
                          image_encoder_folder=None)
    plain.set_ip_adapter_scale(1.0)
    return plain


def _side_by_side(ours, theirs, repeats: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    times: dict[str, list[float]] = {"studio": [], "diffusers": []}
    images = {}
    for _ in range(repeats):
        for name, call in (("studio", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            images[name] = call()
            times[name].append(time.perf_counter() - start)
    a, b = (np.asarray(images[k], dtype=np.int16) for k in ("studio", "diffusers"))
    return statistics.median(times["studio"]), statistics.median(times["diffusers"]), a, b


def speed(adapter_path: Path, reference: Any, *, repeats: int = 5, steps: int = 20) -> None:
    """studio vs diffusers' load_ip_adapter on the same components, file, reference and seed."""
    from diffusers import StableDiffusionPipeline

    plain = _plain(StableDiffusionPipeline, "world-sd", adapter_path, safety_checker=None)
    pipeline = StudioPipeline("world-sd")
    pipeline.attach(adapter_path, 1.0, image=reference)

    def ours():
        return pipeline.generate("a red circle", seed=5, steps=steps, scheduler="ddim").images[0]

    def theirs():
        return plain("a red circle", ip_adapter_image=reference, num_inference_steps=steps, guidance_scale=7.0,
                     generator=[torch.Generator("cpu").manual_seed(5)]).images[0]

    s, d, a, b = _side_by_side(ours, theirs, repeats)
    print(f"\ngeneration, {steps} DDIM steps, CFG 7, median of {repeats}: studio {s:.3f} s, diffusers "
          f"load_ip_adapter {d:.3f} s, ratio {s / d:.3f}; max pixel difference {int(np.abs(a - b).max())}")


def training_speed(folder: Path, *, steps: int = 20, batch: int = 32) -> None:
    """Seconds per step: studio's trainer (latents and embeddings cached) vs a plain diffusers loop."""
    from diffusers import DDPMScheduler
    from PIL import Image
    from studio.adapters.ip_adapter import IpAdapter, IpAdapterConfig, install_encoder, split_official

    from studio.backbones import load_backbone
    from studio.training.trainer import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        seconds: list[float] = []
        last = [time.monotonic()]

        def tick(step, total, loss):
            now = time.monotonic()
            if step > 2:  # past the first steps' warm-up
                seconds.append(now - last[0])
            last[0] = now

        train(TrainConfig(folder=str(folder), out=f"{tmp}/speed.safetensors", steps=steps, **RECIPE), progress=tick,
              log=lambda _: None)
    ours = statistics.median(seconds)

    backbone = load_backbone("world-sd")
    pipe, unet = backbone.pipe, backbone.denoiser
    adapter = IpAdapter.create(backbone, IpAdapterConfig(family="sd1"))
    install_encoder(backbone)
    unet._load_ip_adapter_weights([split_official(adapter.tensors)], low_cpu_mem_usage=False)
    unet.requires_grad_(False)
    params = list(unet.encoder_hid_proj.parameters()) + [p for n, p in unet.named_parameters() if "_ip." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(folder.glob("*.png"))
    times = []
    for step in range(steps):
        start = time.monotonic()
        picked = [files[i] for i in np.random.default_rng(step).choice(len(files), batch)]
        images = [Image.open(f).convert("RGB") for f in picked]
        pixels = pipe.image_processor.preprocess(images)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            embeds = pipe.image_encoder(pipe.feature_extractor(images, return_tensors="pt").pixel_values).image_embeds
            text = pipe.encode_prompt([""] * batch, "cpu", 1, False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        prediction = unet(noise_schedule.add_noise(latents, noise, t), t, encoder_hidden_states=text,
                          added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step > 2:
            times.append(time.monotonic() - start)
    theirs = statistics.median(times)
    print(f"training step, batch {batch}: studio {ours:.3f} s, plain diffusers loop {theirs:.3f} s "
          f"(ratio {ours / theirs:.2f})")


# two looks for B-LoRA: each adapter learns one from 12 renders captioned only "sks"
LOOKS = {"a": dict(shape="triangle", colour="green", background="grid"),
         "b": dict(shape="cross", colour="pink", background="stripes")}
BLORA = dict(kind="blora", rank=8, steps=300, batch=8, lr=5e-3, lr_schedule="cosine", warmup=20, checkpoint_every=10**6)


def blora(out: Path, *, n: int, seed: int) -> None:
    """Content of one B-LoRA with the style of the other: the content's shape and colour, the style's
    background (goal >= 0.75 each), beside each B-LoRA whole."""
    from studio.training.trainer import TrainConfig, train

    paths = {}
    for name, look in LOOKS.items():
        folder = out / f"blora-{name}" / "10_sks"
        if not folder.exists():
            write_reference_folder(folder, n=12, seed=11, **look)
            for caption in folder.glob("*.txt"):  # the folder's words ("sks") become every caption
                caption.unlink()
        paths[name] = out / f"blora-{name}.safetensors"
        if not paths[name].exists():
            train(TrainConfig(folder=str(folder.parent), out=str(paths[name]), **BLORA), log=lambda _: None)
    pipeline = StudioPipeline("world-sd")
    rows = []
    for label, parts in (("a whole", (("a", "both"),)), ("b whole", (("b", "both"),)),
                         ("content a + style b", (("a", "content"), ("b", "style"))),
                         ("content b + style a", (("b", "content"), ("a", "style")))):
        for name, part in parts:
            pipeline.attach(str(paths[name]), 1.0, part=part)
        images = pipeline.generate("sks", n=n, seed=seed, steps=20).images
        pipeline.detach()
        seen = predict(images, evaluator=EVALUATOR)
        content = LOOKS[parts[0][0]]
        style = LOOKS[parts[-1][0]]
        rows.append((label, {"shape (content)": _share(seen["shape"], content["shape"]),
                             "colour (content)": _share(seen["colour"], content["colour"]),
                             "background (style)": _share(seen["background"], style["background"])}))
    print(f"\nB-LoRA: {LOOKS['a']} and {LOOKS['b']}, 12 renders each captioned 'sks', {BLORA['steps']} steps; "
          f"prompt 'sks', {n} samples\n")
    table(rows)


def injection(refs: list[tuple[Any, Labels]], *, seed: int) -> None:
    """Training-free style injection: the text names another shape and colour; how often the reference's
    background comes through, by weight and layers."""
    from studio.adapters.style import StyleInjection, StyleInjectionConfig

    pipeline = StudioPipeline("world-sd")
    rows = []
    for layers, weight in (("up", 0.0), ("up", 1.0), ("all", 1.0), ("all", 4.0)):
        injected = StyleInjection.create(pipeline.backbone, StyleInjectionConfig(family="sd1", layers=layers))
        rng = np.random.default_rng(seed)
        wanted = [(other(r.shape, "shape", rng), other(r.colour, "colour", rng)) for _, r in refs]
        images = []
        for i, ((image, _), (shape, colour)) in enumerate(zip(refs, wanted, strict=True)):
            pipeline.attach(injected, weight, image=image)
            images += pipeline.generate(f"a {colour} {shape}", seed=100 + i, steps=20).images
            pipeline.detach()
        seen = predict(images, evaluator=EVALUATOR)
        rows.append((f"layers {layers}, weight {weight:g}",
                     {"background (image)": rate(list(zip(seen["background"], [r.background for _, r in refs], strict=True))),
                      "shape (text)": rate(list(zip(seen["shape"], [w[0] for w in wanted], strict=True))),
                      "colour (text)": rate(list(zip(seen["colour"], [w[1] for w in wanted], strict=True)))}))
    print("\nstyle injection (DDIM-inverted reference, shared self-attention, AdaIN)\n")
    table(rows)


def _share(values: list[str], wanted: str) -> float:
    return sum(v == wanted for v in values) / len(values)


EVALUATOR = None


def main() -> None:
    global EVALUATOR
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, help="a trained IP-Adapter for --backbone (default: train one)")
    parser.add_argument("--backbone", choices=["world-sd", "world-dit"], default="world-sd")
    parser.add_argument("--out", type=Path, default=Path("out/bench-image-prompt"))
    parser.add_argument("--refs", type=int, default=2000, help="training renders")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--n", type=int, default=64, help="references per measurement")
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--sweep", action="store_true", help="each cross-attention layer alone")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--only", choices=["ip", "blora", "injection"], help="one part only")
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
    EVALUATOR = load_evaluator()
    if args.only in (None, "injection"):
        injection(references(args.n, args.seed), seed=args.seed)
    if args.only in (None, "blora"):
        blora(args.out, n=args.n, seed=args.seed)
    if args.only in ("blora", "injection"):
        return
    path = args.adapter or train_adapter(args.out, refs=args.refs, steps=args.steps, backbone=args.backbone)
    pipeline = StudioPipeline(args.backbone)
    dit = args.backbone == "world-dit"
    from studio.adapters.base import load_adapter
    from studio.adapters.ip_adapter import ROUTES

    adapter = load_adapter(path, pipeline.backbone)
    refs = references(args.n, args.seed)
    print(f"\n{args.backbone}: {args.n} held-out references, one image each, 20 steps, CFG "
          f"{pipeline.backbone.family.guidance:g} (its default)\n")
    table([("image only, empty prompt, all layers", image_only(pipeline, adapter, refs))])
    print()
    rows = [("text only (λ 0: the base model)", with_text(pipeline, adapter, refs, seed=args.seed, weight=0.0))]
    rows += [(f"text + image λ {TEXT_WEIGHT}, routing {r}{' + content subtraction' if sub else ''}",
              with_text(pipeline, adapter, refs, seed=args.seed, routing=r, subtract=sub, weight=TEXT_WEIGHT))
             for r, sub in (("all", False), ("all", True), ("style", False), ("style", True), ("layout", False))
             if not (sub and dit) and (r == "all" or r in ROUTES[args.backbone])]
    table(rows)
    if args.sweep:
        print("\none layer at a time (text names another shape and colour)\n")
        table([(name, with_text(pipeline, adapter, refs, seed=args.seed, routing=route))
               for name, route in layers(pipeline.backbone.denoiser)])
    if not args.skip_speed and dit:
        speed_dit(Path(path), refs[0][0])
    elif not args.skip_speed:
        speed(Path(path), refs[0][0])
        training_speed(Path(path).parent / "refs" if (Path(path).parent / "refs").is_dir() else _speed_folder(args.out))


def _speed_folder(out: Path) -> Path:
    folder = out / "speed-refs"
    if not folder.exists():
        write_reference_folder(folder, n=64, seed=3)
    return folder


if __name__ == "__main__":
    main()
