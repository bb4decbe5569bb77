"""Training recipes of the shapes-world models, each from scratch with a fixed seed.

`studio world train --model vae|clip|evaluator|world-sd|world-dit` runs one; the shipped weights in
assets/world/ came from these functions. Order: vae, clip, evaluator (judges VAE round trips),
then the backbones (they use the VAE and the CLIP text tower).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from studio.home import atomic_path
from studio.world import ASSETS
from studio.world.captions import MAX_TOKENS, world_tokenizer
from studio.world.data import render_set, to_tensor

Log = Callable[[str], None]


def _part(out: Path, name: str) -> Path:
    """A model trained earlier: the one in `out` when this run trains a set, else the shipped one."""
    return Path(out) / name if (Path(out) / name / "config.json").is_file() else ASSETS / name


def save_for_plain_loaders(model_or_pipe, folder: Path) -> None:
    """Save in the dtypes a plain `from_pretrained` with no dtype argument turns into one: diffusers
    models in fp16 (diffusers loads them in fp32 unless told otherwise: half the size on disk), transformers
    models in fp32 (transformers 5 keeps the file's dtype, and an fp16 text encoder beside an fp32 UNet
    fails with 'mat1 and mat2 must have the same dtype')."""
    import torch
    from diffusers import ModelMixin

    parts = getattr(model_or_pipe, "components", None) or {"": model_or_pipe}
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(torch.float16 if isinstance(part, ModelMixin) else torch.float32)
    model_or_pipe.save_pretrained(folder)


def _seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _batches(n_items: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n_items)
        for i in range(0, n_items - batch + 1, batch):
            yield order[i : i + batch]


def cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% (the multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class TrainLog:
    """Prints and appends JSON lines to `<out>/logs/<model>.jsonl`."""

    def __init__(self, out: Path, model: str, log: Log):
        self.path = Path(out) / "logs" / f"{model}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.start = time.monotonic()

    def __call__(self, **record: Any) -> None:
        record["minutes"] = round((time.monotonic() - self.start) / 60, 2)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


# ---------------------------------------------------------------------------------------------- VAE


def build_vae():
    """AutoencoderKL with an f=4 down-scale (64 px -> 16x16x4): f=8 lost the background patterns."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)


def train_vae(out: Path, *, steps: int = 1500, batch: int = 16, lr: float = 2e-3, seed: int = 0,
              log: Log = print) -> Path:
    """Reconstruction (MSE + 0.5 L1) with a light KL (1e-6); the decoder sees the latent mean."""
    import torch

    _seed_everything(seed)
    data = render_set(24000, seed=1)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    record = TrainLog(out, "vae", log)
    batches = _batches(len(data["images"]), batch, seed)
    for step in range(steps):
        x = to_tensor(data["images"][next(batches)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean()
        loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            record(step=step, loss=float(loss), kl=float(kl))
    vae.eval()
    with torch.no_grad():  # scale latents to unit variance, as SD's 0.18215 does
        latents = torch.cat([vae.encode(to_tensor(data["images"][i : i + 256])).latent_dist.mean
                             for i in range(0, 2048, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    folder = Path(out) / "vae"
    save_for_plain_loaders(vae, folder)
    record(done=str(folder), scaling_factor=vae.config.scaling_factor)
    return folder


MODELS: dict[str, Callable[..., Path]] = {"vae": train_vae}


# --------------------------------------------------------------------------------------------- CLIP

def build_clip(vocab_size: int):
    """A tiny CLIP: text 64 wide x 2 layers over 20 positions and the world's trimmed vocabulary; ViT
    patch 8 on 64 px, 64 wide x 2 layers."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=64)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, projection_dim=64)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def hard_negative_batches(labels: np.ndarray, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Batches made of groups that agree on every attribute but one, one image per value of that one.

    With random batches a caption is told apart from the others by shape and colour alone, and CLIP
    never learns the background words (the first world-sd then ignored them: 0.16 background accuracy).
    Shape and background, the attributes CLIP learns slowest, are the free one twice as often.
    """
    from studio.world.vocab import ATTRIBUTES, VALUES, base_values

    cycle = [ATTRIBUTES.index(a) for a in ("shape", "background", "colour", "position", "shape", "background", "size")]
    rng = np.random.default_rng(seed)
    group = 0
    while True:
        index: list[int] = []
        while len(index) < batch:
            free = cycle[group % len(cycle)]
            group += 1
            anchor = labels[rng.integers(len(labels))]
            others = [k for k in range(len(ATTRIBUTES)) if k != free]
            same = np.flatnonzero((labels[:, others] == anchor[others]).all(1))
            for value in base_values(ATTRIBUTES[free]):
                pool = same[labels[same, free] == VALUES[ATTRIBUTES[free]].index(value)]
                if len(pool) and len(index) < batch:
                    index.append(int(rng.choice(pool)))
        yield np.asarray(index)


def clip_zero_shot(clip, tokenizer, data: dict[str, np.ndarray], n: int = 500) -> dict[str, float]:
    """Per attribute: how often an image scores its own caption above the captions that change only
    that attribute (every other base value)."""
    import torch

    from studio.world.captions import caption
    from studio.world.data import labels_at
    from studio.world.vocab import ATTRIBUTES, Labels, base_values

    result = {}
    clip.eval()
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=to_tensor(data["images"][:n]))
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image), dim=-1)
        for attribute in ATTRIBUTES:
            values = base_values(attribute)
            texts = [caption(Labels(**{**labels_at(data, i).as_dict(), attribute: v}))
                     for i in range(n) for v in values]
            tokens = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
            text = clip.get_text_features(input_ids=tokens.input_ids)
            text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)
            scores = (text.view(n, len(values), -1) * image[:, None]).sum(-1)
            truth = torch.as_tensor([values.index(labels_at(data, i).as_dict()[attribute]) for i in range(n)])
            result[attribute] = float((scores.argmax(-1) == truth).float().mean())
    clip.train()
    return result


def _captions_of(data: dict[str, np.ndarray], index: np.ndarray, rng: np.random.Generator, *,
                 partial: float = 0.0) -> list[str]:
    """A template caption of each image, or with odds `partial` a partial one (`partial_caption`)."""
    from studio.world.captions import partial_caption, random_caption
    from studio.world.data import labels_at

    return [partial_caption(labels_at(data, int(i)), rng) if partial and rng.random() < partial
            else random_caption(labels_at(data, int(i)), rng) for i in index]


def train_clip(out: Path, *, steps: int = 3000, batch: int = 128, lr: float = 2e-3, seed: int = 0,
               log: Log = print) -> Path:
    """Contrastive image-caption training (CLIP's symmetric InfoNCE, transformers' `return_loss`) on
    hard-negative batches, logging zero-shot accuracy per attribute on held-back renders."""
    import torch
    from transformers import CLIPImageProcessor

    _seed_everything(seed)
    data = render_set(24000, seed=1)
    fresh = render_set(2000, seed=3)
    tokenizer = world_tokenizer()
    clip = build_clip(len(tokenizer))
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    record = TrainLog(out, "clip", log)
    rng = np.random.default_rng(seed)
    batches = hard_negative_batches(data["labels"], batch, seed)
    for step in range(steps):
        index = next(batches)
        tokens = tokenizer(_captions_of(data, index, rng), padding="max_length", max_length=MAX_TOKENS,
                           truncation=True, return_tensors="pt")
        loss = clip(input_ids=tokens.input_ids, pixel_values=to_tensor(data["images"][index]),
                    return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            record(step=step, loss=float(loss.detach()))
        if (step + 1) % 500 == 0 or step == steps - 1:
            record(step=step + 1, **{f"zero_shot_{k}": v for k, v in clip_zero_shot(clip, tokenizer, fresh).items()})
    folder = Path(out) / "world-clip"
    save_clip_parts(clip, tokenizer, folder)
    # images are scaled to [-1, 1] exactly as in training
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3, do_convert_rgb=True).save_pretrained(folder)
    record(done=str(folder))
    return folder


def save_clip_parts(clip, tokenizer, folder: Path) -> None:
    """The vision tower as CLIPVisionModelWithProjection (world-clip) and the text tower beside it."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    save_for_plain_loaders(vision, folder)
    text = CLIPTextModelWithProjection(clip.config.text_config)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    save_for_plain_loaders(text, Path(folder) / "text")
    tokenizer.save_pretrained(Path(folder) / "text")


MODELS["clip"] = train_clip


# ---------------------------------------------------------------------------------------- evaluator


def load_vae(folder: Path | None = None):
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder or ASSETS / "vae", dtype=torch.float32).eval()


def vae_roundtrip(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 images through encode (mean) and decode, back to uint8."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i : i + batch])
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def evaluator_accuracy(model, images: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    import torch

    from studio.world.vocab import ATTRIBUTES

    model.eval()
    with torch.no_grad():
        outs = [model(to_tensor(images[i : i + 256])) for i in range(0, len(images), 256)]
    model.train()
    result = {a: float((torch.cat([o[a] for o in outs]).argmax(-1).numpy() == labels[:, k]).mean())
              for k, a in enumerate(ATTRIBUTES)}
    pred = torch.cat([o["mask"] for o in outs]).numpy() > 0
    inter = (pred & masks).reshape(len(masks), -1).sum(1)
    union = np.maximum((pred | masks).reshape(len(masks), -1).sum(1), 1)
    result["mask_iou"] = float((inter / union).mean())
    return result


def generated_like_batch(data: dict[str, np.ndarray], index: np.ndarray, rng: np.random.Generator, *,
                         no_shape_share: float = 0.12, plain_share: float = 0.2) -> dict[str, np.ndarray]:
    """Training images for the evaluator from a `layer_set`: `plain_share` plain renders, the rest made to look
    generated, and `no_shape_share` images with no single clear shape in place of some. Returns images
    (B, 64, 64, 3) uint8, masks (B, 64, 64) bool, and targets (B, 5) as indices into `OUTCOMES`, -100 where
    nothing is known (the colour of an empty image; position and size where there is no shape)."""
    from studio.world.augment import generation_like, no_shape
    from studio.world.evaluator import OUTCOMES
    from studio.world.render import compose
    from studio.world.vocab import ATTRIBUTES, COLOURS, VALUES

    images, masks, targets = [], [], []
    colours = np.array([COLOURS[c] for c in VALUES["colour"]], dtype=np.float32) / 255
    for i in index:
        target = data["labels"][i].copy()
        if rng.random() < no_shape_share:
            image, alpha, known = no_shape(rng)
            target[:] = -100
            target[ATTRIBUTES.index("shape")] = OUTCOMES["shape"].index("none")
            for attribute, value in known.items():
                if value is not None:
                    target[ATTRIBUTES.index(attribute)] = OUTCOMES[attribute].index(value)
        else:
            background = data["backgrounds"][i].astype(np.float32) / 255
            alpha = data["alphas"][i].astype(np.float32)
            colour = colours[target[ATTRIBUTES.index("colour")]]
            if rng.random() < plain_share:
                image = compose(background, alpha, colour)
            else:
                image, alpha = generation_like(background, alpha, colour, rng)
        images.append(image)
        masks.append(alpha > 0.5)
        targets.append(target)
    return {"images": np.stack(images), "masks": np.stack(masks), "targets": np.stack(targets)}


POOL_VERSION = 1  # of generated_like_batch and its augmentations: bump when they change


def generated_like_pool(vae, n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` evaluator training images from `generated_like_batch` over a `layer_set` of `n` renders, half of
    them passed through the world VAE, made once per (n, seed) and cached: a VAE round trip per image and
    step would cost more than the evaluator's own training."""
    from studio.home import cache_dir
    from studio.world.data import layer_set

    path = cache_dir("world") / f"evaluator-pool-v{POOL_VERSION}-{n}-{seed}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in cached.files}
    data = layer_set(n, seed=seed, held_out=True)
    rng = np.random.default_rng(seed)
    parts = [generated_like_batch(data, np.arange(i, min(i + 512, n)), rng) for i in range(0, n, 512)]
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    trip = np.flatnonzero(rng.random(n) < 0.5)
    pool["images"][trip] = vae_roundtrip(vae, pool["images"][trip])
    with atomic_path(path) as tmp:
        np.savez(tmp, **pool)
    return pool


def train_evaluator(out: Path, *, vae_folder: Path | None = None, steps: int = 2000, batch: int = 64,
                    lr: float = 1e-3, seed: int = 0, log: Log = print) -> Path:
    """Cross-entropy per attribute + BCE on the mask, over renders with every value (held-out too) made to
    look generated and images with no single clear shape (`generated_like_pool`: 24,000, half of them VAE
    round trips), all with Gaussian noise of sigma up to 0.05."""
    import torch

    from studio.world.evaluator import OUTCOMES, WorldEvaluator
    from studio.world.vocab import ATTRIBUTES

    _seed_everything(seed)
    vae = load_vae(vae_folder or _part(out, "vae"))
    pool = generated_like_pool(vae, 24000, seed=2)
    fresh = render_set(2000, seed=3, held_out=True)
    fresh_trips = vae_roundtrip(vae, fresh["images"])
    model = WorldEvaluator(values=OUTCOMES)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    record = TrainLog(out, "evaluator", log)
    batches = _batches(len(pool["images"]), batch, seed)
    targets = torch.from_numpy(pool["targets"])
    masks = torch.from_numpy(pool["masks"]).float()
    for step in range(steps):
        index = next(batches)
        x = to_tensor(pool["images"][index])
        x = x + torch.randn_like(x) * torch.rand(len(index), 1, 1, 1) * 0.05
        out_ = model(x)
        loss = sum(torch.nn.functional.cross_entropy(out_[a], targets[index, k], ignore_index=-100)
                   for k, a in enumerate(ATTRIBUTES))
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out_["mask"], masks[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            acc = evaluator_accuracy(model, fresh_trips[:500], fresh["labels"][:500], fresh["masks"][:500])
            record(step=step, loss=float(loss.detach()), **{f"roundtrip_{k}": v for k, v in acc.items()})
    model.eval()
    for name, images in (("fresh", fresh["images"]), ("roundtrip", fresh_trips)):
        record(final=name, **evaluator_accuracy(model, images, fresh["labels"], fresh["masks"]))
    folder = Path(out) / "evaluator"
    save_for_plain_loaders(model, folder)
    record(done=str(folder))
    return folder


MODELS["evaluator"] = train_evaluator


# ------------------------------------------------------------------------------------------ world-sd


def text_encoder_from_clip(folder: Path | None = None, *, with_projection: bool = False):
    """world-clip's text tower as CLIPTextModel (SD1 layout) or CLIPTextModelWithProjection (SD3)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection.from_pretrained(Path(folder or ASSETS / "world-clip") / "text",
                                                       dtype=torch.float32)
    if with_projection:
        return text.eval()
    plain = CLIPTextModel(text.config)
    (plain.text_model if hasattr(plain, "text_model") else plain).load_state_dict(text.text_model.state_dict())
    return plain.eval()


def build_world_unet():
    """4 M parameters over 16x16x4 latents: channels 32/64/128, cross-attention at 8x8 and 4x4 only
    (attention at 16x16 doubled the step time on this CPU: 1.1 s against 0.5 s at batch 32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                                layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def world_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def encode_latents(vae, images: np.ndarray, batch: int = 256):
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean
                          for i in range(0, len(images), batch)]) * vae.config.scaling_factor


def checkpoint_folder(out: Path, name: str) -> Path:
    """Where training world model `name` into `out` keeps its checkpoint (a rerun resumes from it)."""
    return Path(out) / f"checkpoint-{name}"


def _checkpoint(path: Path, model, opt, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    with atomic_path(path / "optimizer.pt") as tmp:
        torch.save(opt.state_dict(), tmp)  # tensors only: reloaded with weights_only=True
    (path / "step.json").write_text(json.dumps({"step": step}))


def _resume(path: Path, model, opt) -> int:
    import torch
    from safetensors.torch import load_file

    if not (path / "step.json").is_file():
        return 0
    model.load_state_dict(load_file(path / "model.safetensors"))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "step.json").read_text())["step"]


def _run_record(checkpoint: Path, record: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` with another model or other settings than the run that wrote it (the
    step count may grow: a longer cosine from the last checkpoint, a warm restart), naming what differs."""
    from studio.errors import InvalidArgumentError

    path = checkpoint / "run.json"
    if (checkpoint / "step.json").is_file() and path.is_file():
        before = json.loads(path.read_text())
        differ = {k: (before.get(k), v) for k, v in record.items() if k != "steps" and before.get(k) != v}
        if differ:
            raise InvalidArgumentError(
                f"{checkpoint} holds a run with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differ.items())}); "
                f"resume with those settings, or train into another --out. Nothing was changed.")
    checkpoint.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _train_backbone(out: Path, name: str, build: Callable[[], Any], make_pipeline: Callable[..., Any],
                    objective_cls: type, *, steps: int, batch: int, lr: float, seed: int, eval_every: int,
                    log: Log, init: Path | None = None, partial: float = 0.0, warmup: int = 50) -> Path:
    """The loop both world backbones share: the world VAE, the model `build()` makes inside the
    pipeline `make_pipeline(model, out, vae=...)`, the family's training objective; latents of 24,000
    renders cached once, 10% caption dropout and a `partial` share of partial captions (`partial_caption`:
    "a blue square"), AdamW with warm-up and cosine decay, gradient clipping at 1, a checkpoint every 500
    steps (a rerun with the same settings resumes from `<out>/checkpoint-<name>`, another model or other
    settings are refused), and prompt fidelity every `eval_every` steps; the log gives an ETA. `init`: a
    trained backbone folder of this model to start from (a fine-tune), instead of random weights."""
    import torch

    part = None
    if init is not None:  # checked before anything is written
        from studio.errors import InvalidArgumentError

        part = next((Path(init) / c for c in ("unet", "transformer") if (Path(init) / c / "config.json").is_file()), None)
        if part is None:
            raise InvalidArgumentError(f"--init {init}: not a diffusers backbone folder (no unet/ or transformer/ "
                                       f"with a config.json); give a trained {name} folder, e.g. assets/world/{name}.")
    checkpoint = checkpoint_folder(out, name)
    resuming = (checkpoint / "step.json").is_file()
    _run_record(checkpoint, {"model": name, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                             "init": str(init) if init else None, "partial": partial, "warmup": warmup})
    _seed_everything(seed)
    vae = load_vae(_part(out, "vae"))
    model = build()
    if part is not None and not resuming:  # a resumed fine-tune reads its checkpoint instead
        model.load_state_dict(type(model).from_pretrained(part).state_dict())
    pipe = make_pipeline(model, out, vae=vae)
    objective = objective_cls(pipe)
    _seed_everything(seed)
    data = render_set(24000, seed=1)
    latents = encode_latents(vae, data["images"])  # (N, 4, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    start = _resume(checkpoint, model, opt)
    for _ in range(start):
        sched.step()
    record = TrainLog(out, name, log)
    rng = np.random.default_rng([seed, start])
    batches = _batches(len(latents), batch, seed + start)
    model.train()
    last = (time.monotonic(), start)  # the ETA reads the pace since the last log line (a paused run recovers)
    for step in range(start, steps):
        index = next(batches)
        captions = ["" if rng.random() < 0.1 else c for c in _captions_of(data, index, rng, partial=partial)]
        with torch.no_grad():
            conditioning = objective.encode(captions)
        loss = objective.loss(model, latents[index], **conditioning)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            now = time.monotonic()
            per_step = (now - last[0]) / (step + 1 - last[1])
            last = (now, step + 1)
            record(step=step, of=steps, loss=float(loss.detach()), lr=sched.get_last_lr()[0],
                   eta_minutes=round(per_step * (steps - step - 1) / 60, 1))
        if (step + 1) % 500 == 0 or step + 1 == steps:
            _checkpoint(checkpoint, model, opt, step + 1)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            try:
                from studio.world.fidelity import fidelity

                record(step=step + 1, **fidelity(pipe, n=48)["accuracy"])
            except Exception as error:  # the evaluator may not exist yet on a first run
                record(step=step + 1, fidelity_skipped=str(error)[:80])
            model.train()
    folder = Path(out) / name
    save_for_plain_loaders(pipe, folder)
    record(done=str(folder))
    return folder


def train_world_sd(out: Path, *, steps: int = 3500, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                   eval_every: int = 1000, log: Log = print, **options: Any) -> Path:
    """A UNet from scratch on a frozen world-clip text tower: eps-prediction on SD's scaled-linear
    betas (DDPM training, DDIM sampling). `options`: init, partial, warmup (`_train_backbone`)."""
    from studio.training.objectives import NoisePrediction

    return _train_backbone(out, "world-sd", build_world_unet, world_sd_pipeline, NoisePrediction, steps=steps,
                           batch=batch, lr=lr, seed=seed, eval_every=eval_every, log=log, **options)


def world_sd_pipeline(unet, out: Path, *, vae=None, text_encoder=None):
    """world-sd around a UNet: the world VAE, world-clip's text tower (loaded unless given), its
    tokenizer and DDIM."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae or load_vae(_part(out, "vae")),
                                   text_encoder=text_encoder or text_encoder_from_clip(_part(out, "world-clip")),
                                   tokenizer=world_tokenizer(), unet=unet.eval(), scheduler=world_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_world_sd(unet, out: Path, checkpoint: Path | None = None) -> Path:
    """Write `<out>/world-sd` (`save_for_plain_loaders`); with `checkpoint`, from that training checkpoint's UNet."""
    from safetensors.torch import load_file

    if checkpoint is not None:
        unet = build_world_unet()
        unet.load_state_dict(load_file(Path(checkpoint) / "model.safetensors"))
    folder = Path(out) / "world-sd"
    save_for_plain_loaders(world_sd_pipeline(unet, out), folder)
    return folder


MODELS["world-sd"] = train_world_sd


# ----------------------------------------------------------------------------------------- world-dit


def build_world_transformer():
    """SD3's MMDiT at 3.6 M parameters: 16x16x4 latents in 2x2 patches (64 image tokens), 6 joint
    blocks 128 wide, conditioned on both CLIP towers' hidden states (64 + 64 = 128) and pooled outputs."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                 caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=32)


def world_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # 64 px needs no shift


def world_dit_pipeline(transformer, out: Path, *, vae=None, text_encoder=None):
    """world-dit around a transformer: SD3's layout with world-clip's text tower as both CLIP encoders
    (SD3 pairs CLIP-L and CLIP-G; one tiny tower in both slots keeps the layout) and no T5."""
    from diffusers import StableDiffusion3Pipeline

    vae = vae or load_vae(_part(out, "vae"))
    vae.register_to_config(shift_factor=0.0)  # SD3's decode reads a shift; the world latents have none
    text_encoder = text_encoder or text_encoder_from_clip(_part(out, "world-clip"), with_projection=True)
    tokenizer = world_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=world_flow_scheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_world_dit(out: Path, *, steps: int = 4000, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                    eval_every: int = 1000, log: Log = print, **options: Any) -> Path:
    """An MMDiT from scratch with rectified flow as SD3 trains: x_t = (1 - s) x0 + s noise, velocity
    target noise - x0, s drawn logit-normal(0, 1). Prompts are encoded by the pipeline itself, with as
    many zero T5 tokens as CLIP tokens (see pipelines/dit.py), so training and sampling match exactly.
    The shipped one ran these 4,000 steps, then again with steps=8000 on the same `out`: it resumes from
    the checkpoint on the 8,000-step cosine (a warm restart; shape accuracy 0.84 -> 0.93, README)."""

    from studio.training.objectives import RectifiedFlow

    return _train_backbone(out, "world-dit", build_world_transformer, world_dit_pipeline, RectifiedFlow, steps=steps,
                           batch=batch, lr=lr, seed=seed, eval_every=eval_every, log=log, **options)


MODELS["world-dit"] = train_world_dit
