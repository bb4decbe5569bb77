"""studio's web UI for artists (Gradio Blocks), built only on the Python API.

    studio serve                       # http://127.0.0.1:7860  (or: .venv/bin/python app.py)
    studio serve --host 0.0.0.0 --port 8000

Tabs, one module each under studio/ui/: Generate (adapter stack, image prompt, style image, control, gallery
with each image's recipe, reuse, download), Train (upload or a server folder, caption table, live progress,
loss plot and samples, cancel, resume), Merge (the interference plan, method and weights, a preview grid
before saving), Erase (a concept eraser by ESD, SPM or UCE with its progress, before/after previews; erasers
then stack in Generate like any adapter) and Library (adapters with thumbnails, search, import by upload; the
history of generations). This module builds the page from them and serves it; the handlers are re-exported
here for tests and scripts.

Every handler is a plain function (tested directly in tests/test_app.py); the page only wires them to
components. Files live under `$STUDIO_HOME`: outputs/ (images, each PNG carrying its recipe), adapters/
(trained, merged, imported, erasers), thumbnails/, uploads/ and training/ (staged images with their captions).
Training and erasing are jobs of studio.jobs' thread executor: they go on when the browser closes, and their
state is in the library database, so a reloaded page shows a training job again.
"""

from studio.ui.common import (
    JOBS,
    adapter_choices,
    blocked_paths,
    folder,
    library,
    pipeline_for,
    safe_name,
    select_image,
)
from studio.ui.erase import erase_concept, erase_preview, erase_prompts, erase_tab
from studio.ui.generate import SLOTS, generate_images, generate_tab, preview_control, reuse_recipe
from studio.ui.library import history_view, import_adapter, library_tab, library_view
from studio.ui.merge import default_prompts, merge_plan, merge_preview, merge_save, merge_tab
from studio.ui.train import (
    cancel_training,
    job_view,
    latest_job,
    live_view,
    pick_server_folder,
    recipe_fields,
    resume_training,
    stage_uploads,
    start_training,
    train_tab,
)

__all__ = ["JOBS", "SLOTS", "adapter_choices", "build_app", "cancel_training", "default_prompts", "erase_concept",
           "erase_preview", "erase_prompts", "folder", "generate_images", "history_view", "import_adapter",
           "job_view", "latest_job", "library", "library_view", "live_view", "merge_plan", "merge_preview",
           "merge_save", "pick_server_folder", "pipeline_for", "preview_control", "recipe_fields",
           "resume_training", "reuse_recipe", "safe_name", "select_image", "serve", "stage_uploads",
           "start_training"]

MAX_UPLOAD = "50mb"  # per file (Gradio refuses larger uploads before they reach a handler)
# the UI's folders the page may serve files from
SERVED = ("outputs", "adapters", "thumbnails", "uploads", "merge-preview", "erase-preview")
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.progress-wrap progress { width: 100%; height: 1.2em; }
"""


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
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, css=CSS,
                allowed_paths=[str(folder(name)) for name in SERVED], blocked_paths=[str(p) for p in blocked_paths()],
                prevent_thread_lock=not block, quiet=not block, show_error=True)
    return demo


if __name__ == "__main__":
    serve()
