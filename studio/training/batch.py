"""Many adapters from one parent folder: one job per subfolder, the job list in the library.

kohya folds a parent's subfolders into one model; studio trains one adapter per subfolder (a concept
each). An executor of studio.jobs runs the jobs: `local` (one after another in this process, the default)
or `ray` (each job a Ray task with its own CPUs and GPUs, on this machine or a cluster:
studio.training.ray_batch). Either way the driver keeps the jobs, their progress, log lines and results in the
SQLite library, so a crash loses no finished adapter, a lost job resumes from its checkpoint, and starting the
same batch again continues with the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import studio.training.ray_batch  # noqa: F401  (registers the ray executor)
from studio.errors import InvalidArgumentError
from studio.jobs import EXECUTORS, Event, Job, Recorder
from studio.library import Library
from studio.training.data import DatasetError
from studio.training.trainer import TrainConfig


def batch_jobs(parent: str | Path, out_dir: str | Path, library: Library, **options: Any) -> list[Job]:
    """The batch's jobs not finished yet, one per subfolder of `parent`, queued in the library (a batch started
    before keeps its jobs and their states)."""
    parent, out_dir = Path(parent), Path(out_dir)
    if not parent.is_dir():
        raise DatasetError(f"batch folder {str(parent)!r} does not exist or is not a folder.")
    subfolders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise DatasetError(f"{str(parent)!r} has no subfolders; put one folder of images per concept in it.")
    batch = batch_name(parent, out_dir)
    jobs = {}
    for sub in subfolders:
        trigger = options.get("trigger") or re.sub(r"^\d+_", "", sub.name)
        config = TrainConfig(**{**options, "folder": str(sub.resolve()),
                                "out": str((out_dir / f"{sub.name}.safetensors").resolve()),
                                "trigger": trigger, "name": options.get("name") or sub.name})
        jobs[sub.name] = asdict(config)
    library.add_jobs(batch, jobs)
    return [Job(job["id"], job["name"], json.loads(job["config"]), job["attempts"] or 0, job["status"], batch)
            for job in library.jobs(batch) if job["status"] != "done"]


def batch_name(parent: Path, out_dir: Path) -> str:
    return f"{parent.resolve()} -> {out_dir.resolve()}"


def train_batch(parent: str | Path, out_dir: str | Path, *, library: Library | None = None, executor: str = "local",
                log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None,
                on_event: Callable[[Job, Event], None] | None = None, address: str | None = None,
                gpus_per_job: float = 0, cpus_per_job: float = 1, retries: int = 3, backoff: float = 5.0,
                runtime_env: dict[str, Any] | None = None, **options: Any) -> list[dict[str, Any]]:
    """Train one adapter per subfolder of `parent` into `out_dir/<subfolder>.safetensors`; returns the
    batch's jobs with their status. The subfolder's name (without a kohya `N_` prefix) is the trigger
    word unless `trigger` is given.

    executor="ray": each job is a Ray task with `cpus_per_job` CPUs and `gpus_per_job` GPUs on the cluster
    at `address` (default: the running Ray, else a local one); a lost task is tried again `retries` times,
    `backoff` x 2^n seconds apart, from its last checkpoint. `on_event(job, event)` sees every event."""
    choices = [name for name, runner in EXECUTORS.items() if runner.waits]  # a batch returns when it is over
    if executor not in choices:
        raise InvalidArgumentError(f"executor={executor!r}; choose one of {', '.join(choices)}.")
    runner = EXECUTORS[executor]
    runner.check()  # before any job is queued
    library = library or Library()
    jobs = batch_jobs(parent, out_dir, library, **options)
    recorder = Recorder(library, jobs, log=log, progress=progress, on_event=on_event)
    runner.run(jobs, recorder, address=address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
               retries=retries, backoff=backoff, runtime_env=runtime_env)
    return library.jobs(batch_name(Path(parent), Path(out_dir)))
