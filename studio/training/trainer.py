"""One trainer loop for every weight-space adapter kind, from a reference folder to an adapter file.

accelerate carries precision (fp16/bf16 autocast on GPUs), gradient accumulation and clipping;
studio adds what a folder-to-adapter run needs around it: kohya folder conventions, buckets, cached
latents and text conditioning, prior preservation, checkpoints that a killed run resumes from,
sample images, a JSONL log and a loss plot.

Files beside `out` (e.g. `sks.safetensors`): `sks.checkpoint/` (the resumable state),
`sks.log.jsonl`, `sks.loss.png` and `sks.samples/`.

Under `accelerate launch` (or torchrun) one run spans the processes: each takes its slice of every batch
(the noise drawn as one process would draw it), the gradients are averaged, and the first process writes
the files; the adapter equals the one-process run's (tests/test_scale_out.py).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from studio import faults
from studio.errors import InvalidArgumentError, StudioError
from studio.training import recipes
from studio.training.objectives import check_loss_weighting, check_timestep_bias

Progress = Callable[[int, int, float], None]  # (step done, total steps, loss)
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
PRIOR_TARGETS = ("images", "backbone")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings to typed values, as a YAML recipe would give them, except that `1e-2` is a
    number (YAML 1.1 reads it as text)."""
    import yaml

    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(f"{item!r} is not KEY=VALUE (e.g. lr=1e-3).")
        value = yaml.safe_load(text)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        result[key.strip()] = value
    return result


SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirrored(caption: str) -> str:
    """`caption` of the mirrored image: "left" and "right" trade places, in the case they were written."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return SIDES.sub(swap, caption)


def processes() -> tuple[int, int]:
    """(this process's rank, how many processes) of a run started by `accelerate launch` or torchrun (they set
    RANK and WORLD_SIZE); (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _quiet(line: str) -> None:
    """The log of every process but the first."""


def _first_process_first(world: int):
    """The first process runs the block, then the others (accelerate's barrier); nothing to wait for alone."""
    if world == 1:
        from contextlib import nullcontext

        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


class TrainingError(StudioError, RuntimeError):
    """A training run that cannot go on (e.g. the loss became NaN)."""


class TrainingCancelled(TrainingError):
    """The run was asked to stop; its checkpoint is saved and `resume=True` continues it."""


def _kind_keywords(cls: type) -> type:
    """`cls` (TrainConfig) also takes a kind's options flat, by keyword (rank=8, concept_slots=4: each is declared
    on its kind's config field); they reach __post_init__ as `keywords`, which routes them into `adapter`."""
    init = cls.__init__
    own = {f.name for f in fields(cls)}

    @functools.wraps(init)
    def __init__(self, **options: Any) -> None:
        flat = [name for name in options if name not in own and name in recipes.option_keywords()]
        keywords = {name: options.pop(name) for name in flat}
        init(self, **options, keywords=keywords)

    cls.__init__ = __init__
    return cls


@_kind_keywords
@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs; YAML/TOML recipes load into it and unknown keys raise."""

    folder: str
    out: str
    kind: str = "lora"  # a trainable kind or an alias of one (dora: a LoRA with dora=True)
    backbone: str | None = None  # default: the embedded world-sd
    # the recipe (studio.training.recipes): a variant of the backbone's and kind's ("quality") or a full name
    # ("sdxl/lora@quality"); every option left None below takes its value, and the name resolved is kept here
    recipe: str | None = None
    # the kind's own options by its config's names ({"rank": 8}), on top of the recipe's `adapter:`; the kind's
    # config class declares them (`studio.adapters.base.option`) and completes or refuses them before any model
    # loads (`prepare_training_options`). Each is also a flat keyword, given or read: rank=8, config.concept_slots
    adapter: dict[str, Any] = field(default_factory=dict)
    keywords: InitVar[dict[str, Any] | None] = None  # those flat keywords (the class decorator fills it)
    trigger: str = ""
    # --- training options (None: the recipe's; studio/recipes/defaults.yaml holds every one)
    steps: int | None = None
    batch: int | None = None  # clipped to the number of training examples when the folder has fewer
    lr: float | None = None
    # LoRA+ (Hayou et al. 2024; kohya's loraplus_lr_ratio): B, the output side, learns this many times
    # faster than A; 1 = plain LoRA. Orthogonal adapters train B only, so there it scales the lr
    loraplus_ratio: float | None = None
    lr_schedule: str | None = None  # constant | constant_with_warmup | cosine | linear
    warmup: int | None = None
    weight_decay: float | None = None
    optimizer: str | None = None  # adamw | adamw8bit (bitsandbytes, CUDA)
    grad_accumulation: int | None = None
    max_grad_norm: float | None = None
    precision: str | None = None  # auto | no | fp16 | bf16
    gradient_checkpointing: bool | None = None
    size: int | None = None  # bucket area = size^2; default: the backbone's default size
    buckets: bool | None = None
    # mirrored copies (cached too); "auto": only when the references' masks match their own mirror images
    # (a star: yes, a crescent: no, images without masks: no, as kohya, diffusers and ai-toolkit default)
    flip: bool | str | None = None
    # a mirrored copy's caption says the other side ("left" <-> "right"), so it stays true of its image;
    # False where those words are not sides
    flip_sides: bool | None = None
    caption_dropout: float | None = None  # ControlNet's paper: 0.5
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting for noise-prediction families (kohya/diffusers: 5)
    timestep_bias: str | None = None  # none | content (favour noisy steps: shapes, layout) | style (nearly clean ones)
    loss_weighting: str | None = None  # rectified flow: none (velocity error) | x0 (diffusers' SD3 script: x s^2)
    # masked loss (kohya's masked_loss, ai-toolkit's masks): the loss is a weighted mean over latent pixels,
    # 1 on each image's mask (NAME.mask.png or its alpha), mask_floor elsewhere, so a small subject is not
    # drowned by its background; images without a mask weigh every pixel the same
    masked_loss: bool | None = None
    mask_floor: float | None = None
    reg_folder: str | None = None  # prior preservation images (their captions name the class)
    prior_weight: float | None = None
    # what the prior images are trained towards: "images" (DreamBooth: the noise that made them, as any
    # training image) or "backbone" (the backbone's own prediction on them, adapter off: the change the adapter
    # makes to prompts it should leave alone, measured directly, as ai-toolkit's output preservation)
    prior_target: str | None = None
    # DreamBooth's class images (diffusers' train_dreambooth way): `class_images` images of `class_prompt` (one
    # prompt, or several taken in turn) drawn by the backbone itself, cached by backbone, prompts and seed, and
    # trained as prior preservation (with reg_folder's, if any)
    class_prompt: str | list[str] | None = None
    class_images: int | None = None
    # trigger anchoring: the training captions with the trigger phrase swapped for made-up words must give
    # the backbone's own prediction (adapter off), so the adapter answers its trigger and not any unfamiliar
    # word; adapters trained apart then stop drawing their concept on each other's prompts, which is what a
    # merge sums (README, Merging). Costs one more forward and backward pass per step
    anchor_weight: float | None = None
    anchor_phrase: str = ""  # the words swapped; default: the trigger and the word after it ("sks star")
    anchor_variants: int | None = None  # made-up swaps per training caption
    # pivotal tuning (diffusers' advanced DreamBooth script; the concept token Orthogonal Adaptation trains): the
    # trigger becomes `tokens` new token vectors that train with the adapter at `token_lr` and are saved in its
    # file (studio.concept_tokens); 0 = off, the trigger stays the word the text encoder already had
    tokens: int | None = None
    token_lr: float | None = None
    checkpoint_every: int | None = None
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    seed: int = 0
    device: str | None = None
    name: str = ""

    def __post_init__(self, keywords: dict[str, Any] | None):
        asked = self.kind
        recipes.config_class(asked)  # an unknown kind raises, naming the kinds
        given, unknown = recipes.kind_section(asked, self.adapter, keywords)
        if unknown:
            own = recipes.adapter_options(asked)
            raise InvalidArgumentError(f"{', '.join(f'{n}={v!r}' for n, v in unknown.items())}: not an option of kind "
                                       f"{asked!r} (its options: {', '.join(sorted(own)) or 'none'}); leave "
                                       f"{'them' if len(unknown) > 1 else 'it'} out.")
        given_prompt, given_count, given_tokens = self.class_prompt, self.class_images, self.tokens
        # resolved here, so the manifest and a checkpoint record what the run used
        recipe = recipes.resolve(self.backbone, asked, self.recipe)
        for name, value in recipe.train.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.kind, self.recipe = recipe.kind, recipe.name
        self.adapter = {**recipe.adapter, **{k: v for k, v in given.items() if v is not None}}
        if isinstance(self.class_prompt, str):
            self.class_prompt = [self.class_prompt]
        for name in ("steps", "batch", "grad_accumulation", "checkpoint_every", "anchor_variants"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 1.")
        self._check_class_options(given_prompt, given_count)
        if not self.lr > 0:
            raise InvalidArgumentError(f"lr={self.lr!r} must be > 0 (e.g. 1e-4).")
        if not self.loraplus_ratio >= 1:
            raise InvalidArgumentError(f"loraplus_ratio={self.loraplus_ratio!r} must be >= 1 (1 = plain LoRA, "
                                       f"LoRA+ uses 4 to 16).")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidArgumentError(f"lr_schedule={self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise InvalidArgumentError(f"snr_gamma={self.snr_gamma!r} must be > 0 (e.g. 5), or None for plain MSE.")
        check_timestep_bias(self.timestep_bias)
        check_loss_weighting(self.loss_weighting)
        if self.flip not in (True, False, "auto"):
            raise InvalidArgumentError(f"flip={self.flip!r}; choose true, false or auto (mirrored copies only of "
                                       f"references whose masks are mirror-symmetric).")
        if not 0 <= self.mask_floor <= 1:
            raise InvalidArgumentError(f"mask_floor={self.mask_floor!r} must be in [0, 1] (the background's loss weight).")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise InvalidArgumentError(f"tokens={self.tokens!r} must be a whole number >= 0 (0 = off, e.g. 2).")
        if self.tokens and not self.trigger:
            from studio.training.data import folder_trigger

            self.trigger = folder_trigger(self.folder)  # kohya's "10_sks": the trigger is sks
            if not self.trigger and given_tokens is None:
                self.tokens = 0  # the recipe's pivotal tokens need a trigger word; the run logs it
        if self.tokens and not self.trigger:
            raise InvalidArgumentError("tokens > 0 learns the trigger word as new tokens: set trigger (e.g. "
                                       "trigger='sks').")
        if not self.token_lr > 0:
            raise InvalidArgumentError(f"token_lr={self.token_lr!r} must be > 0 (e.g. 1e-3).")
        if self.prior_target not in PRIOR_TARGETS:
            raise InvalidArgumentError(f"prior_target={self.prior_target!r}; choose {' or '.join(PRIOR_TARGETS)} (the "
                                       f"prior images' target: the images themselves, or the backbone's prediction).")
        if not self.anchor_weight >= 0:
            raise InvalidArgumentError(f"anchor_weight={self.anchor_weight!r} must be >= 0 (0 = off, e.g. 1).")
        if self.anchor_weight and not (self.anchor_phrase or self.trigger):
            raise InvalidArgumentError("anchor_weight > 0 needs the words the adapter must answer: set trigger "
                                       "(e.g. trigger='sks') or anchor_phrase (e.g. 'sks star').")
        if not 0 <= self.caption_dropout < 1:
            raise InvalidArgumentError(f"caption_dropout={self.caption_dropout!r} must be in [0, 1).")
        if self.precision not in ("auto", "no", "fp16", "bf16"):
            raise InvalidArgumentError(f"precision={self.precision!r}; choose auto, no, fp16 or bf16.")
        recipes.config_class(self.kind).prepare_training_options(self.adapter, self)

    def __getattr__(self, name: str) -> Any:
        """A kind's option read flat, by its keyword (config.rank, config.concept_seed): its value in `adapter`;
        None where it is not set or the kind has no such option."""
        if not name.startswith("__") and "adapter" in self.__dict__:
            option = recipes.kind_options(self.kind).get(name)
            if option or name in recipes.option_keywords():
                return self.adapter.get(option.name) if option else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _check_class_options(self, given_prompt: Any, given_count: Any) -> None:
        """Prior preservation's options, as given and as the recipe filled them: a count is whole and >= 0; a class
        prompt given with a count of 0 is refused, a count given without any class prompt too. A recipe's count
        without a class prompt (sd1/lora: 200) waits for the user's class: it is off until one is given."""
        if given_prompt and given_count is None and not self.class_images:
            self.class_images = 100  # diffusers' train_dreambooth default (num_class_images)
        count = self.class_images
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgumentError(f"class_images={count!r} must be a whole number >= 0 (e.g. 200).")
        if given_prompt and count == 0:
            raise InvalidArgumentError(f"class_prompt={self.class_prompt!r} with class_images=0 draws nothing: set "
                                       f"class_images (e.g. 200) or leave class_prompt out.")
        if count and not self.class_prompt:
            if given_count:
                raise InvalidArgumentError(f"class_images={count} needs the class to draw: set class_prompt "
                                           f"(e.g. --class-prompt 'a photo of a dog').")
            self.class_images = 0
        if not self.class_images:
            self.class_prompt = []  # off (a recipe's prompts with class_images=0 given)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A YAML or TOML recipe (keys = these fields), with `overrides` on top."""
        return cls(**{**cls.read_recipe(path), **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def read_recipe(cls, path: str | Path) -> dict[str, Any]:
        """A YAML or TOML recipe's options (unknown keys raise)."""
        import tomllib
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(f"recipe {str(path)!r} cannot be read ({getattr(error, 'strerror', None) or error}); "
                                       f"give a YAML or TOML file of TrainConfig keys.") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
            where = " ".join(str(error).split())[:200]
            raise InvalidArgumentError(f"recipe {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'} "
                                       f"({where}); fix the file.") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"recipe {str(path)!r} must be a mapping of option: value.")
        known = {f.name for f in fields(cls)} | recipes.option_keywords()
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"recipe {str(path)!r} has unknown keys {unknown}; known keys: {sorted(known)}.")
        return data

    def paths(self) -> dict[str, Path]:
        return run_paths(self.out)


def run_paths(out: str | Path) -> dict[str, Path]:
    """The files a training run of `out` writes beside it: the output, its checkpoint, log, loss plot and samples."""
    out = Path(out)
    stem = out.with_suffix("")
    return {"out": out, "checkpoint": Path(f"{stem}.checkpoint"), "log": Path(f"{stem}.log.jsonl"),
            "plot": Path(f"{stem}.loss.png"), "samples": Path(f"{stem}.samples")}


def kind_config(config: TrainConfig, backbone: Any):
    """The adapter kind's own config from the run's `adapter` section (options it leaves out take the config's
    defaults)."""
    return recipes.config_class(config.kind)(
        family=backbone.family.name, base=backbone.source, name=config.name or Path(config.out).stem,
        trigger_words=[config.trigger] if config.trigger else [], **config.adapter)


class Run:
    """A prepared run: data encoded, adapter attached; `step()` trains one step."""

    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] = print):
        import torch

        from studio.adapters.base import adapter_kinds
        from studio.adapters.lora import without
        from studio.backbones import load_backbone
        from studio.concept_tokens import TrainableTokens
        from studio.training.data import LatentCache, buckets, check_size, scan_folder
        from studio.training.objectives import objective_for

        self.config = config
        self.rank, self.world = processes()
        self.log = log if self.rank == 0 else _quiet  # one process speaks for the run
        self.paths = config.paths()
        device = config.device
        if self.world > 1:
            from accelerate import PartialState

            if config.batch % self.world:
                raise InvalidArgumentError(f"batch={config.batch} does not split over {self.world} processes; use a "
                                           f"multiple of {self.world} (each process trains on batch / {self.world}).")
            device = device or str(PartialState().device)  # joins the process group: gloo on CPUs, NCCL on GPUs
        self.backbone = load_backbone(config.backbone, device=device)
        backbone = self.backbone
        size = check_size(config.size or backbone.default_size, backbone.size_factor)
        self.scan = scan_folder(config.folder, trigger=config.trigger, min_size=size)
        for path, why in self.scan.skipped:
            self.log(f"skipped {path}: {why}")
        self.reg = scan_folder(config.reg_folder, min_size=size, regularisation=True) if config.reg_folder else None
        if config.class_images:
            from studio.training.class_images import class_images

            with _first_process_first(self.world):  # one process draws them, the others read its folder
                drawn = scan_folder(class_images(backbone, config.class_prompt, config.class_images, seed=config.seed,
                                                 log=self.log), min_size=size, regularisation=True)
            if self.reg is not None:
                drawn.items = self.reg.items + drawn.items
            self.reg = drawn
        self.flip = self._flip(config.flip)
        if not (config.tokens or config.trigger) and recipes.resolve(config.backbone, config.kind, config.recipe).train.get("tokens"):
            self.log(f"pivotal tokens off: recipe {config.recipe} learns the trigger word as tokens, but no trigger "
                     f"was given (--trigger WORD, or a kohya folder N_WORD) and the adapter trains without one")
        sided = [i.caption for i in self.scan.items if SIDES.search(i.caption)] if self.flip else []
        if sided:
            self.log(f"flip: {len(sided)} captions name a side (e.g. {sided[0]!r}); " +
                ("their mirrored copies say the other side" if config.flip_sides else
                 "flip_sides is off, so their mirrored copies contradict them"))
        choices = buckets(size, backbone.size_factor) if config.buckets else [(size, size)]
        self.objective = objective_for(backbone, snr_gamma=config.snr_gamma, timestep_bias=config.timestep_bias,
                                       loss_weighting=config.loss_weighting)
        self.objective.shard = (self.rank, self.world)
        self.cache = LatentCache(backbone)
        with _first_process_first(self.world):  # the others then read its latent cache instead of racing it
            self._prepare_data(config, size, choices)
        instances = sum(not e["item"].regularisation for e in self.examples)
        # a folder smaller than the batch trains on batches of the whole folder (processes keep their split)
        self.batch_size = min(config.batch, max(1, instances)) if self.world == 1 else config.batch
        if self.batch_size < config.batch:
            self.log(f"batch {config.batch} clipped to {self.batch_size}: the folder gives {instances} training "
                     f"examples")
        self.adapter = adapter_kinds().get_or_raise(config.kind).create(backbone, kind_config(config, backbone),
                                                                 seed=config.seed)
        self.adapter.attach(backbone, 1.0)
        note = self.adapter.training_note(backbone, config.trigger)
        if note:
            self.log(note)
        with _first_process_first(self.world):
            if "image_embeds" in self.adapter.example_inputs:  # the image read as its own prompt (IP-Adapter)
                self._encode_references()
            if "control" in self.adapter.example_inputs:  # each image's control map (ControlNet, T2I-Adapter)
                self._encode_conditions()
        self.concept = (TrainableTokens(backbone, self.adapter.name, config.trigger, config.tokens)
                        if config.tokens else None)
        self.distil_prior = config.prior_target == "backbone" and any(e["item"].regularisation for e in self.examples)
        if self.anchors or self.distil_prior:  # the backbone's own prediction: anchoring's and the distilled prior's target
            self.reference = without(backbone, self.adapter)
        for part in (backbone.denoiser, *(m for n, m in backbone.pipe.components.items() if n.startswith("text_encoder")
                                         and m is not None)):
            part.requires_grad_(False)
        self.groups = self.adapter.trainable_parameters(backbone)
        if self.concept is not None:
            self.groups["tokens"] = self.concept.parameters()
        self.params = [p for params in self.groups.values() for p in params]
        if config.gradient_checkpointing and hasattr(backbone.denoiser, "enable_gradient_checkpointing"):
            backbone.denoiser.enable_gradient_checkpointing()
        self._setup_optimizer()
        self.step_done = 0
        self.losses: list[float] = []
        torch.manual_seed(config.seed)

    def _flip(self, asked: bool | str) -> bool:
        """Whether to add mirrored copies: as asked, or for "auto" only if the references' masks match their
        own mirror images (median IoU >= MIRROR_IOU; a mirrored crescent is another shape: it taught rings and
        blobs, README)."""
        import statistics

        from studio.training.data import MIRROR_IOU, mirror_iou

        if asked != "auto":
            return bool(asked)
        scores = [mirror_iou(i) for i in self.scan.items]
        if None in scores:
            self.log("flip auto: off (not every reference has a mask to check its symmetry; --flip forces it)")
            return False
        median = statistics.median(scores)
        self.log(f"flip auto: {'on' if median >= MIRROR_IOU else 'off'} (the references' masks match their mirror "
                 f"images at IoU {median:.2f}, median; {MIRROR_IOU} or more mirrors them)")
        return median >= MIRROR_IOU

    def _prepare_data(self, config: TrainConfig, size: int, choices: list[tuple[int, int]]) -> None:
        """The examples with their latents (and masks), the anchoring captions and the fixed conditioning."""
        from studio.concept_tokens import word
        from studio.training.data import bucket_of

        items = self.scan.items + (self.reg.items if self.reg else [])
        self.examples: list[dict[str, Any]] = []  # one per (item, flip)
        for item in items:
            bucket = bucket_of(item.size, choices)
            for flip in (False, True) if self.flip else (False,):
                caption = mirrored(item.caption) if flip and config.flip_sides else item.caption
                self.examples.append({"item": item, "bucket": bucket, "flip": flip, "caption": caption})
        self._encode_latents()
        if config.masked_loss:
            self._mask_weights()
        self.anchors = self._anchor_examples() if config.anchor_weight else []
        # fixed conditioning is cached; captions with a trigger that trains as tokens are encoded each step
        self.learned = word(config.trigger) if config.tokens else None
        captions = sorted({e["caption"] for e in self.examples + self.anchors} | {""})
        self.conditioning = ({c: self._conditioning(c) for c in captions if not self._live([c])}
                             if not config.text_encoder else {})

    # ------------------------------------------------------------------------------------- data

    def _encode_latents(self) -> None:
        from studio.training.data import encode_images

        for example in self.examples:
            example["key"] = f"{example['item'].sha256}|{example['bucket']}|{example['flip']}"
        cached = self._fill("latent", "latent", lambda e: e["key"], lambda images: encode_images(self.backbone, images), 8)
        self.log(f"{len(self.examples)} training examples ({cached} latents from the cache)")

    def _encode_references(self) -> None:
        """Each example's image embedding (the crop and flip its latent has), cached like the latents."""
        encoder = self.adapter.config.image_encoder or "default"
        cached = self._fill("image", "image_embeds", lambda e: f"{encoder}|{e['key']}",
                            lambda images: self.adapter.embed_images(self.backbone, images), 32)
        self.log(f"{len(self.examples)} image embeddings ({cached} from the cache)")

    def _encode_conditions(self) -> None:
        """Each example's control map (fitted like its latent), as the control model reads it, cached; images
        without a paired map are left out, and said."""
        from studio.adapters.control import control_map
        from studio.training.data import training_map

        condition = self.config.condition
        sources = {id(e): training_map(e["item"], condition) for e in self.examples}
        unpaired = sorted({str(e["item"].path) for e in self.examples if sources[id(e)][0] is None})
        if unpaired:
            self.log(f"skipped {len(unpaired)} images without a map in conditions/ (e.g. {unpaired[0]}): put "
                     f"conditions/NAME.png beside each image")
            self.examples = [e for e in self.examples if sources[id(e)][0] is not None]
            if not self.examples:
                raise InvalidArgumentError(f"condition=paired but no image in {self.config.folder!r} has its map in a "
                                           f"conditions/ folder beside it (conditions/NAME.png).")

        def open_map(example: dict[str, Any]) -> Any:
            path, preprocess = sources[id(example)]
            return control_map(path, preprocess, what=f"control map of {example['item'].path.name}")[0]

        cached = self._fill("control", "control", lambda e: f"{self.adapter.kind}|{condition}|{e['key']}",
                            lambda maps: self.adapter.condition_tensors(self.backbone, maps), 32, open_image=open_map)
        self.log(f"{len(self.examples)} control maps ({condition}; {cached} from the cache)")

    def _fill(self, kind: str, field: str, key_of: Callable[[dict[str, Any]], str],
              encode: Callable[[list[Any]], Any], chunk: int, open_image: Callable[[dict[str, Any]], Any] | None = None
              ) -> int:
        """Set `example[field]` on every example: from the cache, or `encode` of its fitted image (a chunk at a
        time, one bucket per call) then cached; returns how many came from the cache. `open_image`: what to fit
        instead of the example's image (its control map)."""
        from PIL import Image

        from studio.training.data import fit

        missing = []
        for example in self.examples:
            cached = self.cache.get(kind, key_of(example))
            if cached is None:
                missing.append(example)
            else:
                example[field] = cached[field]
        for i in range(0, len(missing), chunk):
            by_bucket: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for example in missing[i : i + chunk]:
                by_bucket.setdefault(example["bucket"], []).append(example)
            for bucket, group in by_bucket.items():
                images = []
                for example in group:
                    if open_image is not None:
                        images.append(fit(open_image(example), bucket, flip=example["flip"]))
                        continue
                    with Image.open(example["item"].path) as image:
                        images.append(fit(image, bucket, flip=example["flip"]))
                for example, value in zip(group, encode(images), strict=True):
                    example[field] = value
                    self.cache.put(kind, key_of(example), {field: value})
        return len(self.examples) - len(missing)

    def _mask_weights(self) -> None:
        from studio.training.data import mask_weights

        masked = 0
        for example in self.examples:
            item = example["item"]
            latent_size = tuple(example["latent"].shape[-2:])
            if item.mask is None:
                example["pixel_weights"] = example["latent"].new_ones((1, *latent_size))
            else:
                example["pixel_weights"] = mask_weights(item, example["bucket"], latent_size, flip=example["flip"],
                                                        floor=self.config.mask_floor)
                masked += 1
        self.log(f"masked loss: {masked} of {len(self.examples)} examples have a mask (background weight "
                 f"{self.config.mask_floor})")
        if not any(e["item"].mask is not None and not e["item"].regularisation for e in self.examples):
            self.log("masked loss is on but no training image has a mask (NAME.mask.png or an alpha channel): "
                     "every pixel weighs the same")

    def _anchor_examples(self) -> list[dict[str, Any]]:
        """Copies of the training examples whose caption has the anchor phrase (default: the trigger and
        the word after it) swapped for made-up words, `anchor_variants` each, drawn from the run's seed."""
        import random
        import string

        config = self.config
        phrase = (re.compile(r"\b" + r"\s+".join(map(re.escape, config.anchor_phrase.split())) + r"\b")
                  if config.anchor_phrase else re.compile(r"\b" + re.escape(config.trigger) + r"\b(\s+\w+)?"))
        rng = random.Random(config.seed)

        def made_up(match: re.Match) -> str:
            return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
                            for _ in match.group(0).split())

        anchors = [{**example, "caption": phrase.sub(made_up, example["caption"])}
                   for example in self.examples if not example["item"].regularisation
                   and phrase.search(example["caption"]) for _ in range(config.anchor_variants)]
        wanted = config.anchor_phrase or config.trigger
        if not anchors:
            raise InvalidArgumentError(f"anchor_weight is on but no training caption contains {wanted!r}; set "
                                       f"anchor_phrase to words the captions use, or anchor_weight=0.")
        self.log(f"anchoring: {len(anchors)} captions with {wanted!r} swapped for made-up words "
                 f"(e.g. {anchors[0]['caption']!r}) keep the backbone's own prediction, weight {config.anchor_weight}")
        return anchors

    def _conditioning(self, caption: str) -> dict[str, Any]:
        import torch

        cached = self.cache.get("text", caption)
        if cached is None:
            with torch.no_grad():
                cached = {k: v[0] for k, v in self.objective.encode([caption]).items()}
            self.cache.put("text", caption, cached)
        return cached

    def batch(self, step: int, regularisation: bool = False, anchor: bool = False) -> tuple[Any, dict[str, Any]] | None:
        """Step `step`'s batch: one bucket, `batch` examples, drawn from a generator seeded by the step
        (so a resumed run draws exactly what the uninterrupted one would); `anchor`: of the anchoring
        captions."""
        import numpy as np
        import torch

        drawn = self._draw(step, regularisation, anchor)
        if drawn is None:
            return None
        picked, captions = drawn
        embeds = None
        if "image_embeds" in picked[0]:  # an image prompt: the paper's text / image / both dropout
            rng = np.random.default_rng([self.config.seed, step, 3 + int(regularisation) + 2 * int(anchor)])
            embeds, captions = self.adapter.drop(rng, torch.stack([e["image_embeds"] for e in picked]), captions)
        conditioning = self._encode(captions)
        if embeds is not None:
            # (batch, 1 image, dim) as the UNet pipeline passes it; a DiT's patch features are (batch, tokens, dim)
            conditioning["image_embeds"] = embeds[:, None] if embeds.dim() == 2 else embeds
        if "control" in picked[0]:  # a control model's maps: the denoiser hook reads them (studio.adapters.control)
            conditioning["control"] = torch.stack([e["control"] for e in picked])
        if self.config.masked_loss and not anchor:  # not conditioning: the loss takes it as its own argument
            conditioning["pixel_weights"] = torch.stack([e["pixel_weights"] for e in picked])
        return torch.stack([e["latent"] for e in picked]), conditioning

    def _draw(self, step: int, regularisation: bool, anchor: bool) -> tuple[list[dict[str, Any]], list[str]] | None:
        """The examples of step `step`'s batch and their captions (caption dropout applied)."""
        import numpy as np

        pool = self.anchors if anchor else [e for e in self.examples if e["item"].regularisation == regularisation]
        if not pool:
            return None
        rng = np.random.default_rng([self.config.seed, step, 2 if anchor else int(regularisation)])
        weights = np.array([e["item"].repeats for e in pool], dtype=float)
        first = pool[rng.choice(len(pool), p=weights / weights.sum())]
        same = [i for i, e in enumerate(pool) if e["bucket"] == first["bucket"]]
        picked = [pool[i] for i in rng.choice(same, size=self.batch_size, replace=len(same) < self.batch_size,
                                              p=weights[same] / weights[same].sum())]
        return picked, ["" if not anchor and rng.random() < self.config.caption_dropout else e["caption"]
                        for e in picked]

    def _encode(self, captions: list[str]) -> dict[str, Any]:
        """The captions' conditioning: from the cache, or through the text encoders (with gradients into
        their adapter) when they train."""
        import torch

        from studio.concept_tokens import expand

        if self._live(captions):
            return self.objective.encode([expand(self.backbone, c) for c in captions])
        return {k: torch.stack([self.conditioning[c][k] for c in captions]) for k in self.conditioning[captions[0]]}

    def _live(self, captions: list[str]) -> bool:
        """Whether these captions' conditioning changes as training goes (text encoder or tokens training)."""
        return self.config.text_encoder or (self.learned is not None and any(self.learned.search(c) for c in captions))

    # ------------------------------------------------------------------------------- optimisation

    def _setup_optimizer(self) -> None:
        import torch
        from accelerate import Accelerator

        config = self.config
        device = self.backbone.device
        precision = config.precision
        if precision == "auto":
            precision = "no" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu",
                                       gradient_accumulation_steps=config.grad_accumulation)
        # kohya's alpha scales the forward pass of B by alpha / rank; B starts at zero and Adam's steps
        # do not depend on the gradient's scale, so that equals B's learning rate x alpha / rank.
        scale = (config.alpha / self.adapter.config.rank) if config.alpha else 1.0
        scale *= config.loraplus_ratio
        groups = [{"params": params, "lr": config.lr * (scale if name == "lora_B" else 1.0)} if name != "tokens"
                  else {"params": params, "lr": config.token_lr, "weight_decay": 0.0}
                  for name, params in self.groups.items()]
        optimizer_cls = torch.optim.AdamW
        if config.optimizer == "adamw8bit":
            try:
                import bitsandbytes

                optimizer_cls = bitsandbytes.optim.AdamW8bit
            except ImportError:
                self.log("bitsandbytes is not installed: using torch AdamW")
        elif config.optimizer != "adamw":
            raise InvalidArgumentError(f"optimizer={config.optimizer!r}; choose adamw or adamw8bit.")
        # torch picks the one-tensor-at-a-time AdamW off CUDA; the multi-tensor one is 6 % of a world-sd step faster
        extra = {"foreach": True} if optimizer_cls is torch.optim.AdamW else {}
        self.optimizer = optimizer_cls(groups, lr=config.lr, weight_decay=config.weight_decay, **extra)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        config = self.config
        if config.warmup and step < config.warmup:
            return (step + 1) / config.warmup
        if config.lr_schedule in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def step(self) -> float:
        """Train one optimizer step (with `grad_accumulation` micro-batches); returns the loss."""
        import torch

        step = self.step_done
        denoiser = self.backbone.denoiser
        if not denoiser.training:  # train() walks every module: 8 % of a world-sd step when called each time
            denoiser.train()
        total = 0.0
        for micro in range(self.config.grad_accumulation):
            torch.manual_seed((self.config.seed * 1_000_003 + step * 101 + micro) % 2**31)  # this exact step's noise
            at = step * self.config.grad_accumulation + micro
            x0, conditioning = self.batch(at)
            prior = None if self.distil_prior else self.batch(at, regularisation=True)
            with self.accelerator.autocast():
                if prior is None:
                    loss = self.objective.loss(denoiser, x0.to(self.backbone.device),
                                               **_to(conditioning, self.backbone))
                else:  # DreamBooth prior preservation (Ruiz et al. 2023): mean instance + weight x mean prior loss
                    loss = self._with_prior(denoiser, (x0, conditioning), prior)
                if self.distil_prior:  # prior_target backbone: the prior images keep the backbone's prediction
                    loss = loss + self.config.prior_weight * self._distilled(
                        denoiser, *self._draw(at, regularisation=True, anchor=False))
                if self.anchors:
                    loss = loss + self.config.anchor_weight * self._distilled(
                        denoiser, *self._draw(at, regularisation=False, anchor=True))
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {float(loss)} at step {step}; lower the learning rate "
                                    f"(lr={self.config.lr}) or use precision='no'.")
            self.accelerator.backward(loss / self.config.grad_accumulation)
            total += float(loss.detach()) / self.config.grad_accumulation
        if self.world > 1:
            total = self._average_gradients(total)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_done += 1
        self.losses.append(total)
        return total

    def _average_gradients(self, loss: float) -> float:
        """Every process's gradients (and loss) averaged in one all-reduce, so each takes the step one process
        would take on the whole batch. By hand rather than DDP's wrapper: the trained tensors sit in the denoiser,
        the text encoders, the token table or a control model run from a hook, which no one module holds."""
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return float(flat[-1])

    def _distilled(self, denoiser: Any, picked: list[dict[str, Any]], captions: list[str]) -> Any:
        """The distance, on the `picked` examples' noised latents with `captions`, to the backbone's own
        prediction (anchoring captions on training latents; prior images with prior_target backbone)."""
        import torch

        reference = None
        if self.config.text_encoder:  # the reference reads the captions through the text encoders without the adapter
            with torch.no_grad(), self.reference:
                reference = _to(self._encode(captions), self.backbone)
        x0 = torch.stack([e["latent"] for e in picked]).to(self.backbone.device)
        return self.objective.consistency(denoiser, x0, self.reference, reference_conditioning=reference,
                                          **_to(self._encode(captions), self.backbone))

    def _with_prior(self, denoiser: Any, instance: tuple[Any, dict[str, Any]], prior: tuple[Any, dict[str, Any]]):
        """Both batches in one forward pass when their shapes allow (as diffusers' DreamBooth scripts
        do: one larger batch is faster than two), else one pass each."""
        import torch

        device, weight = self.backbone.device, self.config.prior_weight
        (x0, cond), (px0, pcond) = instance, prior
        joinable = x0.shape[1:] == px0.shape[1:] and all(
            cond[k].shape[1:] == pcond[k].shape[1:] for k in cond)
        if not joinable:
            return (self.objective.loss(denoiser, x0.to(device), **_to(cond, self.backbone))
                    + weight * self.objective.loss(denoiser, px0.to(device), **_to(pcond, self.backbone)))
        n, m = len(x0), len(px0)
        weights = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), weight / m)]).to(device)
        joined = {k: torch.cat([cond[k], pcond[k]]) for k in cond}
        return self.objective.loss(denoiser, torch.cat([x0, px0]).to(device), sample_weights=weights,
                                   **_to(joined, self.backbone))

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """The adapter (its concept tokens too), the optimizer state, the step and the losses (`write_checkpoint`)."""
        from studio.concept_tokens import join

        self.adapter.sync_from(self.backbone)
        tensors = join(self.adapter.tensors, self.concept.values() if self.concept is not None else {})
        write_checkpoint(self.paths["checkpoint"], tensors, self.optimizer.state_dict(),
                         {"step": self.step_done, "losses": self.losses, "config": asdict(self.config)})

    def load_checkpoint(self) -> bool:
        """Continue from the checkpoint (or the one a kill left mid-swap); False when there is none."""
        from studio.concept_tokens import split

        found = read_checkpoint(self.paths["checkpoint"], asdict(self.config),
                                ignore=("steps", "checkpoint_every", "sample_every", "device"),
                                normalise=lambda saved: asdict(TrainConfig(**saved)))
        if found is None:
            return False
        tensors, optimizer, state = found
        weights, tokens = split(tensors)
        self.adapter.load_values(self.backbone, weights)
        if self.concept is not None:
            self.concept.load(tokens)
        self.optimizer.load_state_dict(optimizer)
        self.step_done = state["step"]
        self.losses = state["losses"]
        for _ in range(self.step_done):
            self.scheduler.step()
        return True

    # --------------------------------------------------------------------------------- outputs

    def samples(self) -> Path | None:
        """A row of sample images at the current step (adapter active), saved as one PNG."""
        from PIL import Image

        from studio.pipelines import StudioPipeline

        prompts = self.config.sample_prompts or [self.scan.items[0].caption]
        self.backbone.denoiser.eval()
        images = []
        for i, prompt in enumerate(prompts):
            images += StudioPipeline(self.backbone).generate(prompt, n=2, seed=self.config.seed + i, steps=20).images
        self.backbone.denoiser.train()
        folder = self.paths["samples"]
        folder.mkdir(parents=True, exist_ok=True)
        width, height = images[0].size
        sheet = Image.new("RGB", (width * len(images), height))
        for i, image in enumerate(images):
            sheet.paste(image, (i * width, 0))
        path = folder / f"step-{self.step_done:05d}.png"
        sheet.save(path)
        return path

    def finish(self) -> Path:
        """Write the adapter file (the training options in its manifest) and detach it."""
        self.adapter.sync_from(self.backbone)
        if self.concept is not None:
            self.adapter.tokens = self.concept.values()
            self.concept.close()
        self.adapter.detach(self.backbone)
        self.adapter.config.training = {k: v for k, v in asdict(self.config).items() if k not in ("device",)}
        if self.rank:  # the first process writes the run's files
            return self.paths["out"]
        path = self.adapter.save(self.paths["out"], overwrite=True)
        loss_plot(self.losses, self.paths["plot"])
        return path


def write_checkpoint(folder: Path, tensors: dict[str, Any], optimizer: dict[str, Any], state: dict[str, Any]) -> None:
    """A run's checkpoint (its trained tensors, the optimizer state, `state` as JSON), written so a kill at any
    moment leaves the previous checkpoint or the new one whole (NAME.checkpoint or, mid-swap, NAME.checkpoint.old),
    never half of one: each is written under another name and renamed into place, and renamed away before it is
    deleted. Every run loop's checkpoints (training, erasers) are these."""
    import torch
    from safetensors.torch import save_file

    tmp, old = folder.with_name(folder.name + ".tmp"), previous(folder)
    sweep(folder)
    discard(tmp)  # a save a kill cut short
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")  # tensors only: read with weights_only
    (tmp / "state.json").write_text(json.dumps(state, default=str))  # last: it marks tmp whole
    faults.point("checkpoint:written")
    if whole(folder):
        discard(old)  # left by a kill after the last swap
        folder.replace(old)
        faults.point("checkpoint:moved-old")
    tmp.replace(folder)
    faults.point("checkpoint:swapped")
    discard(old)


def read_checkpoint(folder: Path, options: dict[str, Any], *, ignore: tuple[str, ...] = (),
                    normalise: Callable[[dict[str, Any]], dict[str, Any]] = dict,
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """The latest whole checkpoint of `folder` (or the one a kill left mid-swap) as (tensors, optimizer state,
    state), None when there is none. It must be of a run with these `options` (`state["config"]`, read through
    `normalise`; the keys in `ignore` may differ): another run's checkpoint is refused, naming what changed."""
    import torch
    from safetensors.torch import load_file

    found = latest_checkpoint(folder)
    if found is None:
        return None
    state = json.loads((found / "state.json").read_text())
    mine, theirs = json.loads(json.dumps(options, default=str)), json.loads(json.dumps(normalise(state["config"]),
                                                                                        default=str))
    changed = [k for k in mine if k not in ignore and mine[k] != theirs.get(k)]
    if changed:
        raise InvalidArgumentError(f"the checkpoint in {str(found)!r} is of a run with other options "
                                   f"({', '.join(f'{k}: {theirs.get(k)!r} -> {mine[k]!r}' for k in changed)}); "
                                   f"resume with the same options or delete the checkpoint.")
    return (load_file(str(found / "adapter.safetensors")), torch.load(found / "optimizer.pt", weights_only=True),
            state)


def _to(conditioning: dict[str, Any], backbone: Any) -> dict[str, Any]:
    return {k: v.to(backbone.device) for k, v in conditioning.items()}


CHECKPOINT_FILES = ("adapter.safetensors", "optimizer.pt", "state.json")


def whole(folder: Path) -> bool:
    """A checkpoint folder with all its files (state.json is written last)."""
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def previous(folder: Path) -> Path:
    """Where a checkpoint's predecessor waits while the new one is swapped in (NAME.checkpoint.old)."""
    return folder.with_name(folder.name + ".old")


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run continues from: NAME.checkpoint, or NAME.checkpoint.old when a kill came mid-swap."""
    return next((f for f in (folder, previous(folder)) if whole(f)), None)


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it whole or gone: renamed out of the way
    first (one atomic step), then deleted; what a kill leaves mid-delete (NAME.trash-*) the next run sweeps."""
    if not folder.exists():
        return
    trash = folder.with_name(f"{folder.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    folder.replace(trash)
    _delete(trash)


def sweep(folder: Path) -> None:
    """Remove the trash a killed deletion left beside the checkpoint `folder`."""
    for trash in folder.parent.glob(f"{glob.escape(folder.name)}*.trash-*"):
        _delete(trash)


def drop_checkpoints(folder: Path) -> None:
    """A finished run's checkpoint, its predecessor and any trash, gone."""
    discard(folder)
    discard(previous(folder))
    sweep(folder)


def _delete(trash: Path) -> None:
    # shutil.rmtree, by hand only so a test can kill it between two files (faults.point): the folder was renamed
    # away first, so a deletion cut anywhere leaves trash the next run sweeps, never a half checkpoint
    for child in sorted(trash.iterdir()):
        if child.is_dir():
            _delete(child)
        else:
            child.unlink()
        faults.point("checkpoint:deleting")
    trash.rmdir()


def trim_log(path: Path, step: int) -> None:
    """Keep the log's records up to `step` (a resumed run writes the steps after it again)."""
    from studio.home import atomic_write_bytes

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line a kill cut in half
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def finished_output(config: TrainConfig) -> bool:
    """`config.out` is this very run's finished result (its manifest records the same options)."""
    return finished_record(config.paths()["out"], {k: v for k, v in asdict(config).items() if k != "device"},
                           normalise=lambda saved: asdict(TrainConfig(**saved)))


def finished_record(out: Path, options: dict[str, Any], *,
                    normalise: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> bool:
    """`out` is a finished adapter whose manifest's training record (read through `normalise`) is `options`."""
    if not out.exists():
        return False
    try:
        from studio.adapters.base import load_adapter

        recorded = normalise(load_adapter(out).config.training or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not a finished result
        return False
    recorded = {k: v for k, v in recorded.items() if k != "device"}
    return json.loads(json.dumps(recorded, default=str)) == json.loads(json.dumps(options, default=str))


def loss_plot(losses: list[float], path: Path, *, width: int = 640, height: int = 240) -> Path:
    """The loss per step (light) and its running mean (dark) as a PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if losses:
        smooth, mean = [], losses[0]
        for value in losses:
            mean = 0.9 * mean + 0.1 * value
            smooth.append(mean)
        top, bottom = max(losses), min(losses)
        span = (top - bottom) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            return 40 + i * (width - 50) / max(1, len(losses) - 1), 10 + (top - v) / span * (height - 40)

        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(180, 200, 240), width=1)
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
        draw.text((4, 4), f"{top:.3g}", fill="black")
        draw.text((4, height - 36), f"{bottom:.3g}", fill="black")
        draw.text((40, height - 18), f"loss over {len(losses)} steps", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def train(config: TrainConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None, log: Callable[[str], None] = print,
          should_stop: Callable[[], bool] | None = None, **options: Any) -> Path:
    """Train an adapter on a reference folder and write it; `studio.train(folder=..., out=..., kind=...)`.

    The output is checked before any model loads: its folder must take files, an existing output is refused
    unless `overwrite`, and one process at a time writes it (a second run of the same `out` is refused, naming
    the first). With `resume`, a run continues from its last checkpoint and finishes the same number of steps; a
    finished run (its output there, no checkpoint) is left as it is.
    `should_stop` is asked after every step: when it says yes, the run saves a checkpoint and raises
    `TrainingCancelled` (resume it later with `resume=True`)."""
    config = config or TrainConfig(**options)
    paths = config.paths()
    if processes()[0]:  # under `accelerate launch` the first process holds the output for the run
        return _train(config, paths, resume=resume, progress=progress, log=log, should_stop=should_stop)
    return supervise(paths, lambda resume: _train(config, paths, resume=resume, progress=progress, log=log,
                                                  should_stop=should_stop),
                     resume=resume, overwrite=overwrite, finished=lambda: finished_output(config), log=log)


def supervise(paths: dict[str, Path], work: Callable[[bool], Any], *, resume: bool, overwrite: bool,
              finished: Callable[[], bool], log: Callable[[str], None] = print) -> Any:
    """A run of `paths["out"]` held and checked around `work(resume)` (`run_loop`): the output is claimed first (its
    folder takes files, an existing one is refused unless `overwrite`, one process at a time), what a kill left is
    swept, a checkpoint beside an output that `finished()` says is this run's is dropped, an unfinished run is
    refused unless `resume`, and a finished one asked to resume is left as it is."""
    from studio.outputs import check_new, claim

    unfinished = latest_checkpoint(paths["checkpoint"]) is not None
    with claim(paths["out"], overwrite=overwrite, exists_ok=resume or unfinished):
        sweep(paths["checkpoint"])  # what a kill left mid-delete
        if unfinished and finished():  # a kill came between writing the output and the cleanup
            drop_checkpoints(paths["checkpoint"])
            log(f"{paths['out']} was finished; removed the checkpoint a kill left beside it")
            unfinished = False
            if not resume:
                check_new(paths["out"], overwrite=overwrite)
        if not resume and unfinished:
            raise InvalidArgumentError(f"{str(paths['checkpoint'])!r} holds an unfinished run; continue it with "
                                       f"resume=True (--resume) or delete that folder to start over.")
        if resume and not unfinished and paths["out"].exists():
            log(f"{paths['out']} is finished and has no checkpoint to resume; delete it to train again")
            return paths["out"]
        return work(resume)


def _train(config: TrainConfig, paths: dict[str, Path], *, resume: bool, progress: Progress | None,
           log: Callable[[str], None], should_stop: Callable[[], bool] | None) -> Path:
    return run_loop(Run(config, log=log), paths, steps=config.steps, checkpoint_every=config.checkpoint_every,
                    sample_every=config.sample_every, resume=resume, progress=progress, log=log,
                    should_stop=should_stop)


def run_loop(run: Any, paths: dict[str, Path] | None, *, steps: int, checkpoint_every: int, sample_every: int = 0,
             resume: bool = False, progress: Progress | None = None, log: Callable[[str], None] = print,
             should_stop: Callable[[], bool] | None = None) -> Any:
    """The one run loop of every trainable kind (training from a folder: `Run`; erasers:
    `studio.training.erasing.EraseRun`): steps with a JSONL log line each, progress, sample images, checkpoints
    every `checkpoint_every` steps, a stop asked by `should_stop` saved as a checkpoint (`TrainingCancelled`),
    resume from the last checkpoint; then the run's `finish()`. `run` gives `step()`, `step_done`, `rank`,
    `scheduler`, `save_checkpoint()`, `load_checkpoint()`, `samples()`, `finish()`, `log()`. Without `paths`
    (an eraser kept in memory) nothing is written until `finish`."""
    main = run.rank == 0  # in a multi-process run the others train their slices and write nothing
    if paths is not None and resume and run.load_checkpoint():
        run.log(f"resumed at step {run.step_done} of {steps}")
        if main:
            trim_log(paths["log"], run.step_done)
    elif paths is not None and main:
        paths["log"].unlink(missing_ok=True)  # a fresh run: not the log of one started over
    writes = paths is not None and main
    if writes:
        paths["log"].parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(paths["log"] if writes else os.devnull, "a") as handle:
        while run.step_done < steps:
            loss = run.step()
            step = run.step_done
            record = {"step": step, "loss": round(loss, 6), "lr": run.scheduler.get_last_lr()[0],
                      "seconds": round(time.monotonic() - start, 2)}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            if not main:
                continue
            if progress is not None:
                progress(step, steps, loss)
            if sample_every and step % sample_every == 0:
                run.samples()
            if paths is not None and step % checkpoint_every == 0 and step < steps:
                run.save_checkpoint()
            if should_stop is not None and step < steps and should_stop():
                if paths is None:
                    raise TrainingCancelled(f"cancelled at step {step} of {steps}; nothing was saved")
                run.save_checkpoint()
                raise TrainingCancelled(f"training of {str(paths['out'])!r} cancelled at step {step} of {steps}; "
                                        f"continue it with resume=True (--resume)")
    result = run.finish()
    if paths is not None and main:
        faults.point("finish:written")
        drop_checkpoints(paths["checkpoint"])
        log(f"wrote {paths['out']}")
    return result
