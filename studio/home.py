"""Where studio keeps its state: `$STUDIO_HOME` (default `~/.studio`), its caches in `$STUDIO_CACHE` (default
`$STUDIO_HOME/cache`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def studio_home() -> Path:
    """The studio state folder, created on first use."""
    home = Path(os.environ.get("STUDIO_HOME") or Path.home() / ".studio").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_root() -> Path:
    """Where caches go: `$STUDIO_CACHE`, else `$STUDIO_HOME/cache` (as HF_HUB_CACHE sits apart from HF_HOME: one
    cache on a large disk can serve several homes)."""
    return Path(os.environ.get("STUDIO_CACHE") or studio_home() / "cache").expanduser()


def cache_dir(name: str) -> Path:
    """A named folder of the cache root (latents, class images, hashes...), created on first use."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename it into place (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
