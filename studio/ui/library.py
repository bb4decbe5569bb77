"""The Library tab: adapters with thumbnails, search, import by upload; the history of generations."""

# No `from __future__ import annotations`: Gradio reads the `gr.SelectData` annotation of the select
# handlers at run time to pass them the event.
import json
import shutil
from pathlib import Path
from typing import Any

from studio.ui.common import folder, free_path, library, safe_name, select_image, ui_errors


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
