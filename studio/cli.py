"""The `studio` command line. Heavy libraries load inside commands, so `studio --help` stays instant."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from studio.backbones import DEFAULT_BACKBONE, FAMILIES
from studio.errors import StudioError
from studio.progress import clock
from studio.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from studio.recipe import AdapterUse

app = typer.Typer(name="studio", help="Teach, steer, erase and merge diffusion-model adapters.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # help texts say "[default: X]"; rich markup would eat it
console = Console(stderr=True)
out_console = Console()

SchedulerName = Enum("SchedulerName", {name: name for name in SCHEDULERS}, type=str)
FamilyName = Enum("FamilyName", {name: name for name in FAMILIES}, type=str)

BackboneOpt = Annotated[str | None, typer.Option(
    "--backbone", "-b", help=f"Hub id, diffusers folder, .safetensors file or embedded name [default: {DEFAULT_BACKBONE}].")]
FamilyOpt = Annotated[FamilyName | None, typer.Option(help="Override the detected backbone family.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, mps or cpu [default: the first available].")]
DtypeOpt = Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 [default: fp32 on CPU, half on GPU].")]
ConfigOpt = Annotated[str | None, typer.Option(
    help="Diffusers folder/hub id whose configs build a single-file checkpoint (no download needed).")]


def main() -> None:
    """Entry point: run the app, turning StudioErrors into one clear line and exit code 2."""
    try:
        app()
    except StudioError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)


def _outputs_first(paths: list[Path], overwrite: bool) -> None:
    """Every output can be written and is new (or --overwrite): checked before any model loads."""
    from studio.outputs import check_new, check_writable

    for path in paths:
        check_new(check_writable(path), overwrite=overwrite)


def _value(option: Enum | None) -> str | None:
    return option.value if option is not None else None


def _load_pipeline(backbone: str | None, family: Enum | None, device: str | None, dtype: str | None,
                   config: str | None):
    from studio.pipelines import StudioPipeline

    with console.status(f"loading {backbone or DEFAULT_BACKBONE}..."):
        return StudioPipeline(backbone, family=_value(family), device=device, dtype=dtype, config=config)


def _adapter_uses(specs: list[str] | None, allow_partial: bool) -> list[AdapterUse]:
    """`FILE[:WEIGHT][@PART]` specs, in order; WEIGHT is a number or block weights, PART a B-LoRA's half
    (content or style)."""
    from studio.blocks import parse_weight
    from studio.recipe import AdapterUse

    uses = []
    for spec in specs or []:
        inputs = {}
        if "@" in spec and not Path(spec).exists():
            spec, _, inputs["part"] = spec.rpartition("@")
        path, weight = spec, 1.0
        head, _, tail = spec.rpartition(":")
        if head and not Path(spec).exists():
            path, weight = head, parse_weight(tail, what=f"--adapter {spec!r}: the weight after ':'")
        uses.append(AdapterUse(path, weight, inputs, allow_partial=allow_partial))
    return uses


def _image_prompt_uses(backbone, images: list[Path] | None, adapter: Path | None, scale: float, style_only: bool,
                       layout_only: bool, content: str | None, encoder: str | None) -> list[AdapterUse]:
    """--ip-image and its options: the IP-Adapter (given, or the backbone's own) with those references."""
    from studio.adapters.ip_adapter import image_prompt_use
    from studio.errors import InvalidArgumentError

    if not images:
        if adapter or style_only or layout_only or content:
            raise InvalidArgumentError("--ip-adapter, --style-only, --layout-only and --ip-content steer an image "
                                       "prompt: add --ip-image REFERENCE.png.")
        return []
    routing = "+".join(name for name, on in (("style", style_only), ("layout", layout_only)) if on) or "all"
    return [image_prompt_use(backbone, images, scale, routing=routing, content=content or "", adapter=adapter,
                             encoder=encoder)]


def _control_uses(backbone, specs: list[str] | None, preprocess: str | None, end: float) -> list[AdapterUse]:
    """--control KIND:IMAGE[:SCALE] specs, in order: KIND is controlnet or t2i_adapter (the backbone's own model:
    world-sd ships both) or a control model folder."""
    from studio.adapters.control import control_use
    from studio.errors import InvalidArgumentError

    uses = []
    for spec in specs or []:
        parts = spec.split(":")
        scale = 1.0
        if len(parts) >= 3:
            try:
                scale = float(parts[-1])
                parts = parts[:-1]
            except ValueError:
                pass
        if len(parts) < 2:
            raise InvalidArgumentError(f"--control {spec!r} must be KIND:IMAGE[:SCALE] (KIND: controlnet, t2i_adapter "
                                       f"or a control model folder), e.g. controlnet:edges.png:0.8.")
        uses.append(control_use(backbone, parts[0], ":".join(parts[1:]), scale, preprocess=preprocess, end=end))
    return uses


def _style_image_uses(backbone, image: Path | None, weight: float) -> list[AdapterUse]:
    """--style-image: a training-free style injection with that reference."""
    from studio.adapters.style import style_use

    return [] if image is None else [style_use(backbone, image, weight)]


class JobProgress:
    """A long job's progress with its ETA: a live bar on a terminal; written to a file or a pipe, one line per
    10 % (`studio erase ... > log` shows where it is)."""

    def __init__(self, label: str, total: int | None = None, *, fields: tuple[str, ...] = ()):
        self.label, self.total, self.fields = label, total, fields
        self.bar = None
        self.task = None
        self.next_tenth = 1
        self.start = 0.0
        self.first: tuple[float, int] | None = None  # (when, done) of the first update: the ETA's rate starts there

    def stage(self, label: str) -> JobProgress:
        """The progress of another stage of the same job (e.g. an eraser's trajectory bank before its training):
        a second bar on a terminal, its own lines in a file."""
        import time

        stage = JobProgress(label, fields=self.fields)
        stage.start = time.monotonic()
        stage.bar = self.bar
        return stage

    def __enter__(self) -> JobProgress:
        import time

        self.start = time.monotonic()
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                       *(TextColumn(f"{f} {{task.fields[{f}]}}") for f in self.fields), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn()]
            self.bar = Progress(*columns, console=console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, **{f: "-" for f in self.fields})
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int | None = None, loss: float | None = None) -> None:
        """The progress callback sampling (done, total) and training (step, total, loss) call."""
        self.update(done, total, **({"loss": loss} if loss is not None else {}))

    def update(self, done: int, total: int | None = None, **values: float) -> None:
        import time

        self.total = total or self.total
        shown = {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in values.items()}
        now = time.monotonic()
        if self.bar is not None:
            if self.task is None:  # a stage's bar, added when it starts
                self.task = self.bar.add_task(self.label, total=self.total, **{f: "-" for f in self.fields})
            self.bar.update(self.task, completed=done, total=self.total, **shown)
            return
        if self.first is None:
            self.first = (now, done)
        if not self.total or done * 10 < self.next_tenth * self.total:
            return
        self.next_tenth = done * 10 // self.total + 1
        elapsed = now - self.start
        since, first_done = self.first
        # the rate since the first update: what came before it (loading, an earlier stage) is not a step
        rate = (now - since) / (done - first_done) if done > first_done else elapsed / max(done, 1)
        eta = rate * (self.total - done)
        extra = "".join(f", {k} {v}" for k, v in shown.items())
        console.print(f"{self.label}: {done}/{self.total} ({100 * done // self.total}%){extra}, "
                      f"{clock(elapsed)} elapsed, ETA {clock(eta)}", highlight=False)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw (optional with --from).")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of images (image i uses seed + i).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [default: random, recorded in the PNG].")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps [default: the family's].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale [default: the family's].")] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels [default: the backbone's].")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels [default: the backbone's].")] = None,
    scheduler: Annotated[SchedulerName | None, typer.Option(help="Sampler [default: the family's].")] = None,
    backbone: BackboneOpt = None,
    family: FamilyOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    from_image: Annotated[Path | None, typer.Option(
        "--from", help="A studio PNG: make it again (other options given here change its recipe).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", help="An adapter file, optionally :WEIGHT (repeatable), e.g. sks.safetensors:0.8 or per block "
                                "sks.safetensors:1,up_blocks.1=0; a B-LoRA's half: look.safetensors:1@style.")] = None,
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="Load foreign LoRA files even when some keys match no module.")] = False,
    ip_image: Annotated[list[Path] | None, typer.Option(
        "--ip-image", help="Image prompt: a reference image (repeatable: read together) for the IP-Adapter.")] = None,
    ip_adapter: Annotated[Path | None, typer.Option(
        "--ip-adapter", help="The IP-Adapter file [default: the backbone's own; world-sd ships one].")] = None,
    ip_scale: Annotated[float, typer.Option("--ip-scale", help="IP-Adapter scale λ (1 for the image alone, ~0.8 beside text).")] = 1.0,
    style_only: Annotated[bool, typer.Option(
        "--style-only", help="InstantStyle: the image reaches the style layers only (its look, not its content).")] = False,
    layout_only: Annotated[bool, typer.Option(
        "--layout-only", help="The image reaches the layout layers only (with --style-only: both).")] = False,
    ip_content: Annotated[str | None, typer.Option(
        "--ip-content", help="Words naming the reference's content, subtracted from it (InstantStyle), e.g. 'a red circle'.")] = None,
    ip_encoder: Annotated[str | None, typer.Option(
        "--ip-encoder", help="The IP-Adapter's CLIP image encoder (folder or hub id) [default: the backbone's].")] = None,
    style_image: Annotated[Path | None, typer.Option(
        "--style-image", help="Training-free style injection: every image's self-attention also reads this "
                              "reference (StyleAligned, DDIM-inverted reference).")] = None,
    style_weight: Annotated[float, typer.Option("--style-weight", help="How much the reference is attended to.")] = 1.0,
    control: Annotated[list[str] | None, typer.Option(
        "--control", help="Structure control KIND:IMAGE[:SCALE] (repeatable): KIND controlnet or t2i_adapter (the "
                          "backbone's own; world-sd ships mask models) or a ControlNet / T2I-Adapter folder, e.g. "
                          "controlnet:mask.png:0.8.")] = None,
    preprocess: Annotated[str | None, typer.Option(
        "--preprocess", help="What the control images go through: canny, soft_edge, mask or none [default: each "
                             "model's own condition].")] = None,
    control_end: Annotated[float, typer.Option(
        "--control-end", help="The fraction of the steps the controls act in (T2I-Adapter's paper: early steps "
                              "suffice).")] = 1.0,
    out: Annotated[Path, typer.Option(help="A .png path, or a folder for numbered files.")] = Path("outputs"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing .png --out.")] = False,
) -> None:
    """Generate images; each PNG carries its recipe (A1111 `parameters` + studio JSON)."""
    from studio.errors import InvalidArgumentError
    from studio.outputs import check_new, claim
    from studio.pipelines.base import Generation, output_paths
    from studio.recipe import read_recipe, save_png

    single = out.suffix.lower() == ".png"
    # checked and held before any model loads; a folder takes numbered files, so it may exist
    with claim(out, overwrite=overwrite, exists_ok=not single):
        changes = {k: v for k, v in dict(prompt=prompt, negative_prompt=negative, n=n, seed=seed, steps=steps,
                                         guidance=guidance, width=width, height=height,
                                         scheduler=_value(scheduler)).items() if v is not None}
        attaching = bool(adapter or ip_image or style_image or control)

        def requests(pipeline) -> list[AdapterUse]:  # the adapters and image inputs named on this command line
            backbone = pipeline.backbone
            return [*_adapter_uses(adapter, allow_partial),
                    *_image_prompt_uses(backbone, ip_image, ip_adapter, ip_scale, style_only, layout_only, ip_content,
                                        ip_encoder),
                    *_style_image_uses(backbone, style_image, style_weight),
                    *_control_uses(backbone, control, preprocess, control_end)]

        if from_image is None:
            if prompt is None:
                raise InvalidArgumentError("PROMPT is missing: give a prompt, or --from IMAGE.png to remake an image.")
            pipeline = _load_pipeline(backbone, family, device, dtype, config)
            pipeline.use(requests(pipeline))
            recipe = pipeline.recipe(**changes)
            index = None
        else:
            original = read_recipe(from_image)
            pipeline = _load_pipeline(backbone or original.backbone, family or FamilyName(original.family),
                                      device or original.device, dtype or original.dtype,
                                      config or original.backbone_config)
            recipe = pipeline.remake(original, adapters=requests(pipeline) if attaching else None, **changes)
            index = original.index if recipe is original else None
        if single and index is None:  # a batch to x.png writes x-0.png, x-1.png...: each is new, or --overwrite
            for path in output_paths(out, recipe):
                check_new(path, overwrite=overwrite)
        with JobProgress("sampling", recipe.steps) as progress:
            if index is None:
                paths = Generation(pipeline.run(recipe, progress=progress), recipe).save(out)
            else:  # the saved PNG holds the very same recipe, batch position included
                image = pipeline.replay(recipe, progress=progress)
                paths = [save_png(image, recipe, out if out.suffix.lower() == ".png" else out / f"{recipe.image_seed}.png")]
        for path in paths:
            out_console.print(str(path), highlight=False)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint or adapter file, a diffusers folder, a PNG or an embedded name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what a file is: family, kind, tensors, metadata, recipe."""
    from rich.table import Table

    from studio.inspection import inspect_path

    info = inspect_path(path)
    if as_json:
        out_console.print_json(json.dumps(info, default=str))
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, indent=1, default=str)
        table.add_row(f"[bold]{key}[/]", str(value))
    out_console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo images and index.html.")] = Path("out/demo"),
    backbone: BackboneOpt = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
) -> None:
    """The main job on the embedded default: a grid of prompts, saved with their recipes and scored
    by the shapes-world evaluator."""
    from studio.demo import run_demo

    index = run_demo(out, backbone=backbone, steps=steps, console=console)
    out_console.print(f"demo written to {index}", highlight=False)


@app.command("eval")
def eval_(
    backbone: BackboneOpt = None,
    n: Annotated[int, typer.Option("--n", help="Prompted samples.")] = 200,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 6.0,
    scheduler: Annotated[SchedulerName | None, typer.Option(help="Sampler [default: the family's].")] = None,
    held_out: Annotated[bool, typer.Option("--held-out", help="Prompt held-out values too.")] = False,
    shape: Annotated[str | None, typer.Option(help="Prompt only this shape.")] = None,
    background: Annotated[str | None, typer.Option(help="Prompt only this background.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and samples.")] = 1234,
    out: Annotated[Path, typer.Option(help="Folder for fidelity.json and fidelity.png.")] = Path("out/eval"),
) -> None:
    """Prompt fidelity of a backbone on the shapes world: accuracy per attribute, JSON and a PNG grid."""
    from rich.table import Table

    from studio.world.fidelity import fidelity, write_report

    pipeline = _load_pipeline(backbone, None, None, None, None)
    fixed = {k: v for k, v in dict(shape=shape, background=background).items() if v}
    sampler = pipeline.backbone.scheduler(_value(scheduler) or pipeline.backbone.family.scheduler)
    with console.status(f"sampling {n} prompts..."):
        metrics = fidelity(pipeline.pipe, n=n, seed=seed, steps=steps, guidance=guidance, held_out=held_out,
                           scheduler=sampler, **fixed)
    json_path, png_path = write_report(metrics, out, title=pipeline.backbone.source)
    table = Table("attribute", "evaluator", "geometry", "agreement", title=f"{pipeline.backbone.source}: {n} prompted "
                  f"samples (a '!' where the two instruments disagree on over 10% of them)")
    for attribute, value in metrics["accuracy"].items():
        flag = " !" if attribute in metrics["flagged"] else ""
        table.add_row(attribute, f"{value:.3f}", f"{metrics['geometric']['accuracy'][attribute]:.3f}",
                      f"{metrics['agreement'][attribute]:.3f}{flag}")
    table.add_row("all correct", f"{metrics['all_correct']:.3f}", f"{metrics['geometric']['all_correct']:.3f}", "")
    out_console.print(table)
    out_console.print(f"{json_path}\n{png_path}", highlight=False)


def _trainable_kinds(one_file: bool = False) -> list[str]:
    """The kinds `studio train` takes (the registry's, with a recipe); `one_file`: those that write one file."""
    from studio.training.recipes import config_class, trainable_kinds

    return [kind for kind in trainable_kinds()
            if not one_file or config_class(kind).training_output("", kind).endswith(".safetensors")]


def _kinds_help(kinds: list[str]) -> str:
    from studio.training.trainer import TrainConfig

    return (f"{', '.join(kinds[:-1])} or {kinds[-1]}; `studio recipes --kind KIND` says what each is for "
            f"[default: {TrainConfig.kind}].")


def _with_kind_options(kinds: list[str]) -> Callable:
    """Decorator: the command also takes a flag per own option of `kinds`, as each kind's config declares it
    (`studio.adapters.base.option`: keyword, type, help), passed on in its **kind_options (None: not given)."""
    import inspect
    import typing

    from studio.training.recipes import config_class

    flags: dict[str, tuple[Any, Any, list[str]]] = {}  # keyword -> (field, type, kinds that have it)
    for kind in kinds:
        cls = config_class(kind)
        hints = typing.get_type_hints(cls)
        for keyword, option in cls.training_options().items():
            flags.setdefault(keyword, (option, hints[option.name], []))[2].append(kind)

    def parameter(keyword: str, option: Any, kind_type: Any, having: list[str]) -> inspect.Parameter:
        value_type = next((t for t in typing.get_args(kind_type) if t is not type(None)), kind_type)
        flag = "--" + keyword.replace("_", "-")
        help_text = option.metadata["help"] if having == kinds else f"{', '.join(having)}: {option.metadata['help']}"
        declared = typer.Option(f"{flag}/--no-{flag[2:]}" if value_type is bool else flag, help=help_text)
        return inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[value_type | None, declared])

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = signature.replace(
            parameters=[*params, *(parameter(k, *entry) for k, entry in flags.items())])
        return command

    return decorate


TRAIN_KINDS, BATCH_KINDS = _trainable_kinds(), _trainable_kinds(one_file=True)


@app.command()
@_with_kind_options(TRAIN_KINDS)
def train(
    folder: Annotated[Path, typer.Argument(help="Reference images: flat, or kohya `N_words` subfolders; .txt captions.")],
    out: Annotated[Path | None, typer.Option(help="The adapter file [default: <folder name>.safetensors; a control "
                                                  "model's folder: <folder name>-<kind>].")] = None,
    kind: Annotated[str | None, typer.Option(help=_kinds_help(TRAIN_KINDS))] = None,
    backbone: BackboneOpt = None,
    recipe_name: Annotated[str | None, typer.Option(
        "--recipe", help="A variant of the backbone's and kind's recipe (fast, quality, style) or a full name "
                         "(sdxl/lora@quality); `studio recipes` lists them [default: the backbone's and kind's].")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps [default: the recipe's].")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size [default: the recipe's].")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [default: the recipe's].")] = None,
    loraplus_ratio: Annotated[float | None, typer.Option(
        help="LoRA+: the output side (B) learns this many times faster than A [default: the recipe's; 1 = plain "
             "LoRA].")] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger word (caption of images without one).")] = None,
    class_prompt: Annotated[list[str] | None, typer.Option(
        help="Prior preservation: the class the backbone draws its own class images of (repeatable: taken in "
             "turn), e.g. 'a photo of a dog'.")] = None,
    class_images: Annotated[int | None, typer.Option(
        help="How many class images to draw (cached by backbone, prompt and seed) [default: the recipe's].")] = None,
    prior_target: Annotated[str | None, typer.Option(
        help="What the class images train towards: images (DreamBooth) or backbone (the backbone's own "
             "prediction on them: the adapter leaves those prompts as they were) [default: the recipe's].")] = None,
    masked_loss: Annotated[bool | None, typer.Option(
        "--masked-loss/--no-masked-loss", help="Weight the loss by each image's NAME.mask.png (or alpha).")] = None,
    flip: Annotated[bool | None, typer.Option(
        "--flip/--no-flip", help="Add mirrored copies (their captions say the other side: left <-> right) "
                                 "[default: the recipe's; world recipes: only when the references' masks are "
                                 "mirror-symmetric].")] = None,
    timestep_bias: Annotated[str | None, typer.Option(
        help="none, content (favour noisy steps: shapes, layout) or style (nearly clean steps: texture).")] = None,
    anchor_weight: Annotated[float | None, typer.Option(
        help="Trigger anchoring: captions with the trigger phrase swapped for made-up words keep the backbone's "
             "own prediction, so the adapter answers only its trigger (merges better) [default: the recipe's; 0 "
             "= off].")] = None,
    anchor_phrase: Annotated[str | None, typer.Option(
        help="The words anchoring swaps [default: the trigger and the word after it].")] = None,
    tokens: Annotated[int | None, typer.Option(
        help="Pivotal tuning: learn the trigger as this many new token vectors, saved in the adapter (the "
             "concept then survives merges better) [default: the recipe's; 0 = off].")] = None,
    token_lr: Annotated[float | None, typer.Option(
        help="Learning rate of those token vectors [default: the recipe's].")] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--config", help="A YAML/TOML recipe with any TrainConfig keys; options given here win.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run of the same --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    device: DeviceOpt = None,
    **kind_options: Any,
) -> None:
    """Train an adapter on a folder of reference images (on several GPUs: `accelerate launch --multi_gpu
    --num_processes N -m studio.cli train ...`)."""
    from studio.training.recipes import config_class, recipe_line
    from studio.training.trainer import TrainConfig, processes
    from studio.training.trainer import train as run_training

    # the kind: given here, else the --config file's, else TrainConfig's (a default here would beat the file's)
    kind = kind or (TrainConfig.read_recipe(recipe).get("kind") if recipe else None) or TrainConfig.kind
    default_out = config_class(kind).training_output(folder.resolve().name, kind)
    options = dict(folder=str(folder), out=str(out or default_out), kind=kind, backbone=backbone, recipe=recipe_name,
                   steps=steps, batch=batch, lr=lr, loraplus_ratio=loraplus_ratio, trigger=trigger, device=device,
                   class_prompt=class_prompt or None, class_images=class_images, masked_loss=masked_loss, flip=flip,
                   prior_target=prior_target,
                   timestep_bias=timestep_bias, anchor_weight=anchor_weight, anchor_phrase=anchor_phrase,
                   tokens=tokens, token_lr=token_lr, **kind_options)
    options = {k: v for k, v in options.items() if v is not None}
    config = TrainConfig.from_file(recipe, **options) if recipe else TrainConfig(**options)
    if processes()[0] == 0:
        from studio.outputs import check_writable

        check_writable(config.out)  # before the recipe line and any model
        console.print(recipe_line(config), highlight=False, markup=False)
    with JobProgress("training", config.steps, fields=("loss",)) as progress:
        path = run_training(config, resume=resume, overwrite=overwrite, progress=progress,
                            log=lambda line: console.print(line))
    if processes()[0] == 0:  # under `accelerate launch`, the first process answers for the run
        out_console.print(str(path), highlight=False)


@app.command("train-batch")
@_with_kind_options(BATCH_KINDS)
def train_batch(
    parent: Annotated[Path, typer.Argument(help="A folder with one subfolder of images per concept.")],
    out: Annotated[Path, typer.Option(help="Folder for the adapters (<subfolder>.safetensors).")] = Path("adapters"),
    kind: Annotated[str | None, typer.Option(help=_kinds_help(BATCH_KINDS))] = None,
    backbone: BackboneOpt = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per adapter.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    recipe_name: Annotated[str | None, typer.Option(
        "--recipe", help="A variant of the backbone's and kind's recipe (fast, quality, style) or a full name.")] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--config", help="A YAML/TOML recipe (TrainConfig keys) for every job; options given here win.")] = None,
    executor: Annotated[str, typer.Option(
        help="local (one job after another here) or ray (each job a Ray task; pip install 'studio[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="ray: the cluster, e.g. ray://HOST:10001 or auto [default: $RAY_ADDRESS, else a local Ray].")] = None,
    gpus_per_job: Annotated[float, typer.Option(help="ray: GPUs per job (fractions share a GPU).")] = 0,
    cpus_per_job: Annotated[float, typer.Option(help="ray: CPUs per job (its torch threads).")] = 1,
    retries: Annotated[int, typer.Option(help="ray: tries again of a lost job, from its checkpoint.")] = 3,
    runtime_env: Annotated[Path | None, typer.Option(
        help="ray: a YAML/JSON runtime env for the workers (pip, env_vars, working_dir).")] = None,
    device: DeviceOpt = None,
    **kind_options: Any,
) -> None:
    """Train one adapter per subfolder; the job list survives crashes (run it again to continue)."""
    import yaml
    from rich.table import Table

    from studio.training.batch import train_batch as run_batch
    from studio.training.trainer import TrainConfig

    options = TrainConfig.read_recipe(recipe) if recipe else {}
    options.update({k: v for k, v in dict(kind=kind, backbone=backbone, steps=steps, lr=lr, recipe=recipe_name,
                                          device=device, **kind_options).items() if v is not None})
    environment = yaml.safe_load(runtime_env.read_text(encoding="utf-8")) if runtime_env else None
    with JobProgress("batch", None, fields=()) as progress:
        jobs = run_batch(parent, out, log=lambda line: console.print(line, highlight=False), progress=progress,
                         executor=executor, address=address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                         retries=retries, runtime_env=environment, **options)
    table = Table("job", "status", "attempts", "adapter or error")
    for job in jobs:
        table.add_row(job["name"], job["status"], str(job["attempts"] or 0), job["result"] or job["error"] or "")
    out_console.print(table)


@app.command()
def recipes(
    kind: Annotated[str | None, typer.Option(
        help=f"Only this kind's recipes: {', '.join(TRAIN_KINDS)}.")] = None,
) -> None:
    """List the training recipes: per backbone family (or embedded backbone) and kind, with their variants."""
    from rich.table import Table

    from studio.training.recipes import listing

    table = Table("recipe", "what it is for")
    for name, about in listing(kind):
        table.add_row(name, about)
    out_console.print(table)
    console.print("`studio train FOLDER` takes the backbone's and kind's recipe; --recipe VARIANT or a full name "
                  "picks another, and any option overrides a field.", highlight=False)


@app.command()
def convert(
    path: Annotated[Path, typer.Argument(help="An adapter file (studio, diffusers, kohya or LyCORIS).")],
    to: Annotated[str, typer.Option(help="kohya (A1111, Forge, ComfyUI) or diffusers (pipe.load_lora_weights).")],
    out: Annotated[Path | None, typer.Option(help="Output file [default: <name>.<to>.safetensors].")] = None,
    backbone: BackboneOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write an adapter in the key layout another tool reads."""
    from studio.lora_formats import convert_file

    target = out or path.with_name(f"{path.stem}.{to}.safetensors")
    _outputs_first([target], overwrite)
    with console.status("converting..."):
        written = convert_file(path, to, target, backbone=backbone, overwrite=overwrite)
    out_console.print(str(written), highlight=False)


@app.command()
def merge(
    sources: Annotated[list[str], typer.Argument(
        help="Adapter files to merge; `studio merge plan A B ...` prints the interference plan instead.")],
    method: Annotated[str | None, typer.Option(
        help="linear, concat, svd, ties, dare_linear, dare_ties, magnitude_prune, orthogonal or learned "
             "[default: the plan's recommendation].")] = None,
    weights: Annotated[str | None, typer.Option(help="One weight per adapter, e.g. 0.7,0.5 [default: 1 each].")] = None,
    block_weights: Annotated[list[str] | None, typer.Option(
        "--block-weights", help="Per-block weights, once for all adapters or once per adapter in order, "
                                "e.g. '1,up_blocks.1=0,down_blocks=0.5' or 'transformer_blocks.0-5=0.3'.")] = None,
    rank: Annotated[int | None, typer.Option(help="Rank of the merged file [default: the sum of the inputs' ranks; "
                                                  "svd: the largest input rank].")] = None,
    density: Annotated[float | None, typer.Option(help="ties/dare/magnitude_prune: fraction of entries kept.")] = None,
    seed: Annotated[int | None, typer.Option(help="dare: the random drop's seed; learned: the search's seed.")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="learned: a folder of reference images with captions the merged adapter must reproduce.")] = None,
    out: Annotated[Path | None, typer.Option(help="The merged adapter file [default: merged.safetensors].")] = None,
    bake: Annotated[Path | None, typer.Option(
        help="Also fuse the merge into the backbone and save it: a folder (diffusers) or a .safetensors file.")] = None,
    export: Annotated[str | None, typer.Option(help="Also write the merge as kohya or diffusers LoRA.")] = None,
    backbone: BackboneOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="plan: print JSON instead of a table.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """Merge adapters into one file (or a baked backbone), or print how much they would interfere."""
    from studio.blocks import parse_weight
    from studio.errors import InvalidArgumentError

    target = out or Path("merged.safetensors")
    exports = [target, *([target.with_name(f"{target.stem}.{export}.safetensors")] if export else []),
               *([bake] if bake else [])]
    if not (sources and sources[0] == "plan"):
        _outputs_first(exports, overwrite)
    bb = None
    if backbone or bake or method == "learned":
        from studio.backbones import load_backbone

        with console.status(f"loading {backbone or DEFAULT_BACKBONE}..."):
            bb = load_backbone(backbone)
    if sources and sources[0] == "plan":
        from studio.merge.interference import plan

        result = plan(sources[1:], backbone=bb)
        out_console.print(json.dumps(result.to_dict(), indent=1) if as_json else result.table(), highlight=False,
                          soft_wrap=True, markup=False)
        return
    import studio.merge as engine

    n = len(sources)
    numbers = [parse_weight(w.strip(), what="--weights") for w in weights.split(",")] if weights else [1.0] * n
    if any(not isinstance(w, float) for w in numbers):
        raise InvalidArgumentError(f"--weights {weights!r} must be numbers separated by commas; per-block weights "
                                   f"go in --block-weights.")
    blocks = block_weights or []
    if len(blocks) not in (0, 1, n) or len(numbers) != n:
        raise InvalidArgumentError(f"{n} adapters: give {n} --weights and one --block-weights for all or one per "
                                   f"adapter (got {len(numbers)} and {len(blocks)}).")
    combined = [parse_weight(blocks[min(i, len(blocks) - 1)], what="--block-weights") * w if blocks else w
                for i, w in enumerate(numbers)]
    if method is None:
        from studio.merge.interference import plan

        recommendation = plan(sources, backbone=bb)
        method = recommendation.method
        console.print(f"method: {method} ({recommendation.reason})", highlight=False)
    with console.status(f"merging {n} adapters ({method})..."):
        result = engine.merge(sources, method=method, weights=combined, rank=rank, density=density, seed=seed,
                              backbone=bb, out=target, overwrite=overwrite, reference=reference)
    console.print(f"largest relative truncation error: {result.max_truncation:.2e}", highlight=False)
    out_console.print(str(result.path), highlight=False)
    if export:
        from studio.lora_formats import convert_file

        written = convert_file(result.path, export, exports[1], backbone=bb, overwrite=overwrite)
        out_console.print(str(written), highlight=False)
    if bake:
        written = engine.bake([(result.adapter, 1.0)], bb, bake, single_file=bake.suffix == ".safetensors",
                              overwrite=overwrite)
        out_console.print(str(written), highlight=False)


@app.command()
def erase(
    concepts: Annotated[list[str], typer.Argument(help="What to erase (one for esd/spm; several for uce).")],
    method: Annotated[str, typer.Option(help="esd (trained), spm (trained, rank 1, scales itself per prompt) or "
                                             "uce (closed form, seconds).")] = "esd",
    preserve: Annotated[str | None, typer.Option(help="Concepts that must stay, comma-separated.")] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", help="A prompt with {} where the concept goes (repeatable) [default: generic ones].")] = None,
    backbone: BackboneOpt = None,
    steps: Annotated[int | None, typer.Option(help="esd/spm: training steps [default: 400 / 500].")] = None,
    lr: Annotated[float | None, typer.Option(help="esd/spm: learning rate [default: 1e-2 / 2.5e-2].")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank [default: esd 4, spm 1, uce exact].")] = None,
    variant: Annotated[str | None, typer.Option(help="esd: x (cross-attention), u (the other layers) or kv (the text's keys and values).")] = None,
    eta: Annotated[float | None, typer.Option(help="esd/spm: negative guidance strength η [default: 3].")] = None,
    push: Annotated[float | None, typer.Option(help="uce: map the concept past the destination, away from it, "
                                                   "d + push·(d - c) [default: 1; 0 is the paper's map].")] = None,
    transport: Annotated[bool | None, typer.Option(
        "--transport/--no-transport", help="Scale the eraser per prompt by the prompt's closeness to the concept "
        "(SPM's facilitated transport; with --preserve, prompts of kept concepts get none) [default: on for spm, "
        "off for esd and uce].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bank images and the training.")] = 0,
    out: Annotated[Path | None, typer.Option(help="The eraser file [default: erase-<concept>.safetensors].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Make a concept eraser: an adapter that stacks with the others (`generate --adapter FILE`)."""
    from studio.backbones import load_backbone
    from studio.training.erasing import erase as make

    target = out or Path(f"erase-{'-'.join(c.replace(' ', '_') for c in concepts)}.safetensors")
    _outputs_first([target], overwrite)
    options = {k: v for k, v in dict(variant=variant, eta=eta, push=push, transport=transport).items() if v is not None}
    with console.status(f"loading {backbone or DEFAULT_BACKBONE}..."):
        bb = load_backbone(backbone)
    with JobProgress(method, steps, fields=("loss",)) as progress:
        adapter = make(concepts if len(concepts) > 1 else concepts[0], method=method, backbone=bb,
                       preserve=preserve or [], templates=template, steps=steps, lr=lr, rank=rank, seed=seed,
                       out=str(target), overwrite=overwrite, progress=progress,
                       bank_progress=progress.stage("trajectory bank"),
                       warn=lambda message: console.print(f"[yellow]warning:[/] {message}", highlight=False),
                       **options)
    console.print(f"{method} eraser of {', '.join(adapter.config.concepts)}: {len(adapter.config.targets)} modules, "
                  f"rank {adapter.config.rank}", highlight=False)
    out_console.print(str(adapter.path), highlight=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port [default: 7860, or the next free one].")] = None,
    share: Annotated[bool, typer.Option(help="Also open a public gradio.live link.")] = False,
) -> None:
    """Start the web UI (Generate, Train, Merge, Library)."""
    import importlib.util

    # app.py sits at the checkout's top (the design card's layout), beside the studio package, and is
    # not an installed module (the wheel holds only `studio`)
    path = Path(__file__).resolve().parents[1] / "app.py"
    if not path.is_file():
        raise StudioError(f"the web UI needs {path}: run studio from its source checkout (pip install -e .).")
    spec = importlib.util.spec_from_file_location("app", path)
    web = importlib.util.module_from_spec(spec)
    sys.modules["app"] = web
    spec.loader.exec_module(web)
    web.serve(host, port, share)


world_app = typer.Typer(help="The shapes world: reference folders, and the recipes of its models.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("render")
def world_render(
    out: Annotated[Path, typer.Option(help="Folder to write NNN.png + NNN.txt (kohya layout).")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 12,
    shape: Annotated[str | None, typer.Option(help="Fixed shape [default: random base shape].")] = None,
    colour: Annotated[str | None, typer.Option(help="Fixed colour.")] = None,
    background: Annotated[str | None, typer.Option(help="Fixed background.")] = None,
    position: Annotated[str | None, typer.Option(help="Fixed position.")] = None,
    size: Annotated[str | None, typer.Option(help="Fixed size (small, large).")] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger word: captions say '<trigger> <shape>'.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    masks: Annotated[bool, typer.Option(
        "--masks", help="Also write NNN.mask.png, the shape's exact mask (masked loss, mask control maps).")] = False,
) -> None:
    """Write a reference folder of renders with one caption file per image."""
    from studio.outputs import check_writable
    from studio.world.folder import write_reference_folder

    check_writable(out / "000.png")
    paths = write_reference_folder(out, n=n, seed=seed, trigger=trigger, shape=shape, colour=colour,
                                   background=background, position=position, size=size, masks=masks)
    out_console.print(f"{len(paths)} images with captions in {out}", highlight=False)


@world_app.command("train")
def world_train(
    model: Annotated[str, typer.Option(help="vae, clip, evaluator, world-sd or world-dit.")],
    out: Annotated[Path, typer.Option(help="Where the trained folder and train_log.jsonl go.")] = Path("out/world"),
    steps: Annotated[int | None, typer.Option(help="Training steps [default: the recipe's].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [default: the recipe's].")] = None,
    init: Annotated[Path | None, typer.Option(
        help="world-sd/world-dit: start from this trained folder (a fine-tune), e.g. assets/world/world-sd.")] = None,
    partial: Annotated[float | None, typer.Option(
        help="world-sd/world-dit: share of partial captions ('a blue square') [default: 0].")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Only continue the checkpoint in --out (an error if there is none).")] = False,
) -> None:
    """Train one shapes-world model with its fixed seed, logging progress and an ETA; rerun the same command
    to resume a killed run from its last checkpoint (every 500 steps)."""
    from studio.errors import InvalidArgumentError
    from studio.world.train import MODELS, checkpoint_folder

    if model not in MODELS:
        raise InvalidArgumentError(f"--model {model!r} is not a world model; choose one of {', '.join(MODELS)}.")
    checkpoint = checkpoint_folder(out, model)
    if resume and not (checkpoint / "step.json").is_file():
        raise InvalidArgumentError(f"--resume: {out} holds no checkpoint of {model} ({checkpoint}); "
                                   f"leave --resume out to start one.")
    if (init is not None or partial is not None) and model not in ("world-sd", "world-dit"):
        raise InvalidArgumentError(f"--init and --partial are for world-sd and world-dit, not {model!r}.")
    given = {"steps": steps, "lr": lr, "init": init, "partial": partial}
    folder = MODELS[model](out, **{k: v for k, v in given.items() if v is not None},
                           log=lambda line: console.print(line))
    out_console.print(str(folder), highlight=False)


if __name__ == "__main__":
    main()
