"""Many adapters from one parent folder: one job per subfolder, the job list in the library.

kohya folds a parent's subfolders into one model; studio trains one adapter per subfolder (a concept
each). An executor runs the jobs: `local` (one after another in this process, the default) or `ray`
(each job a Ray task with its own CPUs and GPUs, on this machine or a cluster: studio.training.ray_batch).
Either way the driver keeps the jobs, their progress, log lines and results in the SQLite library, so a
crash loses no finished adapter, a lost job resumes from its checkpoint, and starting the same batch
again continues with the rest.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studio.errors import InvalidArgumentError, StudioError
from studio.library import Library
from studio.progress import clock
from studio.training.data import DatasetError
from studio.training.trainer import TrainConfig, train

EXECUTORS = ("local", "ray")
Event = dict[str, Any]  # {"event": "started" | "log" | "step", ...} from a job to the driver


@dataclass
class BatchJob:
    id: int
    name: str
    config: dict[str, Any]
    attempts: int = 0


def run_job(config: dict[str, Any], emit: Callable[[Event], None]) -> Path:
    """Train one job's adapter, from its checkpoint when a run of it was cut short, telling `emit` what
    happens: started (where), its log lines, and its step at every tenth of the run."""
    from studio.outputs import lock

    config = TrainConfig(**config)
    with lock(config.out):  # another driver of the same batch training this job: OutputBusyError, before "started"
        return _run_job(config, emit)


def _run_job(config: TrainConfig, emit: Callable[[Event], None]) -> Path:
    from studio.training.trainer import latest_checkpoint

    checkpoint = latest_checkpoint(config.paths()["checkpoint"])
    resume = checkpoint is not None
    emit({"event": "started", "resume": resume,
          "from_step": json.loads((checkpoint / "state.json").read_text())["step"] if resume else 0,
          "worker": f"{socket.gethostname()} pid {os.getpid()}", "pid": os.getpid()})
    tenth = max(1, config.steps // 10)

    def progress(step: int, total: int, loss: float) -> None:
        if step % tenth == 0 or step == total:
            emit({"event": "step", "step": step, "total": total, "loss": loss})

    # always resume: a job cut short continues from its checkpoint, and one whose adapter was written just
    # before the kill (the job list not told yet) is taken as finished rather than refused as existing
    return train(config, resume=True, progress=progress, log=lambda line: emit({"event": "log", "line": line}))


class Recorder:
    """The driver's side: each job's events into the library, a line per event into `log` (per job: a line
    per tenth with its ETA), and the whole batch's steps into `progress(done, total)`."""

    def __init__(self, library: Library, jobs: list[BatchJob], *, log: Callable[[str], None],
                 progress: Callable[[int, int], None] | None = None,
                 on_event: Callable[[BatchJob, Event], None] | None = None):
        self.library, self.log, self.progress, self.on_event = library, log, progress, on_event
        self.total = sum(job.config["steps"] for job in jobs)
        self.steps = {job.id: 0 for job in jobs}
        self.started: dict[int, tuple[float, int]] = {}  # job -> (when its attempt started, from which step)

    def __call__(self, job: BatchJob, event: Event) -> None:
        kind = event["event"]
        if kind == "started":
            self.started[job.id] = (time.monotonic(), event["from_step"])
            self.library.update_job(job.id, status="running", attempts=job.attempts, worker=event["worker"], error=None)
            self._say(job, f"{'resuming' if event['resume'] else 'training'} on {event['worker']} "
                           f"(attempt {job.attempts}) -> {job.config['out']}")
        elif kind == "log":
            self.library.add_job_log(job.id, event["line"])
            self._say(job, event["line"])
        elif kind == "step":
            step, total = event["step"], event["total"]
            self.library.update_job(job.id, step=step)
            since, first = self.started.get(job.id, (time.monotonic(), step))
            eta = (time.monotonic() - since) / max(1, step - first) * (total - step)
            self._say(job, f"step {step}/{total} ({100 * step // total}%), loss {event['loss']:.4f}, ETA {clock(eta)}")
            self._advance(job, step)
        if self.on_event is not None:
            self.on_event(job, event)

    def done(self, job: BatchJob, path: Path) -> None:
        self.library.update_job(job.id, status="done", result=str(path), step=job.config["steps"])
        self.library.add_adapter(path)
        self._advance(job, job.config["steps"])
        self._say(job, f"done: {path}")

    def failed(self, job: BatchJob, error: str) -> None:
        self.library.update_job(job.id, status="failed", error=error)
        self.library.add_job_log(job.id, f"failed: {error}")
        self._advance(job, job.config["steps"])  # the batch's progress counts it as over
        self._say(job, f"failed: {error}")

    def taken(self, job: BatchJob, error: str) -> None:
        """Another driver holds the job (its status is that driver's to tell)."""
        self._advance(job, job.config["steps"])
        self._say(job, f"skipped: {error}")

    def finished_elsewhere(self, job: BatchJob) -> bool:
        """Done by another driver since this one listed the batch."""
        record = self.library.job(job.id)
        if record and record["status"] == "done":
            self._advance(job, job.config["steps"])
            self._say(job, f"done by another run: {record['result']}")
            return True
        return False

    def retrying(self, job: BatchJob, error: str, delay: float) -> None:
        self.library.update_job(job.id, status="retrying", error=error)
        self.library.add_job_log(job.id, f"lost ({error}); retrying in {delay:g} s")
        self._say(job, f"lost ({error}); attempt {job.attempts + 1} in {delay:g} s, from its last checkpoint")

    def _advance(self, job: BatchJob, step: int) -> None:
        self.steps[job.id] = step
        if self.progress is not None:
            self.progress(sum(self.steps.values()), self.total)

    def _say(self, job: BatchJob, line: str) -> None:
        self.log(f"[{job.name}] {line}")


def batch_jobs(parent: str | Path, out_dir: str | Path, library: Library, **options: Any) -> list[BatchJob]:
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
    return [BatchJob(job["id"], job["name"], json.loads(job["config"]), job["attempts"] or 0)
            for job in library.jobs(batch) if job["status"] != "done"]


def batch_name(parent: Path, out_dir: Path) -> str:
    return f"{parent.resolve()} -> {out_dir.resolve()}"


def train_batch(parent: str | Path, out_dir: str | Path, *, library: Library | None = None, executor: str = "local",
                log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None,
                on_event: Callable[[BatchJob, Event], None] | None = None, address: str | None = None,
                gpus_per_job: float = 0, cpus_per_job: float = 1, retries: int = 3, backoff: float = 5.0,
                runtime_env: dict[str, Any] | None = None, **options: Any) -> list[dict[str, Any]]:
    """Train one adapter per subfolder of `parent` into `out_dir/<subfolder>.safetensors`; returns the
    batch's jobs with their status. The subfolder's name (without a kohya `N_` prefix) is the trigger
    word unless `trigger` is given.

    executor="ray": each job is a Ray task with `cpus_per_job` CPUs and `gpus_per_job` GPUs on the cluster
    at `address` (default: the running Ray, else a local one); a lost task is tried again `retries` times,
    `backoff` x 2^n seconds apart, from its last checkpoint. `on_event(job, event)` sees every event."""
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"executor={executor!r}; choose one of {', '.join(EXECUTORS)}.")
    if executor == "ray":
        from studio.training.ray_batch import require_ray

        require_ray()  # before any job is queued
    library = library or Library()
    jobs = batch_jobs(parent, out_dir, library, **options)
    recorder = Recorder(library, jobs, log=log, progress=progress, on_event=on_event)
    if executor == "ray":
        from studio.training.ray_batch import run_on_ray

        run_on_ray(jobs, recorder, address=address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                   retries=retries, backoff=backoff, runtime_env=runtime_env)
    else:
        run_locally(jobs, recorder)
    return library.jobs(batch_name(Path(parent), Path(out_dir)))


def run_locally(jobs: list[BatchJob], recorder: Recorder) -> None:
    """One job after another in this process; a job whose data is wrong fails alone, and one that another
    driver of the same batch holds or has finished is left to it."""
    from studio.outputs import OutputBusyError

    for job in jobs:
        if recorder.finished_elsewhere(job):
            continue
        job.attempts += 1
        try:
            path = run_job(job.config, lambda event, job=job: recorder(job, event))
        except OutputBusyError as error:
            recorder.taken(job, str(error))
            continue
        except StudioError as error:  # one bad folder does not stop the batch
            recorder.failed(job, str(error))
            continue
        except Exception as error:  # noqa: BLE001 - nor does a fault of studio's own: it is recorded with its type
            recorder.failed(job, f"{type(error).__name__}: {error}")
            continue
        recorder.done(job, path)
