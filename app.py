"""studio's web UI for artists (Gradio Blocks), built only on the Python API.

    studio serve                       # http://127.0.0.1:7860  (or: .venv/bin/python app.py)
    studio serve --host 0.0.0.0 --port 8000

Tabs: Generate (adapter stack, gallery with each image's recipe, reuse, download), Train (upload or a
server folder, caption table, live progress, loss plot and samples, cancel, resume), Merge (the
interference plan, method and weights, a preview grid before saving), Erase (a concept eraser by ESD,
SPM or UCE, with before/after previews; erasers then stack in Generate like any adapter) and Library
(adapters with thumbnails, search, import by upload; the history of generations).

Every handler is a plain function of this module (tested directly in tests/test_app.py); the page only
wires them to components. Files live under `$STUDIO_HOME`: outputs/ (images, each PNG carrying its
recipe), adapters/ (trained, merged, imported), thumbnails/, uploads/ and training/ (staged images with
their captions). Training runs in a thread of the server, so it goes on when the browser closes; its
state is in the library database, so a reloaded page shows it again.
"""

# No `from __future__ import annotations`: Gradio reads the `gr.SelectData` annotation of the select
# handlers at run time to pass them the event.
import html
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

from studio.adapters.control import CONTROL_KINDS

from studio.backbones import DEFAULT_BACKBONE
from studio.home import cache_root, studio_home
from studio.schedulers import SCHEDULERS

log = logging.getLogger("studio.app")

SLOTS = 4  # adapters in the Generate tab's stack
CONDITIONS = [("Canny edges", "canny"), ("soft edges (Sobel)", "soft_edge"), ("object mask", "mask")]
MAX_UPLOAD = "50mb"  # per file (Gradio refuses larger uploads before they reach a handler)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.progress-wrap progress { width: 100%; height: 1.2em; }
"""


def folder(name: str) -> Path:
    """A folder of the UI's files under `$STUDIO_HOME`, created on first use."""
    path = studio_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_name(name: str, *, fallback: str = "file") -> str:
    """A file name that cannot leave its folder: the last path part, only [A-Za-z0-9._-], no leading dot."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._")[:100]
    return cleaned or fallback


def free_path(path: Path) -> Path:
    """`path`, or `name-1.ext`, `name-2.ext`... when it exists (an upload never replaces a file)."""
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


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


def readable_roots() -> list[Path]:
    """The folders the page may read a server folder from: the studio home and the working directory (unless
    that is the file system's root)."""
    cwd = Path.cwd().resolve()
    return [studio_home().resolve(), *([cwd] if cwd != Path(cwd.anchor) else [])]


def blocked_paths() -> list[Path]:
    """What the page never serves or reads, even under a readable root: the library database and the caches."""
    return [studio_home() / "library.db", cache_root()]


def ui_errors(fn: Callable) -> Callable:
    """Bad input (a StudioError or ValueError) becomes a message in the page; anything else is logged
    with its traceback on the server and shown as one line, never as a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import gradio as gr

        from studio.errors import StudioError

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StudioError, ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # noqa: BLE001 - the page must get a message, the log the traceback
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"internal error in {fn.__name__}: {type(error).__name__}: {error}") from None

    return wrapper


# ------------------------------------------------------------------------------------- pipelines

_pipelines: dict[str, tuple[Any, threading.Lock]] = {}
_pipelines_lock = threading.Lock()
_save_lock = threading.Lock()


def pipeline_for(backbone: str) -> tuple[Any, threading.Lock]:
    """One pipeline per backbone, shared by all users, with the lock that serialises its use (its
    attached adapters are set per request)."""
    from studio.pipelines import StudioPipeline

    backbone = backbone or DEFAULT_BACKBONE
    with _pipelines_lock:
        if backbone not in _pipelines:
            if len(_pipelines) >= 2:  # keep at most two backbones in memory
                _pipelines.pop(next(iter(_pipelines)))
            _pipelines[backbone] = (StudioPipeline(backbone), threading.Lock())
        return _pipelines[backbone]


def use_adapters(pipeline: Any, stack: list[tuple[str, float]]) -> None:
    """Make `stack` (path, weight) the pipeline's attached adapters, in order."""
    current = [(str(e["adapter"].path), e["weight"]) for e in pipeline.adapters]
    if current == [(str(Path(p)), w) for p, w in stack]:
        return
    pipeline.detach()
    for path, weight in stack:
        pipeline.attach(path, weight)


@contextmanager
def only_adapter(backbone: str, adapter_path: Path) -> Iterator[Any]:
    """The backbone's shared pipeline, locked, with just this adapter attached; detached afterwards."""
    pipeline, lock = pipeline_for(backbone or DEFAULT_BACKBONE)
    with lock:
        use_adapters(pipeline, [(str(adapter_path), 1.0)])
        try:
            yield pipeline
        finally:
            pipeline.detach()


# -------------------------------------------------------------------------------------- library

def library():
    from studio.library import Library

    return Library()


def adapter_choices(query: str = "") -> list[tuple[str, str]]:
    """(label, path) of the library's adapters whose files still exist."""
    rows = [r for r in library().adapters(query) if Path(r["path"]).is_file()]
    return [(f"{r['name']} ({r['kind']}, {r['family'] or '?'})", r["path"]) for r in rows]


def make_thumbnail(adapter_path: Path, backbone: str | None = None) -> str | None:
    """A 1-image preview of an adapter: its trigger words on the adapter's backbone (none for a control model's
    folder: it needs a control image)."""
    from studio.adapters.base import MANIFEST_KEY, read_safetensors

    if Path(adapter_path).is_dir():
        return None

    _, metadata = read_safetensors(adapter_path)
    manifest = json.loads(metadata.get(MANIFEST_KEY, "{}"))
    backbone = backbone or manifest.get("base") or DEFAULT_BACKBONE
    prompt = " ".join(manifest.get("trigger_words") or [manifest.get("name") or adapter_path.stem])
    with only_adapter(backbone, adapter_path) as pipeline:
        image = pipeline.generate(prompt, seed=0).images[0]
    path = folder("thumbnails") / f"{adapter_path.stem}-{secrets.token_hex(4)}.png"
    image.save(path)
    return str(path)


def library_view(query: str = "") -> tuple[list[tuple[str, str]], list[list[Any]]]:
    """The Library tab: thumbnails with captions, and one table row per adapter."""
    rows = library().adapters(query or "")
    gallery = [(r["thumbnail"], r["name"]) for r in rows if r["thumbnail"] and Path(r["thumbnail"]).is_file()]
    table = [[r["name"], r["kind"], r["family"], r["base"], ", ".join(json.loads(r["trigger_words"] or "[]")),
              ", ".join(json.loads(r["tags"] or "[]")), Path(r["path"]).name] for r in rows]
    return gallery, table


@ui_errors
def import_adapter(upload: str | None, tags: str = "") -> str:
    """Library upload: a .safetensors adapter file, checked, copied under adapters/ and indexed."""
    import gradio as gr
    from studio.adapters.base import read_safetensors

    if not upload:
        raise gr.Error("Choose a .safetensors adapter file to import.")
    source = Path(upload)
    if source.suffix.lower() != ".safetensors":
        raise gr.Error(f"{safe_name(source.name)} is not a .safetensors file: only safetensors adapters are "
                       f"imported (convert .ckpt/.pt/.bin files first; they can run code when loaded).")
    read_safetensors(source)  # a readable safetensors header, or a clear error
    target = free_path(folder("adapters") / safe_name(source.name, fallback="adapter.safetensors"))
    shutil.copyfile(source, target)
    row = library().add_adapter(target, tags=[t.strip() for t in tags.split(",") if t.strip()])
    return f"Imported {row['name']} ({row['kind']}, {row['family'] or 'unknown family'}) as {target.name}."


def history_view(limit: int = 60) -> tuple[list[tuple[str, str]], list[str]]:
    """Past generations (newest first) and their recipes' JSON, index for index."""
    rows = [r for r in library().generations(limit) if Path(r["path"]).is_file()]
    return [(r["path"], Path(r["path"]).name) for r in rows], [r["recipe"] for r in rows]


# ------------------------------------------------------------------------------------- generate

def _stack(slots: tuple[Any, ...]) -> list[tuple[str, float]]:
    """The enabled adapters of the stack's (path, weight, on) slots."""
    stack = []
    for i in range(0, len(slots), 3):
        path, weight, on = slots[i : i + 3]
        if path and on:
            if not Path(path).is_file():
                raise FileNotFoundError(f"adapter {path} is gone from disk; pick another from the library.")
            stack.append((str(path), float(weight)))
    return stack


def use_image_prompt(pipeline: Any, image: str | None, scale: float, routing: str, content: str) -> None:
    """The Generate tab's image prompt on top of the stack: the backbone's own IP-Adapter with that
    reference, scale and routing (none when no reference image is given)."""
    from studio.adapters.ip_adapter import default_ip_adapter

    if image:
        pipeline.attach(str(default_ip_adapter(pipeline.backbone)), float(scale), image=image,
                        routing=routing or "all", content=(content or "").strip())


CONTROL_CHOICES = [("ControlNet", "controlnet"), ("T2I-Adapter", "t2i_adapter")]
PREPROCESS = [("the model's own", ""), ("Canny edges", "canny"), ("soft edges (Sobel)", "soft_edge"),
              ("object mask", "mask"), ("none: the image is the map", "none")]
INPUT_KINDS = ("ip_adapter", *CONTROL_KINDS)  # adapters with run-time images


def use_control(pipeline: Any, image: str | None, kind: str, model: str, preprocess: str, scale: float,
                end: float) -> None:
    """The Generate tab's control on top of the stack: `model` (a ControlNet / T2I-Adapter folder) or the backbone's
    own of `kind`, reading `image` through `preprocess` (empty: the model's own condition)."""
    from studio.adapters.control import attach_control

    if image:
        attach_control(pipeline, (model or "").strip() or kind or "controlnet", image, scale, preprocess=preprocess,
                       end=end)


@ui_errors
def preview_control(image: str | None, preprocess: str) -> Any:
    """The control map the model will read: the image through the chosen preprocessor (the model's own
    condition is shown as the image itself, which is what it reads until generation picks the model)."""
    from studio.adapters.control import preview

    return preview(image, preprocess or "none") if image else None


@ui_errors
def generate_images(prompt: str, negative_prompt: str, backbone: str, n: int, seed: int, steps: int,
                    guidance: float, width: int, height: int, scheduler: str, ip_image: str | None = None,
                    ip_scale: float = 1.0, ip_routing: str = "all", ip_content: str = "",
                    control_image: str | None = None, control_kind: str = "controlnet", control_model: str = "",
                    control_preprocess: str = "", control_scale: float = 1.0, control_end: float = 1.0,
                    *slots: Any) -> tuple[list[tuple[str, str]], list[str], str]:
    """The Generate button: the gallery (path, caption), each image's recipe JSON, and the first
    image's A1111 parameters. `ip_*`: the image prompt (reference image path, scale, routing, content
    words to subtract); `control_*`: a control image, the model's kind or folder, its preprocessor, scale and
    end; `slots`: (adapter path, weight, on) per stack slot."""
    pipeline, lock = pipeline_for(backbone or DEFAULT_BACKBONE)
    with lock:
        if ip_image or control_image or any(e["adapter"].kind in INPUT_KINDS for e in pipeline.adapters):
            pipeline.detach()  # image inputs change per request: attach the stack afresh
        use_adapters(pipeline, _stack(slots))
        use_image_prompt(pipeline, ip_image, ip_scale, ip_routing, ip_content)
        use_control(pipeline, control_image, control_kind, control_model, control_preprocess, control_scale,
                    control_end)
        result = pipeline.generate(prompt, negative_prompt=negative_prompt or "", n=int(n),
                                   seed=None if seed is None or int(seed) < 0 else int(seed), steps=int(steps),
                                   guidance=float(guidance), width=int(width), height=int(height),
                                   scheduler=scheduler or None)
    with _save_lock:  # numbered file names: one writer at a time
        paths = result.save(folder("outputs"))
    recipes = [r.to_json() for r in result.recipes]
    db = library()
    for path, recipe in zip(paths, recipes, strict=True):
        db.add_generation(path, recipe)
    gallery = [(str(p), f"seed {r.image_seed}") for p, r in zip(paths, result.recipes, strict=True)]
    return gallery, recipes, result.recipes[0].parameters()


def select_image(recipes: list[str], index: int | None) -> tuple[str, str | None]:
    """A gallery click: that image's A1111 parameters and its recipe JSON."""
    from studio.recipe import Recipe

    if index is None or not recipes or index >= len(recipes):
        return "", None
    return Recipe.from_json(recipes[index]).parameters(), recipes[index]


@ui_errors
def reuse_recipe(recipe_json: str | None) -> list[Any]:
    """The selected image's recipe back into the Generate controls (its own seed, one image)."""
    import gradio as gr

    from studio.recipe import Recipe

    if not recipe_json:
        raise gr.Error("Click an image in the gallery first, then reuse its recipe.")
    r = Recipe.from_json(recipe_json)
    values: list[Any] = [r.prompt, r.negative_prompt, r.backbone, 1, r.image_seed, r.steps, r.guidance, r.width,
                         r.height, r.scheduler]
    image_prompt = next((a for a in r.adapters if a.get("kind") == "ip_adapter"), None)
    if image_prompt is not None:
        inputs = image_prompt.get("inputs") or {}
        values += [(inputs.get("images") or [None])[0], float(image_prompt["weight"]), inputs.get("routing", "all"),
                   inputs.get("content", "")]
    else:
        values += [None, 1.0, "all", ""]
    control = next((a for a in r.adapters if a.get("kind") in CONTROL_KINDS), None)
    if control is not None:
        inputs = control.get("inputs") or {}
        values += [(inputs.get("images") or [None])[0], control["kind"], control.get("path") or "",
                   inputs.get("preprocess") or "", float(control["weight"]), float(inputs.get("end", 1.0))]
    else:
        values += [None, "controlnet", "", "", 1.0, 1.0]
    adapters = [a for a in r.adapters if a.get("path") and a.get("kind") not in INPUT_KINDS]
    for i in range(SLOTS):
        if i < len(adapters):
            weight = adapters[i]["weight"]
            values += [adapters[i]["path"], float(weight) if isinstance(weight, (int, float)) else 1.0, True]
        else:
            values += [None, 1.0, False]
    return values


def random_seed() -> int:
    return secrets.randbelow(2**32)


# ---------------------------------------------------------------------------------------- train

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


class Jobs:
    """Training jobs of this server: one thread each; their state lives in the library's jobs table
    (batch "ui"), so a reloaded page, or a second browser, sees them."""

    def __init__(self) -> None:
        self.threads: dict[int, threading.Thread] = {}
        self.stops: dict[int, threading.Event] = {}

    def running(self, job_id: int) -> bool:
        thread = self.threads.get(job_id)
        return thread is not None and thread.is_alive()

    def running_named(self, name: str) -> bool:
        return any(j["name"] == name and self.running(j["id"]) for j in library().jobs("ui"))

    def start(self, config: Any, *, resume: bool = False, name: str | None = None) -> int:
        from dataclasses import asdict

        name = name or Path(config.out).stem
        if self.running_named(name):
            raise ValueError(f"training {name!r} is already running.")
        job_id = library().start_job("ui", name, asdict(config))
        stop = self.stops[job_id] = threading.Event()
        thread = threading.Thread(target=self._run, args=(job_id, config, resume, stop), daemon=True,
                                  name=f"train-{name}")
        self.threads[job_id] = thread
        thread.start()
        return job_id

    def _run(self, job_id: int, config: Any, resume: bool, stop: threading.Event) -> None:
        from studio.training.trainer import TrainingCancelled, train

        db = library()
        db.update_job(job_id, status="running")
        try:
            path = train(config, resume=resume, log=lambda line: log.info("job %s: %s", job_id, line),
                         progress=lambda step, total, loss: db.update_job(job_id, step=step,
                                                                          result=json.dumps({"loss": loss})),
                         should_stop=stop.is_set)
        except TrainingCancelled as error:
            db.update_job(job_id, status="cancelled", error=str(error))
            return
        except Exception as error:  # noqa: BLE001 - the job's row carries the message to the page
            log.exception("training job %s failed", job_id)
            db.update_job(job_id, status="failed", error=f"{type(error).__name__}: {error}")
            return
        try:
            thumbnail = make_thumbnail(path, config.backbone)
        except Exception:  # noqa: BLE001 - a missing thumbnail must not fail a finished training
            log.exception("thumbnail of %s", path)
            thumbnail = None
        db.add_adapter(path, tags=["trained"], thumbnail=thumbnail)
        db.update_job(job_id, status="done", step=config.steps, result=json.dumps({"path": str(path)}))

    def cancel(self, job_id: int) -> None:
        if job_id in self.stops:
            self.stops[job_id].set()


JOBS = Jobs()


def new_adapter_path(name: str, ending: str = ".safetensors", *, unique: bool = False) -> Path:
    """adapters/<name><ending> for a new adapter (Train, Merge, Erase). A name that a running job or a file holds
    (the adapter's file, a control model's folder, or what a training run writes beside it: run_paths) is
    refused (the page has no overwrite: the user picks another name, as `studio` refuses an existing --out), or
    with `unique` (a name the page made up) becomes `name-1`, `name-2`..."""
    import gradio as gr

    from studio.training.trainer import run_paths

    adapters = folder("adapters")
    candidate, i = name, 0
    while True:
        files = [adapters / candidate, *run_paths(adapters / f"{candidate}.safetensors").values()]
        held = "is training" if JOBS.running_named(candidate) else next(
            (f"exists already (adapters/{p.name})" for p in files if p.exists()), None)
        if not held:
            return adapters / f"{candidate}{ending}"
        if not unique:
            raise gr.Error(f"An adapter named {name!r} {held}; choose another name.")
        i += 1
        candidate = f"{name}-{i}"


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


@ui_errors
def start_training(source: str, table: Any, name: str, kind: str, backbone: str, trigger: str, steps: int,
                   rank: int | None, lr: float, tokens: int = 0, condition: str | None = None,
                   recipe: str | None = None) -> int:
    """Start: the images and the table's captions are copied into training/<name>/, then a job
    trains adapters/<name>.safetensors (a control model: the folder adapters/<name>) with the recipe of its
    backbone and kind (`recipe`: one of its variants), the fields on top. `tokens` > 0 learns the trigger as
    that many token vectors (pivotal tuning); `condition`: a control model's maps. Returns the job id."""
    import gradio as gr

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
    from studio.training.recipes import adapter_options

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
    return JOBS.start(config)


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
    return JOBS.start(TrainConfig(**json.loads(job["config"])), resume=True, name=job["name"])


def cancel_training(job_id: int | None) -> str:
    """Cancel: the job stops after its current step and keeps a checkpoint to resume from."""
    if job_id:
        JOBS.cancel(int(job_id))
        return "Cancelling after the current step..."
    return "No training job is running."


def latest_job() -> int | None:
    """The newest UI training job (what a reloaded page shows)."""
    jobs = library().jobs("ui")
    return max(jobs, key=lambda j: j["updated"])["id"] if jobs else None


def job_view(job_id: int | None) -> tuple[str, str | None, list[str]]:
    """The Train tab's live view of a job: progress HTML, the loss plot and the sample sheets."""
    from studio.training.trainer import TrainConfig, loss_plot

    job = library().job(int(job_id)) if job_id else None
    if job is None:
        return "<p>No training yet: add images and press Start.</p>", None, []
    config = json.loads(job["config"])
    paths = TrainConfig(**config).paths()
    status = job["status"]
    if status == "running" and not JOBS.running(job["id"]):
        status = "interrupted"  # the server restarted under it: resume continues from its checkpoint
    step, total = job["step"] or 0, config["steps"]
    loss = json.loads(job["result"] or "{}").get("loss")
    words = {"queued": "starting", "running": "training", "retrying": "retrying", "done": "done", "failed": "failed",
             "cancelled": "cancelled", "interrupted": "interrupted (press Resume)"}[status]
    detail = f", loss {loss:.4f}" if isinstance(loss, float) else ""
    page = (f"<div class='progress-wrap' data-status='{status}'><b>{job['name']}</b>: {words}: "
            f"step {step} of {total}{detail}<br><progress value='{step}' max='{total}'></progress>")
    if job["error"] and status in ("failed", "cancelled"):
        page += f"<p>{html.escape(job['error'])}</p>"
    page += "</div>"
    plot = None
    if paths["log"].is_file():
        losses = [json.loads(line)["loss"] for line in paths["log"].read_text().splitlines() if line.strip()]
        plot = str(loss_plot(losses, paths["log"].with_suffix(".png")))
    samples = sorted(str(p) for p in paths["samples"].glob("*.png")) if paths["samples"].is_dir() else []
    return page, plot, samples


def live_view(job_id: int | None, seen: list | None):
    """One tick of the Train tab's live view: the job's view, what it was drawn from, and the timer.
    An unchanged job row redraws nothing (the tick costs one database read, not a loss plot); once the
    view shows a job that is not running (or no job) the timer stops, and Start or Resume restart it,
    so an idle page sends no requests that would slow a generation."""
    import gradio as gr

    job = library().job(int(job_id)) if job_id else None
    running = bool(job) and JOBS.running(job["id"])
    now = [job_id, job["status"], job["step"], job["updated"], running] if job else [None]
    timer = gr.skip() if running else gr.Timer(active=False)
    if now == seen:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), timer
    return (*job_view(job_id), now, timer)


# ---------------------------------------------------------------------------------------- merge

@ui_errors
def merge_plan(paths: list[str] | None) -> tuple[list[list[Any]], str, str]:
    """The interference plan of the picked adapters: table rows, the verdict, the recommended method."""
    import gradio as gr

    from studio.merge import plan

    if not paths or len(paths) < 2:
        raise gr.Error("Pick at least two adapters to see how they interfere.")
    result = plan(list(paths))
    rows = [[block, pair, s.modules, round(s.cosine, 3), round(s.overlap, 3), round(s.crosstalk, 3)]
            for block, pairs in result.blocks.items() for pair, s in pairs.items()]
    rows += [["(all)", pair, s.modules, round(s.cosine, 3), round(s.overlap, 3), round(s.crosstalk, 3)]
             for pair, s in result.pairs.items()]
    verdict = f"Interference score **{result.score:.3f}**: recommended method **{result.method}** ({result.reason})."
    return rows, verdict, result.method


def _weights(text: str, n: int) -> list[str]:
    parts = [p.strip() for p in (text or "").split(";" if ";" in (text or "") else ",") if p.strip()]
    return parts or ["1"] * n


def _merge(paths: list[str], method: str, weights: str, out: Path, *, overwrite: bool = False):
    from studio.merge import merge

    return merge(list(paths), method=method or "linear", weights=_weights(weights, len(paths)), out=out,
                 overwrite=overwrite)


def default_prompts(paths: list[str] | None) -> str:
    """Test prompts for a merge preview: all trigger words together, then each adapter's alone."""
    rows = [library().adapter(p) for p in paths or []]
    triggers = [" ".join(json.loads(r["trigger_words"] or "[]")) or r["name"] for r in rows if r]
    return "\n".join(([" and ".join(triggers)] if len(triggers) > 1 else []) + triggers)


@ui_errors
def merge_preview(paths: list[str] | None, method: str, weights: str, prompts: str, backbone: str,
                  seed: int = 0) -> list[tuple[str, str]]:
    """Merge into a scratch file and render each test prompt with it (nothing is saved to the library)."""
    import gradio as gr

    if not paths or len(paths) < 2:
        raise gr.Error("Pick at least two adapters to merge.")
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if not lines:
        raise gr.Error("Give at least one test prompt (one per line).")
    scratch = folder("merge-preview") / f"preview-{secrets.token_hex(4)}.safetensors"
    _merge(paths, method, weights, scratch)
    out = []
    try:
        with only_adapter(backbone, scratch) as pipeline:
            for i, prompt in enumerate(lines[:8]):
                image = pipeline.generate(prompt, seed=int(seed) + i).images[0]
                path = scratch.with_name(f"{scratch.stem}-{i}.png")
                image.save(path)
                out.append((str(path), prompt))
    finally:
        scratch.unlink(missing_ok=True)
    return out


@ui_errors
def merge_save(paths: list[str] | None, method: str, weights: str, name: str) -> str:
    """Save the merge as adapters/<name>.safetensors and add it to the library."""
    import gradio as gr

    if not paths or len(paths) < 2:
        raise gr.Error("Pick at least two adapters to merge.")
    name = safe_name(name or "", fallback="")
    if not name:
        raise gr.Error("Give the merged adapter a name.")
    out = new_adapter_path(name)
    result = _merge(paths, method, weights, out)
    library().add_adapter(out, tags=["merged"])
    cut = f"; largest rank cut {result.max_truncation:.3f}" if result.max_truncation > 1e-6 else ""
    return f"Saved {out.name} ({method or 'linear'} of {len(paths)} adapters{cut}); it is in the library."


# ----------------------------------------------------------------------------------------- erase

def erase_prompts(concepts: str) -> str:
    """Default test prompts of the Erase tab: one naming each concept."""
    return "\n".join(f"a {c.strip()}" for c in (concepts or "").split(",") if c.strip())


@ui_errors
def erase_concept(concepts: str, method: str, preserve: str, backbone: str, steps: int | None,
                  name: str, templates: str = "") -> tuple[str, str]:
    """Make an eraser (comma-separated concepts: UCE erases them together; `templates`: prompts with {}
    where the concept goes, one per line), save it under adapters/ and in the library; returns the
    note and the file's path. The backbone's shared pipeline is held
    while it is made (UCE takes seconds, ESD/SPM train for minutes)."""
    import gradio as gr
    from studio.adapters.erase import erase

    words = [c.strip() for c in (concepts or "").split(",") if c.strip()]
    if not words:
        raise gr.Error("Name the concept to erase (several, comma-separated, with UCE).")
    method = method or "uce"
    name = safe_name(name or "", fallback="")
    out = new_adapter_path(name) if name else new_adapter_path(safe_name(f"erase-{'-'.join(words)}"), unique=True)
    notes: list[str] = []
    pipeline, lock = pipeline_for(backbone or DEFAULT_BACKBONE)
    with lock:
        pipeline.detach()  # an eraser is made against the plain backbone
        adapter = erase(words if len(words) > 1 else words[0], method=method, backbone=pipeline.backbone,
                        preserve=preserve or [], steps=int(steps) if steps else None, name=out.stem, out=str(out),
                        templates=[t.strip() for t in (templates or "").splitlines() if t.strip()] or None,
                        warn=notes.append)
    for note in notes:
        gr.Warning(note)
    library().add_adapter(out, tags=["eraser", method])
    return (f"Saved {out.name}: {method} eraser of {', '.join(adapter.config.concepts)} ({len(adapter.config.targets)} "
            f"modules, rank {adapter.config.rank}); it is in the library and the Generate tab's adapters."), str(out)


@ui_errors
def erase_preview(path: str | None, prompts: str, backbone: str, seed: int = 0) -> list[tuple[str, str]]:
    """Each test prompt before and after the eraser, with the same seed (up to 4 prompts)."""
    import gradio as gr

    if not path or not Path(path).is_file():
        raise gr.Error("Make an eraser first (the Erase button).")
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if not lines:
        raise gr.Error("Give at least one test prompt (one per line).")
    pipeline, lock = pipeline_for(backbone or DEFAULT_BACKBONE)
    stem = f"erase-{secrets.token_hex(4)}"
    images: dict[tuple[int, str], str] = {}
    with lock:
        try:
            for label, stack in (("before", []), ("after", [(str(path), 1.0)])):  # one attach for all prompts
                use_adapters(pipeline, stack)
                for i, prompt in enumerate(lines[:4]):
                    target = folder("erase-preview") / f"{stem}-{i}-{label}.png"
                    pipeline.generate(prompt, seed=int(seed) + i).images[0].save(target)
                    images[i, label] = str(target)
        finally:
            pipeline.detach()
    return [(images[i, label], f"{label}: {prompt}") for i, prompt in enumerate(lines[:4])
            for label in ("before", "after")]


# ------------------------------------------------------------------------------------------ page

def generate_tab(backbones: list[str]):
    """The Generate tab: prompt, settings, adapter stack, image prompt, control; returns the stack's pickers."""
    import gradio as gr

    with gr.Tab("Generate") as generate_tab:
        recipes = gr.State([])
        selected = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle, large, in the centre",
                                        scale=5)
                    button = gr.Button("Generate", variant="primary", scale=1, min_width=110)
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    backbone = gr.Dropdown(label="Backbone", choices=backbones, value=DEFAULT_BACKBONE,
                                           allow_custom_value=True,
                                           info="embedded name, hub id, diffusers folder or .safetensors")
                    scheduler = gr.Dropdown(label="Scheduler", choices=[""] + list(SCHEDULERS), value="",
                                            info="empty: the family's default")
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=100, step=1, value=25)
                    guidance = gr.Slider(label="Guidance", minimum=0, maximum=20, step=0.5, value=7.0)
                with gr.Row():
                    width = gr.Number(label="Width", value=64, precision=0, minimum=8)
                    height = gr.Number(label="Height", value=64, precision=0, minimum=8)
                    n = gr.Number(label="Images", value=1, precision=0, minimum=1, maximum=16)
                    seed = gr.Number(label="Seed", value=-1, precision=0, info="-1: random")
                    dice = gr.Button("Randomise seed", size="sm")
                with gr.Accordion("Image prompt (IP-Adapter)", open=False):
                    with gr.Row():
                        ip_image = gr.Image(label="Reference image", type="filepath", height=140,
                                            sources=["upload", "clipboard"], elem_classes="pixelated")
                        with gr.Column():
                            ip_scale = gr.Slider(label="Image scale", minimum=0, maximum=1.5, step=0.05, value=1.0,
                                                 info="1 for the image alone; about 0.8 beside a text prompt")
                            ip_routing = gr.Radio(label="The image steers", value="all",
                                                  choices=[("everything", "all"), ("style only", "style"),
                                                           ("layout only", "layout"),
                                                           ("style and layout", "style+layout")])
                            ip_content = gr.Textbox(label="Subtract content (InstantStyle)",
                                                    placeholder="words naming what the reference shows")
                with gr.Accordion("Control (ControlNet / T2I-Adapter)", open=False):
                    with gr.Row():
                        control_image = gr.Image(label="Control image", type="filepath", height=140,
                                                 sources=["upload", "clipboard"], elem_classes="pixelated")
                        control_map = gr.Image(label="Control map (what the model reads)", type="pil", height=140,
                                               interactive=False, elem_classes="pixelated")
                    with gr.Row():
                        control_kind = gr.Radio(label="Model", choices=CONTROL_CHOICES, value="controlnet",
                                                info="the backbone's own (world-sd ships mask models)")
                        control_preprocess = gr.Dropdown(label="Preprocessor", choices=PREPROCESS, value="")
                    control_model = gr.Textbox(label="Control model folder",
                                               placeholder="empty: the backbone's own; or a diffusers ControlNet / "
                                                           "T2I-Adapter folder")
                    with gr.Row():
                        control_scale = gr.Slider(label="Control scale", minimum=0, maximum=2, step=0.05, value=1.0)
                        control_end = gr.Slider(label="Acts until", minimum=0.05, maximum=1, step=0.05, value=1.0,
                                                info="fraction of the steps (T2I-Adapter: early steps suffice)")
                with gr.Accordion("Adapters", open=False):
                    slots: list[Any] = []
                    pickers = []
                    for i in range(SLOTS):
                        with gr.Row():
                            picker = gr.Dropdown(label=f"Adapter {i + 1}", choices=[], value=None, scale=4)
                            weight = gr.Slider(label="Weight", minimum=-2, maximum=2, step=0.05, value=1.0,
                                               scale=3)
                            on = gr.Checkbox(label="On", value=True, scale=1, min_width=60)
                        slots += [picker, weight, on]
                        pickers.append(picker)
            with gr.Column(scale=4):
                # fit_columns=False: one image is a quarter of the row, not a square cell taller than the gallery
                gallery = gr.Gallery(label="Images", format="png", columns=4, height=300, object_fit="contain",
                                     fit_columns=False, elem_classes="pixelated", preview=False)
                parameters = gr.Textbox(label="Parameters", lines=4, buttons=["copy"])
                with gr.Row():
                    reuse = gr.Button("Reuse this recipe")
                    download = gr.DownloadButton("Download PNG", value=None)
        inputs = [prompt, negative, backbone, n, seed, steps, guidance, width, height, scheduler, ip_image, ip_scale,
                  ip_routing, ip_content, control_image, control_kind, control_model, control_preprocess,
                  control_scale, control_end, *slots]
        for trigger in (control_image.change, control_preprocess.change):
            trigger(preview_control, [control_image, control_preprocess], control_map)
        button.click(generate_images, inputs, [gallery, recipes, parameters], concurrency_limit=2)
        dice.click(random_seed, None, seed)

        def on_select(recipe_list: list[str], evt: gr.SelectData):
            text, recipe = select_image(recipe_list, evt.index)
            path = evt.value["image"]["path"] if isinstance(evt.value, dict) and "image" in evt.value else None
            return text, recipe, gr.update(value=path)

        gallery.select(on_select, recipes, [parameters, selected, download])
        reuse.click(reuse_recipe, selected, inputs)

        def refresh_pickers():
            choices = adapter_choices()
            return [gr.update(choices=choices) for _ in pickers]

        generate_tab.select(refresh_pickers, None, pickers)
    return pickers


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

        def restart_timer():
            return gr.Timer(active=True)

        filled = [recipe, train_steps, rank, lr, condition, recipe_note]
        for picker in (kind, train_backbone, recipe):
            picker.input(recipe_fields, [train_backbone, kind, recipe], filled)
        start.click(start_training, [source, captions, name, kind, train_backbone, trigger, train_steps, rank, lr,
                                     tokens, condition, recipe],
                    job).success(restart_timer, None, timer)
        resume.click(resume_training, job, job).success(restart_timer, None, timer)
        cancel.click(cancel_training, job, note)
    return job, timer, (recipe_fields, [train_backbone, kind, recipe], filled)


def merge_tab(backbones: list[str]):
    """The Merge tab: interference plan, preview, save."""
    import gradio as gr

    with gr.Tab("Merge") as merge_tab:
        with gr.Row():
            with gr.Column(scale=4):
                merge_sources = gr.Dropdown(label="Adapters to merge", choices=[], multiselect=True)
                show_plan = gr.Button("Show interference plan")
                verdict = gr.Markdown()
                plan_table = gr.Dataframe(label="Interference per block",
                                          headers=["block", "pair", "modules", "cosine", "overlap", "crosstalk"],
                                          interactive=False, max_height=240)
            with gr.Column(scale=4):
                with gr.Row():
                    method = gr.Dropdown(label="Method", choices=["linear", "concat", "svd", "orthogonal", "ties",
                                                                  "dare_linear", "dare_ties", "magnitude_prune"],
                                         value="linear")
                    merge_weights = gr.Textbox(label="Weights", placeholder="1,1  or  1;up_blocks.1=0,1")
                merge_backbone = gr.Dropdown(label="Preview backbone", choices=backbones, value=DEFAULT_BACKBONE,
                                             allow_custom_value=True)
                test_prompts = gr.Textbox(label="Test prompts (one per line)", lines=3)
                preview = gr.Button("Preview")
                grid = gr.Gallery(label="Preview", columns=4, height=200, object_fit="contain", fit_columns=False,
                                  elem_classes="pixelated")
                with gr.Row():
                    merged_name = gr.Textbox(label="Merged adapter name", scale=3)
                    save = gr.Button("Save merge", variant="primary", scale=1)
                merge_note = gr.Markdown()
        show_plan.click(merge_plan, merge_sources, [plan_table, verdict, method])
        merge_sources.change(default_prompts, merge_sources, test_prompts)
        preview.click(merge_preview, [merge_sources, method, merge_weights, test_prompts, merge_backbone], grid)
        save.click(merge_save, [merge_sources, method, merge_weights, merged_name], merge_note)
        merge_tab.select(lambda: gr.update(choices=adapter_choices()), None, merge_sources)


def erase_tab(backbones: list[str]):
    """The Erase tab: make an eraser, preview before / after."""
    import gradio as gr

    with gr.Tab("Erase"):
        eraser = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                concept = gr.Textbox(label="Concept to erase", placeholder="circle   (UCE: circle, ring, square)")
                with gr.Row():
                    erase_method = gr.Dropdown(label="Method", choices=["uce", "esd", "spm"], value="uce",
                                               info="uce: closed form, seconds; esd/spm: trained")
                    erase_backbone = gr.Dropdown(label="Backbone", choices=backbones, value=DEFAULT_BACKBONE,
                                                 allow_custom_value=True)
                preserve = gr.Textbox(label="Keep these (comma-separated)", placeholder="square, triangle")
                with gr.Row():
                    erase_steps = gr.Number(label="Training steps (esd/spm)", value=0, precision=0, minimum=0,
                                            info="0: the method's default")
                    eraser_name = gr.Textbox(label="Eraser name", placeholder="erase-circle")
                erase_templates = gr.Textbox(label="Prompts naming the concept (optional)", lines=2,
                                             placeholder="a small red {} on a plain background\n{} , top left",
                                             info="one per line, {} where the concept goes; default: generic ones")
                erase_button = gr.Button("Erase", variant="primary")
                erase_note = gr.Markdown()
            with gr.Column(scale=4):
                erase_tests = gr.Textbox(label="Test prompts (one per line)", lines=3)
                erase_show = gr.Button("Preview before / after")
                erase_grid = gr.Gallery(label="Before / after", columns=2, height=260, object_fit="contain",
                                        fit_columns=False, elem_classes="pixelated")
        concept.change(erase_prompts, concept, erase_tests)
        erase_button.click(erase_concept, [concept, erase_method, preserve, erase_backbone, erase_steps,
                                           eraser_name, erase_templates], [erase_note, eraser],
                           concurrency_limit=1)
        erase_show.click(erase_preview, [eraser, erase_tests, erase_backbone], erase_grid)


def library_tab():
    """The Library tab: adapters (search, import) and the history of generations."""
    import gradio as gr

    with gr.Tab("Library") as library_tab:
        history_recipes = gr.State([])
        with gr.Row():
            with gr.Column(scale=5):
                search = gr.Textbox(label="Search adapters", placeholder="name, kind, family, trigger word, tag")
                thumbs = gr.Gallery(label="Adapters", columns=6, height=180, object_fit="contain", fit_columns=False,
                                    elem_classes="pixelated")
                adapter_table = gr.Dataframe(label="Adapters",
                                             headers=["name", "kind", "family", "backbone", "trigger words", "tags", "file"],
                                             interactive=False, max_height=220)
            with gr.Column(scale=3):
                adapter_upload = gr.File(label="Import an adapter (.safetensors)", file_types=[".safetensors"],
                                         height=100)
                tags = gr.Textbox(label="Tags for the import", placeholder="character, style")
                import_note = gr.Markdown()
        history = gr.Gallery(label="History", columns=10, height=200, object_fit="contain", fit_columns=False,
                             elem_classes="pixelated")
        history_parameters = gr.Textbox(label="Recipe of the selected image", lines=3)
        search.change(library_view, search, [thumbs, adapter_table])
        adapter_upload.upload(import_adapter, [adapter_upload, tags], import_note).then(
            library_view, search, [thumbs, adapter_table])

        def on_library():
            gallery_items, table = library_view("")
            past, past_recipes = history_view()
            return gallery_items, table, past, past_recipes

        library_tab.select(on_library, None, [thumbs, adapter_table, history, history_recipes])

        def on_history(recipe_list: list[str], evt: gr.SelectData):
            return select_image(recipe_list, evt.index)[0]

        history.select(on_history, history_recipes, history_parameters)


def build_app():
    import gradio as gr

    from studio.embedded import EMBEDDED

    backbones = sorted(EMBEDDED)
    with gr.Blocks(title="studio") as demo:
        gr.Markdown("# studio")
        pickers = generate_tab(backbones)
        job, timer, (fill, filled_from, filled) = train_tab(backbones)
        merge_tab(backbones)
        erase_tab(backbones)
        library_tab()

        def on_load():
            return [latest_job(), gr.Timer(active=True), *[gr.update(choices=adapter_choices()) for _ in pickers]]

        demo.load(on_load, None, [job, timer, *pickers])
        demo.load(fill, filled_from, filled)  # the Train tab's fields from the default recipe
    return demo


def serve(host: str = "127.0.0.1", port: int | None = None, share: bool = False, *, block: bool = True):
    """Launch the UI (127.0.0.1 unless `host` says otherwise); with `block=False`, return the running
    Blocks (tests and benchmarks)."""
    demo = build_app()
    served = [str(folder(name)) for name in ("outputs", "adapters", "thumbnails", "uploads", "merge-preview",
                                             "erase-preview")]
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, css=CSS,
                allowed_paths=served, blocked_paths=[str(p) for p in blocked_paths()],
                prevent_thread_lock=not block, quiet=not block, show_error=True)
    return demo


if __name__ == "__main__":
    serve()
