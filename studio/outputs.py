"""Outputs: checked before the work, one writer each, and one policy for what is already there.

Every command that writes (train, train-batch jobs, generate, merge, erase, convert, the web UI) calls
`claim(path)` before it loads a model: the location must be writable, an existing output is refused unless
`overwrite`, and an exclusive lock beside it (`.NAME.lock`, flock'd, holding the writer's pid and command)
keeps a second studio process from writing the same output. The kernel drops a flock when its process dies, so
a lock left by a killed run is simply taken over; the file is removed when its writer lets go.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from studio.errors import InvalidArgumentError, StudioError

try:  # POSIX; elsewhere outputs are not locked (checked for existence and writability all the same)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class OutputBusyError(StudioError, RuntimeError):
    """Another live studio process is writing the same output."""


def check_writable(path: str | Path, *, what: str = "--out") -> Path:
    """The folder `path` goes in can take a new file (tried with a probe file; folders made for the try are
    removed again, so a refusal that follows leaves nothing); raised before any work, naming `what` and the path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".studio-probe-"):
            pass
    except OSError as error:
        raise InvalidArgumentError(f"{what} {str(path)!r}: cannot write in {str(parent)!r} ({error.strerror or error}); "
                                   f"choose a folder you can write to.") from None
    finally:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return path


def check_new(path: str | Path, *, overwrite: bool, what: str = "--out") -> None:
    if Path(path).exists() and not overwrite:
        raise InvalidArgumentError(f"{what} {str(path)!r} exists; choose another name or pass --overwrite "
                                   f"(overwrite=True).")


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} ({info['command']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


_held: dict[Path, int] = {}  # outputs this process holds, and how many times (a batch job holds what train() takes)


@contextlib.contextmanager
def lock(path: str | Path, *, what: str = "--out") -> Iterator[Path]:
    """Hold the output `path` for this process (again, if it holds it already); OutputBusyError when another
    live process holds it."""
    path = Path(path)
    key = path.resolve()
    if fcntl is None or key in _held:  # pragma: no cover (fcntl is None)
        _held[key] = _held.get(key, 0) + 1
        try:
            yield path
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    target = _lock_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(target, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise OutputBusyError(f"{what} {str(path)!r} is being written by {_holder(target)}; wait for it to "
                                  f"finish or choose another output.") from None
        try:  # the file we locked may have been removed by a writer that let go meanwhile: lock the new one
            if os.stat(target).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200],
                                 "since": time.time()}))
        handle.flush()
        _held[key] = 1
        yield path
    finally:
        _held.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        handle.close()


@contextlib.contextmanager
def claim(path: str | Path, *, overwrite: bool = False, what: str = "--out", exists_ok: bool = False) -> Iterator[Path]:
    """Check, then hold, an output before the work: writable, new (unless `overwrite` or `exists_ok`, e.g. a
    resumed run), and ours alone while the block runs."""
    path = check_writable(path, what=what)
    with lock(path, what=what):
        if not exists_ok:
            check_new(path, overwrite=overwrite, what=what)
        yield path
