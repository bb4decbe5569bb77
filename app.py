"""studio's web UI for artists (Gradio Blocks), built only on the Python API.

    .venv/bin/python app.py            # http://127.0.0.1:7860

This first version has the Generate tab; Train, Merge, Erase and Library join it as they land.
Every image is saved as a PNG with its recipe, so a download can be replayed with `studio generate --from`.
"""

from __future__ import annotations

from functools import lru_cache

from studio.backbones import DEFAULT_BACKBONE, EMBEDDED, _ensure_embedded_registered
from studio.home import studio_home
from studio.schedulers import SCHEDULERS


@lru_cache(maxsize=2)
def pipeline_for(backbone: str):
    from studio.pipelines import StudioPipeline

    return StudioPipeline(backbone)


def generate_images(prompt: str, negative_prompt: str, backbone: str, n: int, seed: int, steps: int,
                    guidance: float, width: int, height: int, scheduler: str) -> tuple[list[str], str]:
    """The Generate button: returns the saved PNG paths and the first image's A1111 parameters."""
    import gradio as gr

    from studio.errors import StudioError

    try:
        pipeline = pipeline_for(backbone or DEFAULT_BACKBONE)
        result = pipeline.generate(prompt, negative_prompt=negative_prompt or "", n=int(n),
                                   seed=None if seed is None or int(seed) < 0 else int(seed), steps=int(steps),
                                   guidance=float(guidance), width=int(width), height=int(height),
                                   scheduler=scheduler or None)
    except StudioError as error:
        raise gr.Error(str(error)) from None
    paths = result.save(studio_home() / "outputs")
    return [str(p) for p in paths], result.recipe.parameters()


def build_app():
    import gradio as gr

    _ensure_embedded_registered()
    with gr.Blocks(title="studio") as demo:
        gr.Markdown("# studio")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2)
                    negative = gr.Textbox(label="Negative prompt")
                    backbone = gr.Dropdown(label="Backbone", choices=sorted(EMBEDDED), value=DEFAULT_BACKBONE,
                                           allow_custom_value=True,
                                           info="An embedded name, a hub id, a diffusers folder or a .safetensors file")
                    with gr.Row():
                        scheduler = gr.Dropdown(label="Scheduler", choices=[""] + list(SCHEDULERS), value="",
                                                info="empty: the family's default")
                        steps = gr.Slider(label="Steps", minimum=1, maximum=100, step=1, value=25)
                        guidance = gr.Slider(label="Guidance", minimum=0, maximum=20, step=0.5, value=7.0)
                    with gr.Row():
                        width = gr.Number(label="Width", value=64, precision=0)
                        height = gr.Number(label="Height", value=64, precision=0)
                        n = gr.Number(label="Images", value=1, precision=0, minimum=1)
                        seed = gr.Number(label="Seed", value=-1, precision=0, info="-1: random")
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", format="png")
                    parameters = gr.Textbox(label="Parameters", lines=4, buttons=["copy"])
            button.click(generate_images, [prompt, negative, backbone, n, seed, steps, guidance, width, height,
                                           scheduler], [gallery, parameters])
    return demo


if __name__ == "__main__":
    build_app().launch(server_name="127.0.0.1")
