"""Where studio keeps its state: `$STUDIO_HOME` (default `~/.studio`), its caches in `$STUDIO_CACHE` (default
`$STUDIO_HOME/cache`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """A temp file (or, with `folder`, a temp folder) beside `path` to write into: renamed into place when the
    block ends, removed when it fails, so no reader ever sees half a file. Its name ends in the target's own
    suffix (np.savez and the like append theirs otherwise). The one copy of this idiom in studio."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.stem}.", f".tmp{path.suffix}"
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
