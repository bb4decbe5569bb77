"""Shared fixtures: an isolated STUDIO_HOME, no network, tiny backbones loaded once per session."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="studio-home-"))
# one cache for the session, whatever home a test sets: latents and class images are made once
os.environ.setdefault("STUDIO_CACHE", tempfile.mkdtemp(prefix="studio-cache-"))

import pytest  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "pixart")


@pytest.fixture(scope="session")
def backbones():
    """tiny-<family> backbones, each loaded once."""
    from studio.backbones import load_backbone

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_backbone(f"tiny-{family}")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def saved_folders(backbones, tmp_path_factory):
    """tiny-<family> saved as a diffusers folder (what `save_pretrained` writes), once per family."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"folder-{family}")
            backbones(family).pipe.save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return get


def pixels(image):
    import numpy as np

    return np.asarray(image).astype(np.int16)


def bomb(path, side=20000):
    """A small PNG whose header declares side x side pixels (its IHDR patched, CRC recomputed)."""
    import zlib

    from PIL import Image

    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = side.to_bytes(4, "big") * 2
    data[start + 17:start + 21] = zlib.crc32(bytes(data[start:start + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path
