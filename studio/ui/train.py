"""The Train tab: images and captions (uploaded, or a folder on the server), the recipe's options, and the live
view of the training job (progress, loss plot, samples; cancel, resume). Training is a job of the thread
executor (studio.jobs), so it goes on when the browser closes; its state is in the library's jobs table, so a
reloaded page shows it again."""

import html
import json
import secrets
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from studio.adapters.control import CONDITIONS as CONTROL_CONDITIONS
from studio.adapters.control import CONTROL_KINDS
from studio.backbones import DEFAULT_BACKBONE
from studio.jobs import run_job
from studio.ui.common import (
    INPUT_KINDS,
    JOBS,
    TRAIN_BATCH,
    blocked_paths,
    folder,
    job_html,
    labelled,
    library,
    make_thumbnail,
    new_adapter_path,
    readable_roots,
    restart_timer,
    safe_name,
    tick,
    ui_errors,
)

# a control model's maps made from each image (`paired` needs a conditions/ folder, which the tab does not copy)
CONDITIONS = labelled(c for c in CONTROL_CONDITIONS if c != "paired")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WORDS = {"running": "training", "interrupted": "interrupted (press Resume)"}


def free_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-1`, `stem-2`... the first not in `taken` (compared case-blind, as macOS and Windows
    compare file names), added to it: an image, its caption and its mask share one stem."""
    candidate, i = stem, 0
    while candidate.lower() in taken:
        i += 1
        candidate = f"{stem}-{i}"
    taken.add(candidate.lower())
    return candidate


def split_name(name: str) -> tuple[str, str]:
    """(stem, ending) of a training file: `a.mask.png` -> (`a`, `.mask.png`), `a.txt` -> (`a`, `.txt`)."""
    from studio.training.data import MASK_SUFFIX

    ending = name[-len(MASK_SUFFIX):] if name.lower().endswith(MASK_SUFFIX) else Path(name).suffix
    return name[: len(name) - len(ending)], ending


@ui_errors
def stage_uploads(files: list[str] | None, trigger: str = "") -> tuple[str, list[list[str]], str]:
    """Training upload: images (checked by decoding them; over the pixel limit refused) and .txt captions are
    copied into a fresh folder under uploads/, staged beside it and moved into place only when complete. An
    image and its caption keep one stem; files whose cleaned names collide are all kept (`x_y`, `x_y-1`).
    Returns (folder, caption table rows, a note on what was refused or renamed); no folder when no image is
    ready."""
    from PIL import UnidentifiedImageError

    from studio.limits import MAX_IMAGE_PIXELS, ImageTooLargeError, open_image

    if not files:
        return "", [], "Upload images (PNG, JPEG, WebP) or give a folder on the server."
    uploads = folder("uploads")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=uploads))
    try:
        refused, renamed, images = [], [], 0
        stems: dict[str, str] = {}  # an upload's own stem -> its staged stem
        taken: set[str] = set()
        for upload in files:
            source = Path(upload)
            name = safe_name(source.name)
            suffix = source.suffix.lower()
            if suffix not in (".txt", ".caption"):
                if suffix not in IMAGE_SUFFIXES:
                    refused.append(f"{name} (not an image)")
                    continue
                try:
                    with open_image(source, name) as image:
                        image.verify()
                except ImageTooLargeError:
                    refused.append(f"{name} (over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP image limit)")
                    continue
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                    refused.append(f"{name} (unreadable image)")
                    continue
                images += 1
            own = split_name(source.name)[0]
            stem, ending = split_name(name)
            if own not in stems or (staging / f"{stems[own]}{ending}").exists():  # a second `a.png`: kept apart
                stems[own] = free_stem(stem, taken)
            target = staging / f"{stems[own]}{ending}"
            if target.name != name:
                renamed.append(f"{html.escape(source.name)} as {target.name}")
            shutil.copyfile(source, target)
        rows = caption_rows(str(staging), trigger) if images else []
        note = (f"{len(rows)} images ready." + (f" Refused: {', '.join(refused)}." if refused else "")
                + (f" Kept apart: {', '.join(renamed)}." if renamed else ""))
        if not rows:
            shutil.rmtree(staging)
            return "", [], note
        staged = uploads / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        staging.rename(staged)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(staged), rows, note


def caption_rows(folder_path: str, trigger: str = "") -> list[list[str]]:
    """(image file, caption) for every training image of a folder, as the trainer would caption it."""
    from studio.training.data import scan_folder

    scan = scan_folder(folder_path, trigger=trigger or "")
    root = Path(folder_path)
    return [[str(item.path.relative_to(root)), item.caption] for item in scan.items]


@ui_errors
def pick_server_folder(path: str, trigger: str = "") -> tuple[str, list[list[str]], str]:
    """Train from a folder on the server (kohya layout or flat)."""
    import gradio as gr

    chosen = Path(path or "").expanduser().resolve()  # resolved: a link or `..` cannot lead out of the roots
    roots = readable_roots()
    if path and (not any(chosen.is_relative_to(root) for root in roots)
                 or any(chosen.is_relative_to(p.resolve()) for p in blocked_paths())):
        raise gr.Error(f"{path!r} is outside the folders this page may read ({', '.join(str(r) for r in roots)}); "
                       f"copy the images into one of them, or upload them.")
    if not path or not chosen.is_dir():
        raise gr.Error(f"{path!r} is not a folder on the server; give the full path of a folder of images.")
    rows = caption_rows(str(chosen), trigger)
    return str(chosen), rows, f"{len(rows)} images found."


def _table_rows(table: Any) -> list[list[str]]:
    if table is None:
        return []
    if hasattr(table, "values"):  # a pandas DataFrame from the page
        return [[str(a), str(b)] for a, b in table.values.tolist()]
    return [[str(a), str(b)] for a, b in table]


def recipe_fields(backbone: str, kind: str, recipe: str | None) -> tuple[Any, ...]:
    """The Train tab's fields filled from the recipe for (backbone, kind, variant): the variant picker, steps,
    rank, learning rate, control maps (each hidden where the kind has no such option) and the recipe's line.
    `studio.training.recipes.resolve` answers, as for `studio train` and `studio.train`."""
    import gradio as gr

    from studio.errors import StudioError
    from studio.training.recipes import adapter_options, resolve

    kind = kind or "lora"
    try:
        found = resolve(backbone or DEFAULT_BACKBONE, kind, recipe or None)
    except StudioError as error:  # e.g. a backbone typed in that cannot be read yet: keep the fields
        return (gr.update(),) * 5 + (f"Recipe: {error}",)
    if recipe and recipe not in found.variants:
        found = resolve(backbone or DEFAULT_BACKBONE, kind)
    values, own = found.options, adapter_options(kind)
    variants = [(f"{found.name.split('@')[0]} (default)", ""), *((v, v) for v in found.variants)]
    return (gr.update(choices=variants, value=recipe if recipe in found.variants else ""),
            gr.update(value=values["steps"]),
            gr.update(value=values.get("rank"), visible="rank" in own),
            gr.update(value=values["lr"]),
            gr.update(value=values.get("condition"), visible="condition" in own),
            f"**Recipe {found.name}**: {found.about}. <small>{found.line()}</small>")


def _train(config: Any, *, resume: bool = False) -> int:
    """Run `config` (a TrainConfig) as the Train tab's job of its adapter's name: every step into the job's row,
    the adapter into the library with its thumbnail."""
    from dataclasses import asdict

    return JOBS.start(TRAIN_BATCH, config.name or Path(config.out).stem, asdict(config),
                      partial(run_job, resume=resume, every=1), tags=["trained"],
                      thumbnail=lambda path: make_thumbnail(path, config.backbone))


@ui_errors
def start_training(source: str, table: Any, name: str, kind: str, backbone: str, trigger: str, steps: int,
                   rank: int | None, lr: float, tokens: int = 0, condition: str | None = None,
                   recipe: str | None = None) -> int:
    """Start: the images and the table's captions are copied into training/<name>/, then a job
    trains adapters/<name>.safetensors (a control model: the folder adapters/<name>) with the recipe of its
    backbone and kind (`recipe`: one of its variants), the fields on top. `tokens` > 0 learns the trigger as
    that many token vectors (pivotal tuning); `condition`: a control model's maps. Returns the job id."""
    import gradio as gr

    from studio.training.recipes import adapter_options
    from studio.training.trainer import TrainConfig

    rows = _table_rows(table)
    if not source or not rows:
        raise gr.Error("No training images: upload some, or load a server folder, first.")
    name = safe_name(name or "", fallback="")
    if not name:
        raise gr.Error("Give the adapter a name (letters, digits, dots, dashes).")
    kind = kind or "lora"
    out = new_adapter_path(name, "" if kind in CONTROL_KINDS else ".safetensors")  # a control model: a folder
    target = folder("training") / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    root = Path(source)
    taken: set[str] = set()
    for relative, text in rows:
        image = (root / relative).resolve()
        if root.resolve() not in image.parents or not image.is_file():
            raise gr.Error(f"{relative!r} is not an image of the chosen folder.")
        stem, ending = split_name(safe_name(Path(relative).name))
        copy = target / f"{free_stem(stem, taken)}{ending}"  # its own caption: `a.png` and `a.jpg` apart
        shutil.copyfile(image, copy)
        copy.with_suffix(".txt").write_text(text.strip() + "\n", encoding="utf-8")
    steps, own = int(steps), adapter_options(kind)
    # the kind's own fields only where it has them (the tab hides the others)
    options = {k: v for k, v in dict(rank=int(rank) if rank else None, condition=condition or None).items()
               if k in own and v is not None}
    config = TrainConfig(folder=str(target), out=str(out), kind=kind, recipe=recipe or None,
                         backbone=backbone or DEFAULT_BACKBONE, trigger=trigger or "", steps=steps, lr=float(lr),
                         tokens=int(tokens or 0), checkpoint_every=max(1, min(100, steps // 4 or 1)),
                         # samples need the adapter's run-time image; kinds without one show theirs while training
                         sample_every=0 if kind in INPUT_KINDS else max(1, steps // 4),
                         sample_prompts=[rows[0][1]], name=name, **options)
    return _train(config)


@ui_errors
def resume_training(job_id: int | None) -> int:
    """Resume: continue a cancelled or interrupted job from its last checkpoint."""
    import gradio as gr

    from studio.training.trainer import TrainConfig

    job = library().job(int(job_id)) if job_id else None
    if job is None:
        raise gr.Error("No training job to resume.")
    if JOBS.running(job["id"]):
        raise gr.Error(f"{job['name']!r} is still running.")
    if job["status"] == "done":
        raise gr.Error(f"{job['name']!r} is finished; nothing to resume.")
    return _train(TrainConfig(**json.loads(job["config"])), resume=True)


def cancel_training(job_id: int | None) -> str:
    """Cancel: the job stops after its current step and keeps a checkpoint to resume from."""
    if job_id:
        JOBS.cancel(int(job_id))
        return "Cancelling after the current step..."
    return "No training job is running."


def latest_job() -> int | None:
    """The newest UI training job (what a reloaded page shows)."""
    jobs = library().jobs(TRAIN_BATCH)
    return max(jobs, key=lambda j: j["updated"])["id"] if jobs else None


def job_view(job_id: int | None) -> tuple[str, str | None, list[str]]:
    """The Train tab's live view of a job: progress HTML, the loss plot and the sample sheets."""
    from studio.training.trainer import TrainConfig, loss_plot

    job = library().job(int(job_id)) if job_id else None
    if job is None:
        return "<p>No training yet: add images and press Start.</p>", None, []
    config = json.loads(job["config"])
    paths = TrainConfig(**config).paths()
    plot = None
    if paths["log"].is_file():
        losses = [json.loads(line)["loss"] for line in paths["log"].read_text().splitlines() if line.strip()]
        plot = str(loss_plot(losses, paths["log"].with_suffix(".png")))
    samples = sorted(str(p) for p in paths["samples"].glob("*.png")) if paths["samples"].is_dir() else []
    return job_html(job, WORDS, config["steps"]), plot, samples


def live_view(job_id: int | None, seen: list | None):
    """One tick of the Train tab's live view (common.tick): the job's view, what it was drawn from, and the
    timer, which stops once the view shows a job that is not running; Start and Resume restart it."""
    return tick(job_id, seen, job_view, 3)


def train_tab(backbones: list[str]):
    """The Train tab: images and captions, options, the live job view; returns (job, timer) and how its fields
    are filled from the recipe (for page load)."""
    import gradio as gr

    from studio.training.recipes import recipe_kinds

    with gr.Tab("Train"):
        source = gr.State("")
        job = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                uploads = gr.File(label="Training images (and .txt captions)", file_count="multiple",
                                  file_types=["image", ".txt"], height=120)
                with gr.Row():
                    server_folder = gr.Textbox(label="…or a folder on the server", scale=4)
                    load_folder = gr.Button("Load folder", scale=1)
                note = gr.Markdown()
                captions = gr.Dataframe(label="Captions (edit the right column)", headers=["image", "caption"],
                                        datatype=["str", "str"], interactive=True, static_columns=[0],
                                        wrap=True, max_height=260)
            with gr.Column(scale=4):
                with gr.Row():
                    name = gr.Textbox(label="Adapter name", placeholder="my-star")
                    trigger = gr.Textbox(label="Trigger word", value="sks")
                with gr.Row():
                    kind = gr.Dropdown(label="Kind", choices=recipe_kinds(), value="lora")  # each has a recipe
                    condition = gr.Dropdown(label="Control maps", choices=CONDITIONS, value="canny", visible=False,
                                            info="controlnet / t2i_adapter: made from each image")
                    train_backbone = gr.Dropdown(label="Backbone", choices=backbones, value=DEFAULT_BACKBONE,
                                                 allow_custom_value=True)
                    recipe = gr.Dropdown(label="Recipe", choices=[("default", "")], value="",
                                         info="the backbone's and kind's; a variant")
                recipe_note = gr.Markdown()
                with gr.Row():  # filled from the recipe (recipe_fields); what is changed here overrides it
                    train_steps = gr.Number(label="Steps", value=300, precision=0, minimum=1)
                    rank = gr.Number(label="Rank", value=16, precision=0, minimum=1)
                    lr = gr.Number(label="Learning rate", value=1e-4)
                    tokens = gr.Number(label="Trigger tokens (0 = off)", value=0, precision=0, minimum=0,
                                       info="Learn the trigger as new token vectors (pivotal tuning)")
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    cancel = gr.Button("Cancel", variant="stop")
                    resume = gr.Button("Resume")
                progress = gr.HTML()
                loss = gr.Image(label="Loss", type="filepath", height=160, show_label=True)
                samples = gr.Gallery(label="Samples", columns=1, height=140, object_fit="contain",
                                     elem_classes="pixelated")
        uploads.upload(stage_uploads, [uploads, trigger], [source, captions, note])
        load_folder.click(pick_server_folder, [server_folder, trigger], [source, captions, note])
        # the live view ticks once a second from page load (so a reloaded page shows a running job at
        # once, whichever tab is open) until the job it shows is not running; Start and Resume restart
        # it. Page load starts it with the job it sets, so no tick can see the page before it has one
        seen = gr.State(None)
        timer = gr.Timer(1.0, active=False)
        timer.tick(live_view, [job, seen], [progress, loss, samples, seen, timer], show_progress="hidden")

        filled = [recipe, train_steps, rank, lr, condition, recipe_note]
        for picker in (kind, train_backbone, recipe):
            picker.input(recipe_fields, [train_backbone, kind, recipe], filled)
        start.click(start_training, [source, captions, name, kind, train_backbone, trigger, train_steps, rank, lr,
                                     tokens, condition, recipe],
                    job).success(restart_timer, None, timer)
        resume.click(resume_training, job, job).success(restart_timer, None, timer)
        cancel.click(cancel_training, job, note)
    return job, timer, (recipe_fields, [train_backbone, kind, recipe], filled)
