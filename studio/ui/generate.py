"""The Generate tab: prompt and settings, an adapter stack, an image prompt (IP-Adapter), a style reference
(training-free style injection) and a control image; a gallery with each image's recipe, reuse, download."""

# No `from __future__ import annotations`: Gradio reads the `gr.SelectData` annotation of the select
# handlers at run time to pass them the event.
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.adapters.control import CONTROL_KINDS, PREPROCESSORS
from studio.backbones import DEFAULT_BACKBONE
from studio.schedulers import SCHEDULERS
from studio.ui.common import (
    INPUT_KINDS,
    STYLE_KIND,
    adapter_choices,
    folder,
    labelled,
    library,
    pipeline_for,
    select_image,
    ui_errors,
)

if TYPE_CHECKING:
    from studio.recipe import AdapterUse

SLOTS = 4  # adapters in the Generate tab's stack
CONTROL_CHOICES = labelled(CONTROL_KINDS)
# the model's own condition first, the image as the map ("none") last
PREPROCESS = [("the model's own", ""), *labelled(sorted(PREPROCESSORS, key=lambda name: name == "none"))]

_save_lock = threading.Lock()


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


def input_uses(backbone: Any, ip_image: str | None, ip_scale: float, ip_routing: str, ip_content: str,
               control_image: str | None, control_kind: str, control_model: str, control_preprocess: str,
               control_scale: float, control_end: float, style_image: str | None,
               style_weight: float) -> "list[AdapterUse]":
    """The requests of the Generate tab's image inputs on top of the stack: the image prompt (the backbone's own
    IP-Adapter with that reference, scale, routing and content words), the style reference (a training-free style
    injection, as `--style-image`), the control (`control_model`, a ControlNet / T2I-Adapter folder, or the
    backbone's own of `control_kind`, reading the image through `control_preprocess`; empty: the model's own
    condition). An input without its image asks for nothing."""
    from studio.adapters.control import control_use
    from studio.adapters.ip_adapter import image_prompt_use
    from studio.adapters.style import style_use

    uses = []
    if ip_image:
        uses.append(image_prompt_use(backbone, [ip_image], ip_scale, routing=ip_routing, content=ip_content))
    if style_image:
        uses.append(style_use(backbone, style_image, style_weight))
    if control_image:
        uses.append(control_use(backbone, (control_model or "").strip() or control_kind or "controlnet",
                                control_image, control_scale, preprocess=control_preprocess, end=control_end))
    return uses


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
                    style_image: str | None = None, style_weight: float = 1.0,
                    *slots: Any) -> tuple[list[tuple[str, str]], list[str], str]:
    """The Generate button: the gallery (path, caption), each image's recipe JSON, and the first
    image's A1111 parameters. `ip_*`: the image prompt (reference image path, scale, routing, content
    words to subtract); `control_*`: a control image, the model's kind or folder, its preprocessor, scale and
    end; `style_*`: a style reference and its weight; `slots`: (adapter path, weight, on) per stack slot."""
    from studio.recipe import AdapterUse

    pipeline, lock = pipeline_for(backbone or DEFAULT_BACKBONE)
    with lock:
        requests = [AdapterUse(path, weight) for path, weight in _stack(slots)] + input_uses(
            pipeline.backbone, ip_image, ip_scale, ip_routing, ip_content, control_image, control_kind, control_model,
            control_preprocess, control_scale, control_end, style_image, style_weight)
        result = pipeline.generate(prompt, negative_prompt=negative_prompt or "", n=int(n),
                                   seed=None if seed is None or int(seed) < 0 else int(seed), steps=int(steps),
                                   guidance=float(guidance), width=int(width), height=int(height),
                                   scheduler=scheduler or None, adapters=requests)
    with _save_lock:  # numbered file names: one writer at a time
        paths = result.save(folder("outputs"))
    recipes = [r.to_json() for r in result.recipes]
    db = library()
    for path, recipe in zip(paths, recipes, strict=True):
        db.add_generation(path, recipe)
    gallery = [(str(p), f"seed {r.image_seed}") for p, r in zip(paths, result.recipes, strict=True)]
    return gallery, recipes, result.recipes[0].parameters()


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
    style = next((a for a in r.adapters if a.get("kind") == STYLE_KIND), None)
    values += [(style.get("inputs") or {}).get("image"), float(style["weight"])] if style is not None else [None, 1.0]
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


def generate_tab(backbones: list[str]):
    """The Generate tab: prompt, settings, adapter stack, image prompt, style, control; returns the stack's
    pickers."""
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
                with gr.Accordion("Style image (training-free style injection)", open=False):
                    with gr.Row():
                        style_image = gr.Image(label="Style image", type="filepath", height=140,
                                               sources=["upload", "clipboard"], elem_classes="pixelated")
                        style_weight = gr.Slider(label="Style weight", minimum=0, maximum=2, step=0.05, value=1.0,
                                                 info="how much the reference is attended to (0: not at all); "
                                                      "UNet backbones")
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
                  control_scale, control_end, style_image, style_weight, *slots]
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
