"""Many adapters from one parent folder: one job per subfolder, the job list in the library.

kohya folds a parent's subfolders into one model; studio trains one adapter per subfolder (a concept
each). The jobs live in the SQLite library, so a crash loses no finished adapter and starting the
same batch again continues with the rest (an interrupted job resumes from its checkpoint).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.library import Library
from studio.training.data import DatasetError
from studio.training.trainer import TrainConfig, train


def train_batch(parent: str | Path, out_dir: str | Path, *, library: Library | None = None,
                log=print, **options: Any) -> list[dict[str, Any]]:
    """Train one adapter per subfolder of `parent` into `out_dir/<subfolder>.safetensors`; returns the
    batch's jobs with their status. The subfolder's name (without a kohya `N_` prefix) is the trigger
    word unless `trigger` is given."""
    parent, out_dir = Path(parent), Path(out_dir)
    if not parent.is_dir():
        raise DatasetError(f"batch folder {str(parent)!r} does not exist or is not a folder.")
    subfolders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise DatasetError(f"{str(parent)!r} has no subfolders; put one folder of images per concept in it.")
    library = library or Library()
    batch = f"{parent.resolve()} -> {out_dir.resolve()}"
    jobs = {}
    for sub in subfolders:
        trigger = options.get("trigger") or re.sub(r"^\d+_", "", sub.name)
        config = TrainConfig(**{**options, "folder": str(sub), "out": str(out_dir / f"{sub.name}.safetensors"),
                                "trigger": trigger, "name": options.get("name") or sub.name})
        jobs[sub.name] = asdict(config)
    library.add_jobs(batch, jobs)
    for job in library.jobs(batch):
        if job["status"] == "done":
            continue
        config = TrainConfig(**json.loads(job["config"]))
        resume = (config.paths()["checkpoint"] / "state.json").is_file()
        library.update_job(job["id"], status="running", error=None)
        log(f"[{job['name']}] {'resuming' if resume else 'training'} -> {config.out}")
        try:
            path = train(config, resume=resume, log=lambda line, name=job["name"]: log(f"[{name}] {line}"),
                         progress=lambda step, total, loss, job_id=job["id"]: _note_step(library, job_id, step))
        except StudioError as error:  # one bad folder does not stop the batch
            library.update_job(job["id"], status="failed", error=str(error))
            log(f"[{job['name']}] failed: {error}")
            continue
        library.update_job(job["id"], status="done", result=str(path))
        library.add_adapter(path)
    return library.jobs(batch)


def _note_step(library: Library, job_id: int, step: int) -> None:
    if step % 10 == 0:
        library.update_job(job_id, step=step)
