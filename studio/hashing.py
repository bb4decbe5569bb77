"""Content hashes of weights for recipes and manifests, cached by path, size and mtime like A1111's."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from studio.home import atomic_write_bytes, cache_dir

# Files whose content decides what a pipeline folder computes.
_FOLDER_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.txt", "*.model")
_CHUNK = 1 << 20


def _cache_file() -> Path:
    return cache_dir("hashes") / "sha256.json"


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered for as long as its size and mtime stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    atomic_write_bytes(cache_path, json.dumps(cache, indent=0).encode())
    return digest.hexdigest()


def hash_files(path: Path) -> str:
    """sha256 of a file, or of a folder's weight and config files (relative name + content hash)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted({f for pattern in _FOLDER_PATTERNS for f in path.rglob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        rel = os.path.relpath(file, path).replace(os.sep, "/")
        digest.update(f"{rel}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def hash_modules(pipe: Any) -> str:
    """sha256 over a pipeline's module configs and tensors, in a fixed order (for in-memory models)."""
    import torch

    digest = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        config = getattr(component, "config", None)
        if hasattr(config, "to_dict"):  # transformers configs
            config = config.to_dict()
        if isinstance(config, dict):  # diffusers FrozenDict configs are dicts
            # private keys are bookkeeping (`_use_default_values` is a set in random order)
            public = {k: v for k, v in config.items() if not k.startswith("_")}
            digest.update(f"{name}:{json.dumps(public, sort_keys=True, default=str)}".encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
