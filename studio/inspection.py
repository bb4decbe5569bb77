"""What a file or folder is (checkpoint, adapter, pipeline folder, studio image), read without loading weights."""

from __future__ import annotations

import json
from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

from studio import concept_tokens
from studio.adapters.base import MANIFEST_KEY, read_manifest
from studio.backbones import (
    PICKLE_SUFFIXES,
    detect_family_from_keys,
    family_of_denoiser,
    read_safetensors_header,
)
from studio.errors import BackboneNotFoundError, NotACheckpointError, StudioError
from studio.folders import check_pipeline_folder, pipeline_components

ADAPTER_MARKERS = {
    "kohya LoRA (A1111/ComfyUI)": ("lora_unet_", "lora_te", "lora_transformer_"),
    "PEFT/diffusers LoRA": (".lora_A.", ".lora_B."),
    "LyCORIS LoHa": (".hada_w1",),
    "LyCORIS LoKr": (".lokr_w1",),
    "LoRA (lora_down/lora_up)": (".lora_down.", ".lora_up."),
}


def inspect_path(path: str | Path) -> dict[str, Any]:
    """A description of `path`: its kind, family, tensors and metadata."""
    path = Path(path).expanduser()
    if not path.exists():
        from studio.embedded import EMBEDDED

        if str(path) in EMBEDDED:
            return {"path": str(path), "kind": "embedded backbone", "builder": EMBEDDED[str(path)].__doc__}
        raise BackboneNotFoundError(f"{str(path)!r} does not exist (nor is it an embedded backbone name).")
    if path.is_dir() and not (path / "model_index.json").is_file() and (path / "config.json").is_file():
        return _inspect_model_folder(path)
    if path.is_dir():
        return _inspect_folder(path)
    if path.suffix.lower() == ".png":
        return _inspect_png(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        read_safetensors_header(path)  # raises UnsafeFileError with the conversion hint
    return _inspect_safetensors(path)


def _inspect_safetensors(path: Path) -> dict[str, Any]:
    keys, shapes, metadata = read_safetensors_header(path)
    info: dict[str, Any] = {
        "path": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "tensors": len(keys),
        "parameters": sum(prod(s) for s in shapes.values()),
    }
    if (manifest := read_manifest(metadata, path)) is not None:
        info |= {"kind": f"studio adapter ({manifest.get('kind', '?')})", "family": manifest.get("family"),
                 "manifest": manifest}
    elif adapter := next((name for name, marks in ADAPTER_MARKERS.items()
                          if any(m in k for k in keys for m in marks)), None):
        info |= {"kind": adapter}
    else:
        try:
            info |= {"kind": "backbone checkpoint", "family": detect_family_from_keys(keys, shapes.__getitem__,
                                                                                       name=path.name)}
        except NotACheckpointError:
            info |= {"kind": "unknown safetensors"}
    _, tokens = concept_tokens.split(shapes)  # a trigger learned as tokens: how many vectors
    if tokens:
        info["concept_tokens"] = {trigger: next(iter(parts.values()))[0] for trigger, parts in tokens.items()}
    info["top_level"] = dict(Counter(k.split(".")[0] for k in keys).most_common(8))
    info["metadata"] = {k: (v if len(v) < 200 else v[:200] + "...") for k, v in metadata.items()
                        if k != MANIFEST_KEY}
    return info


def _inspect_folder(path: Path) -> dict[str, Any]:
    index = check_pipeline_folder(path)
    components = {name: cls for name, (_, cls) in pipeline_components(index).items()}
    info: dict[str, Any] = {"path": str(path), "kind": "diffusers pipeline folder",
                            "pipeline": index.get("_class_name"), "components": components}
    for name in ("unet", "transformer"):
        config_file = path / name / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            try:
                info["family"] = family_of_denoiser(config.get("_class_name", ""), config).name
            except StudioError as error:
                info["family"] = f"unsupported ({error})"
    weights = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin")]
    info["size_mb"] = round(sum(f.stat().st_size for f in weights) / 2**20, 2)
    return info


def _inspect_model_folder(path: Path) -> dict[str, Any]:
    """A one-model diffusers folder (a ControlNet, a T2I-Adapter): its class, config and weights."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    weights = sorted(path.glob("*.safetensors"))
    info: dict[str, Any] = {"path": str(path), "kind": f"diffusers model folder ({config.get('_class_name', '?')})",
                            "config": {k: v for k, v in config.items() if not k.startswith("_")}}
    if weights:
        details = _inspect_safetensors(weights[0])
        info |= {k: details[k] for k in ("tensors", "parameters", "metadata") if k in details}
        if "manifest" in details:
            info |= {"kind": details["kind"], "family": details["manifest"].get("family"),
                     "manifest": details["manifest"]}
    info["size_mb"] = round(sum(f.stat().st_size for f in weights) / 2**20, 2)
    return info


def _inspect_png(path: Path) -> dict[str, Any]:
    from studio.recipe import PARAMETERS_CHUNK, RECIPE_CHUNK, Recipe, read_png_text

    text = read_png_text(path)
    info: dict[str, Any] = {"path": str(path), "kind": "image"}
    if RECIPE_CHUNK in text:
        info |= {"kind": "studio image", "recipe": Recipe.from_json(text[RECIPE_CHUNK]).to_dict()}
    if PARAMETERS_CHUNK in text:
        info["parameters"] = text[PARAMETERS_CHUNK]
    return info
