"""Where studio keeps its state: `$STUDIO_HOME` (default `~/.studio`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def studio_home() -> Path:
    """The studio state folder, created on first use."""
    home = Path(os.environ.get("STUDIO_HOME") or Path.home() / ".studio").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(name: str) -> Path:
    """A named folder under `$STUDIO_HOME/cache`, created on first use."""
    path = studio_home() / "cache" / name
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
