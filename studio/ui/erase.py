"""The Erase tab: a concept eraser by ESD, SPM or UCE made as a job of the thread executor (studio.jobs), its
progress shown while it is made, then before/after previews; erasers then stack in Generate like any
adapter."""

import json
import secrets
from pathlib import Path
from typing import Any

from studio.backbones import DEFAULT_BACKBONE
from studio.jobs import Emit, started
from studio.ui.common import (
    ERASE_BATCH,
    JOBS,
    folder,
    job_html,
    library,
    new_adapter_path,
    pipeline_for,
    restart_timer,
    safe_name,
    tick,
    ui_errors,
    use_adapters,
)

DEFAULT_METHOD = "uce"  # closed form: seconds
WORDS = {"running": "erasing", "interrupted": "interrupted (erase again)"}


def erase_prompts(concepts: str) -> str:
    """Default test prompts of the Erase tab: one naming each concept."""
    return "\n".join(f"a {c.strip()}" for c in (concepts or "").split(",") if c.strip())


def erase_job(config: dict[str, Any], emit: Emit, should_stop: Any = None) -> Path:
    """The Erase tab's job: the eraser of `config` (studio.training.erasing.erase's arguments) made against the
    backbone's plain shared pipeline, held meanwhile (UCE takes seconds, ESD/SPM train for minutes), and saved;
    its warnings, steps and what it made go to `emit`."""
    from studio.training.erasing import erase

    options = {k: v for k, v in config.items() if k not in ("concepts", "backbone")}
    pipeline, lock = pipeline_for(config["backbone"])
    with lock:
        emit(started("erasing"))
        pipeline.detach()  # an eraser is made against the plain backbone
        adapter = erase(config["concepts"], backbone=pipeline.backbone, **options,
                        warn=lambda line: emit({"event": "warning", "line": line}),
                        progress=lambda step, total, loss: emit({"event": "step", "step": step, "total": total,
                                                                 "loss": loss}),
                        bank_progress=lambda step, total: emit({"event": "step", "step": step, "total": total,
                                                                "stage": "trajectory bank"}))
    made = adapter.config
    emit({"event": "made", "what": f"{made.method} eraser of {', '.join(made.concepts)} ({len(made.targets)} "
                                   f"modules, rank {made.rank})"})
    return Path(config["out"])


@ui_errors
def erase_start(concepts: str, method: str, preserve: str, backbone: str, steps: int | None, name: str,
                templates: str = "") -> int:
    """Start making an eraser (comma-separated concepts: UCE erases them together; `templates`: prompts with {}
    where the concept goes, one per line) into adapters/<name>.safetensors; returns the job's id."""
    import gradio as gr

    words = [c.strip() for c in (concepts or "").split(",") if c.strip()]
    if not words:
        raise gr.Error("Name the concept to erase (several, comma-separated, with UCE).")
    method = method or DEFAULT_METHOD
    name = safe_name(name or "", fallback="")
    out = new_adapter_path(name) if name else new_adapter_path(safe_name(f"erase-{'-'.join(words)}"), unique=True)
    config = dict(concepts=words if len(words) > 1 else words[0], method=method, preserve=preserve or [],
                  backbone=backbone or DEFAULT_BACKBONE, steps=int(steps) if steps else None, name=out.stem,
                  out=str(out), templates=[t.strip() for t in (templates or "").splitlines() if t.strip()] or None)
    return JOBS.start(ERASE_BATCH, out.stem, config, erase_job, tags=["eraser", method])


@ui_errors
def erase_finish(job_id: int) -> tuple[str, str]:
    """The eraser's job once it is over: the note (its warnings shown beside it) and the file's path; the error
    that stopped it, as the page shows errors."""
    import gradio as gr

    job = JOBS.wait(int(job_id))
    if job.error is not None:
        raise job.error
    if job.status != "done":
        raise gr.Error(f"making the eraser {job.name!r} stopped ({job.status}); press Erase again.")
    for line in job.lines("warning"):
        gr.Warning(line)
    what = next(e["what"] for e in job.events if e["event"] == "made")
    out = Path(job.config["out"])
    return f"Saved {out.name}: {what}; it is in the library and the Generate tab's adapters.", str(out)


def erase_concept(concepts: str, method: str, preserve: str, backbone: str, steps: int | None,
                  name: str, templates: str = "") -> tuple[str, str]:
    """Make an eraser (erase_start), wait for it (erase_finish): the note and the file's path."""
    return erase_finish(erase_start(concepts, method, preserve, backbone, steps, name, templates))


def erase_view(job_id: int | None) -> tuple[str]:
    """The Erase tab's live view of its job: progress HTML (a step bar while ESD/SPM sample and train)."""
    job = library().job(int(job_id)) if job_id else None
    if job is None:
        return ("",)
    return (job_html(job, WORDS, json.loads(job["result"] or "{}").get("total")),)


def erase_live_view(job_id: int | None, seen: list | None):
    """One tick of the Erase tab's live view (common.tick)."""
    return tick(job_id, seen, erase_view, 1)


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


def erase_tab(backbones: list[str]):
    """The Erase tab: make an eraser (its progress live), preview before / after."""
    import gradio as gr

    from studio.adapters.erase import METHODS

    with gr.Tab("Erase"):
        eraser = gr.State(None)
        job = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                concept = gr.Textbox(label="Concept to erase", placeholder="circle   (UCE: circle, ring, square)")
                with gr.Row():
                    erase_method = gr.Dropdown(label="Method", value=DEFAULT_METHOD,
                                               choices=[DEFAULT_METHOD, *(m for m in METHODS if m != DEFAULT_METHOD)],
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
                progress = gr.HTML()
                erase_note = gr.Markdown()
            with gr.Column(scale=4):
                erase_tests = gr.Textbox(label="Test prompts (one per line)", lines=3)
                erase_show = gr.Button("Preview before / after")
                erase_grid = gr.Gallery(label="Before / after", columns=2, height=260, object_fit="contain",
                                        fit_columns=False, elem_classes="pixelated")
        concept.change(erase_prompts, concept, erase_tests)
        # the job's view ticks once a second while it runs (as the Train tab's); its end brings the note
        seen = gr.State(None)
        timer = gr.Timer(1.0, active=False)
        timer.tick(erase_live_view, [job, seen], [progress, seen, timer], show_progress="hidden")
        begun = erase_button.click(erase_start, [concept, erase_method, preserve, erase_backbone, erase_steps,
                                                 eraser_name, erase_templates], job, concurrency_limit=1)
        begun.success(restart_timer, None, timer)
        begun.success(erase_finish, job, [erase_note, eraser], concurrency_limit=1)
        erase_show.click(erase_preview, [eraser, erase_tests, erase_backbone], erase_grid)
