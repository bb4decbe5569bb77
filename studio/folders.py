"""Checks of local model files before diffusers reads them: a truncated .safetensors, a pipeline folder missing
a component. Imported by the backbones and the embedded world models alike (nothing here imports either).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.errors import NotACheckpointError


def check_safetensors_complete(path: Path) -> None:
    """Refuse a .safetensors file whose header or tensor data ends early (an interrupted copy or
    download), naming it: diffusers and transformers say only 'Unable to load weights'."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise NotACheckpointError(f"{path} is not a readable .safetensors file ({size} bytes, its header is cut "
                                  f"or damaged); copy or download it again.")
    end = max((entry["data_offsets"][1] for key, entry in header.items()
               if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if size < 8 + length + end:
        raise NotACheckpointError(f"{path} is truncated: {size:,} bytes of the {8 + length + end:,} its header "
                                  f"promises; copy or download it again.")


def pipeline_components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The components a model_index.json names, as name -> (library, class); [null, null] entries left out."""
    return {name: (value[0], value[1]) for name, value in index.items()
            if isinstance(value, list) and len(value) == 2 and value[1]}


def check_pipeline_folder(folder: Path) -> dict[str, Any]:
    """A local diffusers folder's model_index.json, after checking that every component it names is there
    and every .safetensors file in them is complete; errors name the missing or broken file."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise NotACheckpointError(
            f"folder {str(folder)!r} has no model_index.json, so it is not a diffusers pipeline folder; "
            f"point at the folder that holds model_index.json, or at a single .safetensors checkpoint.")
    index = json.loads(index_file.read_text())
    for name, (library, cls) in pipeline_components(index).items():
        part = folder / name
        if not part.is_dir() or not any(part.iterdir()):
            raise NotACheckpointError(f"{index_file} names the component {name!r} ({cls}), but {part} is "
                                      f"missing or empty; restore that folder (or pass {name}=None to "
                                      f"from_pretrained if the pipeline can run without it).")
        is_model = not any(word in cls for word in ("Tokenizer", "Scheduler", "Processor", "Extractor"))
        if library in ("diffusers", "transformers") and is_model and not (part / "config.json").is_file():
            raise NotACheckpointError(f"{part / 'config.json'} is missing: {name} ({cls}) cannot be built "
                                      f"without it; restore the file.")
        for weights in sorted(part.glob("*.safetensors")):
            check_safetensors_complete(weights)
    return index
