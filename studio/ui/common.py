"""What the tabs share: the UI's folders and file names, the error wrapper, the pipeline cache, the library,
new adapters' names, and the live view of a job (the Train and Erase tabs run their work as jobs of the
thread executor, studio.jobs)."""

from __future__ import annotations

import html
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

from studio.adapters.control import CONTROL_KINDS
from studio.backbones import DEFAULT_BACKBONE
from studio.home import cache_root, studio_home
from studio.jobs import EXECUTORS, ThreadExecutor

log = logging.getLogger("studio.app")

JOBS: ThreadExecutor = EXECUTORS["thread"]  # the Train and Erase tabs' jobs: threads of this server
TRAIN_BATCH, ERASE_BATCH = "ui", "erase"  # their batches in the library's jobs table
STYLE_KIND = "style_injection"  # the Generate tab's style reference
INPUT_KINDS = ("ip_adapter", STYLE_KIND, *CONTROL_KINDS)  # adapters with run-time images
# what a page shows for registry names (preprocessors, control kinds); a name without a label shows as itself
LABELS = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "canny": "Canny edges",
          "soft_edge": "soft edges (Sobel)", "mask": "object mask", "none": "none: the image is the map"}


def labelled(names: Any) -> list[tuple[str, str]]:
    """(label, name) choices of a dropdown for registry names, in their order."""
    return [(LABELS.get(name, name), name) for name in names]


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
    from studio.recipe import AdapterUse

    pipeline.use([AdapterUse(path, weight) for path, weight in stack])


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


def select_image(recipes: list[str], index: int | None) -> tuple[str, str | None]:
    """A gallery click: that image's A1111 parameters and its recipe JSON."""
    from studio.recipe import Recipe

    if index is None or not recipes or index >= len(recipes):
        return "", None
    return Recipe.from_json(recipes[index]).parameters(), recipes[index]


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
        job = JOBS.running_named(candidate)
        held = (("is training" if job.batch == TRAIN_BATCH else "is being made") if job else
                next((f"exists already (adapters/{p.name})" for p in files if p.exists()), None))
        if not held:
            return adapters / f"{candidate}{ending}"
        if not unique:
            raise gr.Error(f"An adapter named {name!r} {held}; choose another name.")
        i += 1
        candidate = f"{name}-{i}"


# ------------------------------------------------------------------------------------------ jobs

# a job's status in words; "interrupted": running in the table, but not in this server (it restarted)
STATUS_WORDS = {"queued": "starting", "retrying": "retrying", "done": "done", "failed": "failed",
                "cancelled": "cancelled"}


def job_html(job: dict[str, Any], words: dict[str, str], total: int | None) -> str:
    """A job's progress in the page: its name and status in `words` (over STATUS_WORDS; `running` and
    `interrupted` are the tab's), its step of `total` with a bar and its loss (none without a total), and the
    error that stopped it. `data-status` says the status to scripts and tests."""
    status = job["status"]
    if status == "running" and not JOBS.running(job["id"]):
        status = "interrupted"  # the server restarted under it
    info = json.loads(job["result"] or "{}")
    stage = f" ({info['stage']})" if info.get("stage") else ""
    page = f"<div class='progress-wrap' data-status='{status}'><b>{job['name']}</b>: {(STATUS_WORDS | words)[status]}"
    if total:
        step, loss = job["step"] or 0, info.get("loss")
        detail = f", loss {loss:.4f}" if isinstance(loss, float) else ""
        page += f"{stage}: step {step} of {total}{detail}<br><progress value='{step}' max='{total}'></progress>"
    if job["error"] and status in ("failed", "cancelled"):
        page += f"<p>{html.escape(job['error'])}</p>"
    return page + "</div>"


def tick(job_id: int | None, seen: list | None, view: Callable[[int | None], tuple], outputs: int):
    """One tick of a tab's live view of a job: `view(job_id)` (its `outputs` values), what it was drawn from,
    and the timer. An unchanged job row redraws nothing (the tick costs one database read); once the view shows
    a job that is not running (or no job) the timer stops, and the tab's buttons restart it, so an idle page
    sends no requests that would slow a generation."""
    import gradio as gr

    job = library().job(int(job_id)) if job_id else None
    running = bool(job) and JOBS.running(job["id"])
    now = [job_id, job["status"], job["step"], job["updated"], running] if job else [None]
    timer = gr.skip() if running else gr.Timer(active=False)
    if now == seen:
        return (*[gr.skip()] * (outputs + 1), timer)
    return (*view(job_id), now, timer)


def restart_timer():
    import gradio as gr

    return gr.Timer(active=True)
