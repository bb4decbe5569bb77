"""The Merge tab: the interference plan of the picked adapters, a method and weights, a preview grid before
saving."""

import json
import secrets
from pathlib import Path
from typing import Any

from studio.backbones import DEFAULT_BACKBONE
from studio.ui.common import (
    adapter_choices,
    folder,
    library,
    new_adapter_path,
    only_adapter,
    safe_name,
    ui_errors,
)

DEFAULT_METHOD = "linear"


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

    return merge(list(paths), method=method or DEFAULT_METHOD, weights=_weights(weights, len(paths)), out=out,
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
    return f"Saved {out.name} ({method or DEFAULT_METHOD} of {len(paths)} adapters{cut}); it is in the library."


def merge_tab(backbones: list[str]):
    """The Merge tab: interference plan, preview, save."""
    import gradio as gr

    from studio.merge.methods import METHODS

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
                    method = gr.Dropdown(label="Method", choices=list(METHODS), value=DEFAULT_METHOD)
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
